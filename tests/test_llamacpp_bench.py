"""benchmarks/llamacpp.py: the testbed written back as a GGUF for llama.cpp, and read back.

The llama.cpp anchor is only as good as this mapping: a wrong name, a missing rotary permutation
or Gemma's norm offset would hand llama.cpp a broken model and make it look bad. These tests pin
the inverse of mint_mlx.tools.testbeds's GGUF -> HF conversion on tiny synthetic GGUFs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def lc() -> Any:
    spec = importlib.util.spec_from_file_location("llamacpp_bench", BENCHMARKS / "llamacpp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLAMA_NAMES = [
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    *(
        f"blk.{i}.{n}"
        for i in (0, 1, 12)
        for n in (
            "attn_norm.weight",
            "ffn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        )
    ),
]
GEMMA_NAMES = [
    "token_embd.weight",
    "output_norm.weight",
    *(
        f"blk.{i}.{n}"
        for i in (0, 5)
        for n in (
            "attn_norm.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "post_ffw_norm.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        )
    ),
]


@pytest.mark.parametrize(("arch", "names"), [("llama", LLAMA_NAMES), ("gemma3", GEMMA_NAMES)])
def test_gguf_names_invert_the_testbed_mapping(lc: Any, arch: str, names: list[str]) -> None:
    hf = [lc.hf_name(n, arch) for n in names]
    assert len(set(hf)) == len(names)
    assert [lc.gguf_name(h, arch) for h in hf] == names
    with pytest.raises(ValueError):
        lc.gguf_name("model.layers.0.mlp.unknown.weight", arch)


def _bf16(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float32 values that bf16 holds exactly (the testbed's weights are bf16)."""
    x = rng.standard_normal(shape).astype(np.float32)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layout_round_trip_and_direction(lc: Any, arch: str) -> None:
    from mint_mlx.tools.testbeds.gguf_to_hf import gemma_norm_from_gguf, unpermute_rotary

    rng = np.random.default_rng(0)
    n_head, n_kv = 4, 2
    q, k, norm = _bf16(rng, 32, 8), _bf16(rng, 16, 8), _bf16(rng, 8) * 0.125
    for name, w in (("blk.0.attn_q.weight", q), ("blk.0.attn_k.weight", k)):
        g = lc.to_gguf_layout(name, w, arch, n_head, n_kv)
        np.testing.assert_array_equal(lc.from_gguf_layout(name, g, arch, n_head, n_kv), w)
        if arch == "llama":  # the testbed converter undoes llama.cpp's permutation
            heads = n_head if "attn_q" in name else n_kv
            np.testing.assert_array_equal(unpermute_rotary(g, heads), w)
            assert not np.array_equal(g, w)
        else:
            np.testing.assert_array_equal(g, w)
    g = lc.to_gguf_layout("blk.0.attn_norm.weight", norm, arch, n_head, n_kv)
    np.testing.assert_array_equal(
        lc.from_gguf_layout("blk.0.attn_norm.weight", g, arch, 4, 2), norm
    )
    if arch == "gemma3":
        np.testing.assert_array_equal(gemma_norm_from_gguf(g), norm)
        np.testing.assert_array_equal(g, norm + 1)


def _source_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], heads: tuple) -> Path:
    """A tiny 'source' GGUF: a few metadata fields and float32 tensors of the right shapes."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.attention.head_count", heads[0])
    w.add_uint32(f"{arch}.attention.head_count_kv", heads[1])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    for name, t in tensors.items():
        w.add_tensor(name, np.zeros_like(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_write_gguf_then_dequantize_gives_the_weights_back(
    lc: Any, arch: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    n_head, n_kv, hidden = 4, 2, 32
    shapes = {
        "token_embd.weight": (10, hidden),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden // 2, hidden),
        "output_norm.weight": (hidden,),
    }
    source = _source_gguf(
        tmp_path / "src.gguf", arch, {n: np.zeros(s, np.float32) for n, s in shapes.items()},
        (n_head, n_kv),
    )  # fmt: skip
    weights = {lc.hf_name(n, arch): _bf16(rng, *s) * 0.125 for n, s in shapes.items()}
    config = {"num_attention_heads": n_head, "num_key_value_heads": n_kv}
    out = tmp_path / "bf16.gguf"
    summary = lc.write_gguf(source, weights, config, out)
    assert summary["types"] == {"BF16": 3, "F32": 2}
    assert summary["tensor_bytes"] == 2 * (10 + hidden + hidden // 2) * hidden + 4 * 2 * hidden

    reader = gguf.GGUFReader(str(out))
    assert reader.fields[f"{arch}.attention.head_count"].contents() == n_head
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert [t.name for t in reader.tensors] == list(shapes)

    back = lc.dequantize_gguf(out, config)
    assert set(back) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(back[name], w, err_msg=name)
    s = lc.gguf_summary(out)
    assert s["tensor_bytes"] == summary["tensor_bytes"]
    assert s["parameters"] == sum(w.size for w in weights.values())

    # a missing or an extra tensor is refused, not silently written
    missing = dict(weights)
    missing.pop(lc.hf_name("blk.0.attn_k.weight", arch))
    with pytest.raises(ValueError, match="no model.layers.0.self_attn.k_proj"):
        lc.write_gguf(source, missing, config, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="not in the GGUF"):
        lc.write_gguf(source, {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]},
                      config, tmp_path / "y.gguf")  # fmt: skip


def test_dequantize_a_quantized_tensor_in_testbed_layout(lc: Any, tmp_path: Path) -> None:
    """A Q8_0 Q projection comes back as gguf's dequantization with the rotary rows undone."""
    from mint_mlx.tools.testbeds.gguf_to_hf import unpermute_rotary

    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.3.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = lc.dequantize_gguf(path, {"num_attention_heads": 4, "num_key_value_heads": 2})
    expect = unpermute_rotary(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0), 4)
    np.testing.assert_array_equal(back["model.layers.3.self_attn.q_proj.weight"], expect)
    s = lc.gguf_summary(path)
    assert s["tensor_bytes"] == raw.nbytes == 32 * 64 // 32 * 34
    assert s["params_by_type"] == {"Q8_0": 32 * 64}
