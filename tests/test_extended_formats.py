"""Extended formats (issue 4): exact byte costs, round trips, and what each costs in error."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import (
    COMPACT,
    Format,
    compact_groups_per_block,
    extended_formats,
    format_by_name,
    format_from_entry,
)
from mint_mlx.quant.quantize import dequantize_weight, quantize_weight, squared_error
from mint_mlx.runtime.kernels.reference import dequantize_affine

DTYPE_BYTES = {"uint32": 4, "uint8": 1, "int8": 1, "float": 2}


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    rows = rng.lognormal(0.0, 0.5, size=(*shape[:-1], 1))
    return mx.array((0.02 * rows * rng.standard_t(4, size=shape)).astype(np.float32))


@pytest.mark.parametrize("fmt", extended_formats(), ids=lambda f: f.name)
def test_bytes_are_exactly_the_saved_arrays(fmt: Format) -> None:
    for shape in ((24, 512), (3, 8, 768), (5, 576)):
        if not fmt.supports(shape):
            assert shape[-1] % fmt.group_size
            continue
        arrays = quantize_weight(heavy_tailed(shape), fmt, mx.bfloat16, "optimized")
        specs = fmt.array_specs(shape)
        assert set(arrays) == set(specs)
        for suffix, (want_shape, kind) in specs.items():
            assert tuple(arrays[suffix].shape) == want_shape, (suffix, arrays[suffix].shape)
            assert arrays[suffix].dtype.size == DTYPE_BYTES[kind], suffix
        assert sum(a.nbytes for a in arrays.values()) == fmt.nbytes(shape)
        restored = dequantize_weight(arrays, fmt)
        assert restored.shape == shape and bool(mx.all(mx.isfinite(restored)).item())


def test_names_bits_and_config_entries_round_trip() -> None:
    cs = format_by_name("affine-4-g32-cs")
    assert cs.mode == COMPACT and not cs.native
    assert cs.bits_per_weight() == pytest.approx(4 + 16 / 32 + 32 / 256)  # 4.625, not 5.0
    assert format_by_name("affine-4-g16").bits_per_weight() == pytest.approx(6.0)
    assert format_by_name("affine-4-g256").bits_per_weight() == pytest.approx(4.125)
    for f in extended_formats():
        assert format_from_entry(f.quantization_entry()) == f
    assert format_from_entry({"bits": 4, "group_size": 64, "mode": "affine"}).native
    # rows that 256 does not divide share steps over smaller blocks (576 = 3 x 192)
    assert compact_groups_per_block(576, 32) == 6 and compact_groups_per_block(1024, 16) == 16
    assert cs.array_specs((8, 576))["super_scales"][0] == (8, 3, 2)


def test_group_256_matches_the_reference_dequantizer() -> None:
    w = heavy_tailed((16, 512))
    fmt = format_by_name("affine-3-g256")
    arrays = quantize_weight(w, fmt, mx.float16, "optimized")
    mine = dequantize_weight(arrays, fmt)
    ref = dequantize_affine(arrays["weight"], arrays["scales"], arrays["biases"], 3, 256)
    assert mx.allclose(mine, ref, atol=1e-6).item()


@pytest.mark.parametrize("bits", [3, 4])
def test_error_orders_as_the_metadata_budget_says(bits: int) -> None:
    """Finer groups cost more bytes and give less error; compact scales give nearly the full-
    precision scales' error at group 32 for about half the metadata."""
    w = heavy_tailed((64, 1024), seed=bits)

    def err(name: str) -> float:
        plain, _ = squared_error(w, format_by_name(name), mx.bfloat16, None, "optimized")
        return float(plain.item())

    g16, g32, g64, g256 = (err(f"affine-{bits}-g{g}") for g in (16, 32, 64, 256))
    assert g16 < g32 < g64 < g256
    cs16, cs32, cs64 = (err(f"affine-{bits}-g{g}-cs") for g in (16, 32, 64))
    assert cs16 < cs32 < cs64
    assert cs32 < 1.02 * g32  # 8-bit scales lose little ...
    assert cs32 < g64  # ... and at 4.625 bits beat group 64's 4.5 bits by more than it costs


def test_rtn_extended_is_plain_min_max() -> None:
    w = heavy_tailed((8, 256))
    fmt = format_by_name("affine-4-g16")
    arrays = quantize_weight(w, fmt, mx.float32, "rtn")
    x = np.array(w).reshape(8, 16, 16)
    lo, hi = x.min(-1), x.max(-1)
    assert np.allclose(np.array(arrays["scales"]), (hi - lo) / 15, rtol=1e-6)
    assert np.allclose(np.array(arrays["biases"]), lo, rtol=1e-6)
    opt, _ = squared_error(w, fmt, mx.float32, None, "optimized")
    rtn, _ = squared_error(w, fmt, mx.float32, None, "rtn")
    assert float(opt.item()) < float(rtn.item())
