"""Byte costs in the registry must equal what mx.quantize really produces."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mint_mlx.formats import Format, format_by_name, format_from_entry, native_formats
from mint_mlx.quant.quantize import quantize_weight

SHAPES = [(64, 128), (3, 32, 256), (7, 384)]


@pytest.mark.parametrize("fmt", native_formats(), ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_nbytes_and_array_specs_match_mlx(fmt: Format, dtype: mx.Dtype) -> None:
    for shape in SHAPES:
        if not fmt.supports(shape):
            continue
        w = mx.random.normal(shape).astype(dtype)
        arrays = quantize_weight(w, fmt, dtype)
        specs = fmt.array_specs(shape, dtype.size)
        assert set(arrays) == set(specs)
        for suffix, arr in arrays.items():
            spec_shape, kind = specs[suffix]
            assert tuple(arr.shape) == spec_shape
            expected = {"float": dtype, "uint32": mx.uint32, "uint8": mx.uint8}[kind]
            assert arr.dtype == expected
        assert fmt.nbytes(shape, dtype.size) == sum(a.nbytes for a in arrays.values())


def test_group_must_divide_width() -> None:
    assert not Format("affine", 4, 128).supports((10, 320))
    assert Format("affine", 4, 64).supports((10, 320))
    assert not format_by_name("nvfp4").supports((4, 40))


def test_bits_per_weight() -> None:
    assert format_by_name("affine-4-g64").bits_per_weight() == pytest.approx(4.5)
    assert format_by_name("affine-4-g32").bits_per_weight() == pytest.approx(5.0)
    assert format_by_name("nvfp4").bits_per_weight() == pytest.approx(4.5)
    assert format_by_name("mxfp4").bits_per_weight() == pytest.approx(4.25)
    assert format_by_name("fp16").bits_per_weight() == 16


def test_config_entry_round_trip() -> None:
    for fmt in native_formats():
        assert format_from_entry(fmt.quantization_entry()) == fmt
    assert len({f.name for f in native_formats()}) == 22


def test_candidate_sets() -> None:
    from mint_mlx.formats import formats_for, native_formats, paper_formats

    assert formats_for("paper", "rtn") == paper_formats()
    assert formats_for("fisher", "rtn") == native_formats()
    fitted = formats_for("fisher", "optimized")
    assert {f.mode for f in fitted} == {"affine", "passthrough"} and len(fitted) == 19
