"""Stock mlx-lm baselines: made by mlx-lm's own convert, sizes exact, float leftovers reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mint_mlx.tools import baselines as bl

# isort: split
import mlx.nn as nn
from mlx_lm.utils import load_model

from tiny_models import LLAMA_CONFIG

HIDDEN = LLAMA_CONFIG["hidden_size"]  # 128: divisible by every group size
INTER = LLAMA_CONFIG["intermediate_size"]  # 320: divisible by 32 and 64, not by 128


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_the_list_covers_the_issue() -> None:
    names = [b.name for b in bl.stock_baselines()]
    assert len(names) == len(set(names)) == 6 * 3 + 3 + 2 * 2
    assert {"affine-2-g32", "affine-8-g128", "mxfp4", "nvfp4", "mxfp8"} <= set(names)
    assert {"mixed_3_6-g64", "mixed_3_6-g32", "mixed_4_6-g64", "mixed_4_6-g32"} <= set(names)
    assert bl.baseline_by_name("nvfp4").group_size == 16
    assert "--quant-predicate mixed_4_6" in bl.baseline_by_name("mixed_4_6-g32").command
    with pytest.raises(bl.BaselineError, match="unknown baseline"):
        bl.baseline_by_name("affine-7-g64")


def test_uniform_affine_is_stock_and_sized_exactly(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4g64"
    m = bl.build_baseline(tiny_llama, out, "affine-4-g64")
    assert m.path == out and not out.with_name("q4g64.partial").exists()
    assert m.total_bytes == sum(f.stat().st_size for f in out.glob("*.safetensors")) > 0
    assert _config(out)["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert m.float_layers == []
    model, _ = load_model(out)  # stock mlx-lm loads it
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 64)
    assert m.quantized_layers == 1 + 7 * LLAMA_CONFIG["num_hidden_layers"]  # tied embedding
    assert json.loads((out / "baseline.json").read_text())["total_bytes"] == m.total_bytes
    # fewer bits, fewer bytes; bits per weight over the same parameter count
    m3 = bl.build_baseline(tiny_llama, tmp_path / "q3g64", "affine-3-g64")
    assert m3.total_parameters == m.total_parameters
    assert m3.total_bytes < m.total_bytes and 3.0 < m3.bits_per_weight < m.bits_per_weight < 5.0


def test_layers_that_do_not_divide_stay_float_and_are_reported(
    tiny_llama: Path, tmp_path: Path
) -> None:
    m = bl.build_baseline(tiny_llama, tmp_path / "q4g128", "affine-4-g128")
    expect = {f"model.layers.{i}.mlp.down_proj" for i in range(LLAMA_CONFIG["num_hidden_layers"])}
    assert {f["path"] for f in m.float_layers} == expect
    assert all(
        f["width"] == INTER and "not divisible by group size 128" in f["reason"]
        for f in m.float_layers
    )
    model, _ = load_model(m.path)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear  # really float
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.QuantizedLinear)


def test_fp_modes(tiny_llama: Path, tmp_path: Path) -> None:
    for name, group in (("mxfp4", 32), ("nvfp4", 16), ("mxfp8", 32)):
        m = bl.build_baseline(tiny_llama, tmp_path / name, name)
        q = _config(m.path)["quantization"]
        assert (q["mode"], q["group_size"]) == (name, group) and m.float_layers == []


def test_mixed_recipe_is_mlx_lms(tiny_llama: Path, tmp_path: Path) -> None:
    """mixed_3_6 at group 32 on 2 layers: mlx-lm's rule (index < n//8 or index >= 7n//8 or
    (index - n//8) % 3 == 2) raises v_proj/down_proj of layer 1 only to 6 bits; the rest (the
    tied embedding included: the recipe only raises paths named lm_head) stays at 3 bits."""
    m = bl.build_baseline(tiny_llama, tmp_path / "mixed", "mixed_3_6-g32")
    q = _config(m.path)["quantization"]
    assert q["model.layers.1.self_attn.v_proj"] == {"group_size": 32, "bits": 6, "mode": "affine"}
    assert q["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert q["model.layers.0.self_attn.v_proj"]["bits"] == 3
    assert q["model.layers.0.mlp.up_proj"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    assert q["model.embed_tokens"]["bits"] == 3
    uniform3 = bl.build_baseline(tiny_llama, tmp_path / "u3", "affine-3-g32")
    assert m.total_bytes > uniform3.total_bytes


def test_existing_output_needs_force(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(bl.BaselineError, match="already exists"):
        bl.build_baseline(tiny_llama, out, "affine-8-g64")
    m = bl.build_baseline(tiny_llama, out, "affine-8-g64", force=True)
    assert m.total_bytes > 0 and (out / "config.json").is_file()
