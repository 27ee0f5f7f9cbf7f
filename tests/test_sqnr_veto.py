"""The SQNR veto end to end: at a budget where the allocator would take 2-bit formats, no tensor
of the written model is below the veto, measured on the saved arrays against the source."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from mint_mlx.convert import convert

#: ``--min-sqnr``'s documented default (convert's help: "SQNR veto in dB (default 9)"). On the
#: tiny llama the 2-bit formats measure 6.3-7.6 dB and the 3-bit ones 12.5 dB and up, so the
#: veto falls in a wide gap and estimates from a row sample cannot straddle it.
DEFAULT_VETO_DB = 9.0


def measured_sqnr(out: Path, src: Path) -> dict[str, float]:
    """SQNR in dB of every quantized module of ``out``: its saved arrays dequantized by MLX,
    against the source's weight (none of the converter's own error bookkeeping)."""
    quant = json.loads((out / "config.json").read_text())["quantization"]
    saved: dict[str, mx.array] = {}
    for f in out.glob("*.safetensors"):
        saved.update(mx.load(str(f)))  # type: ignore[arg-type]
    ref: dict[str, mx.array] = {}
    for f in src.glob("*.safetensors"):
        ref.update(mx.load(str(f)))  # type: ignore[arg-type]
    result = {}
    for module, q in quant.items():
        if not isinstance(q, dict):  # the defaults, not a module
            continue
        w = ref[f"{module}.weight"].astype(mx.float32)
        restored = mx.dequantize(
            saved[f"{module}.weight"],
            saved[f"{module}.scales"],
            saved.get(f"{module}.biases"),
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
        )
        noise = ((restored - w) ** 2).sum().item()
        result[module] = math.inf if noise == 0 else 10 * math.log10((w**2).sum().item() / noise)
    return result


def test_no_written_tensor_is_below_the_sqnr_veto(tiny_llama: Path, tmp_path: Path) -> None:
    analysis = tmp_path / "a.jsonl"
    # Without the veto this budget is spent by putting some tensors in 2 bits: the setup can fail.
    off = convert(tiny_llama, tmp_path / "off", bpw=3.8, min_sqnr=0.0, analysis=analysis)
    assert off.path is not None
    unvetoed = measured_sqnr(off.path, tiny_llama)
    assert len(unvetoed) == len(off.plan.assignments)
    assert min(unvetoed.values()) < DEFAULT_VETO_DB - 1, unvetoed
    # With the default veto the same budget keeps every tensor above it.
    on = convert(tiny_llama, tmp_path / "on", bpw=3.8, analysis=analysis)
    assert on.path is not None
    vetoed = measured_sqnr(on.path, tiny_llama)
    assert vetoed.keys() == unvetoed.keys()
    low = {m: round(db, 2) for m, db in vetoed.items() if db < DEFAULT_VETO_DB}
    assert not low, f"below the {DEFAULT_VETO_DB} dB veto: {low}"
    assert not any("veto lifted" in n for n in on.plan.notes)
