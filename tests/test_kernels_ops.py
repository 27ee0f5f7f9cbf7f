"""The public kernel API (mint_mlx.runtime.kernels.ops) on its reference path: against a NumPy
dequantize-and-multiply, against MLX's own quantized_matmul / gather_qmm where MLX has the format,
and against the storage of mint_mlx.quant.extended."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import COMPACT, Format, compact_groups_per_block, extended_formats
from mint_mlx.quant.extended import dequantize_extended, quantize_extended
from mint_mlx.runtime.kernels import ops
from mint_mlx.tools.emulator.cases import random_quantized, random_x

pytestmark = pytest.mark.skipif(
    mx.metal.is_available(), reason="a Metal GPU is available: ops runs the kernels there"
)

FORMATS = [Format("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (16, 32, 64, 128, 256)]
FORMATS += [Format(COMPACT, b, g, native=False) for b in (2, 3, 4, 5, 6, 8) for g in (16, 32, 64)]


def numpy_dequantize(arrays: dict[str, mx.array], fmt: Format) -> np.ndarray:
    """An independent NumPy reading of the storage: bit stream, groups, (compact) steps."""
    w = np.array(arrays["weight"])
    *lead, rows, words = w.shape
    n = words * 32 // fmt.bits
    stream = np.unpackbits(w.reshape(-1, words).view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(-1, n, fmt.bits).astype(np.int64)
    q = (stream << np.arange(fmt.bits)).sum(-1).reshape(*lead, rows, n).astype(np.float64)
    groups = n // fmt.group_size
    if fmt.mode == COMPACT:
        per = compact_groups_per_block(n, fmt.group_size)
        steps = np.array(arrays["super_scales"].astype(mx.float32)).astype(np.float64)
        block = np.arange(groups) // per
        s = np.array(arrays["scales"]).astype(np.float64) * steps[..., block, 0]
        b = np.array(arrays["biases"]).astype(np.float64) * steps[..., block, 1]
    else:
        s = np.array(arrays["scales"].astype(mx.float32)).astype(np.float64)
        b = np.array(arrays["biases"].astype(mx.float32)).astype(np.float64)
    q = q.reshape(*lead, rows, groups, fmt.group_size)
    return (q * s[..., None] + b[..., None]).reshape(*lead, rows, n)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dequantize_and_matmul_match_numpy(fmt: Format) -> None:
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    inn = 576 if fmt.group_size <= 64 else 768  # 576: fewer groups per compact super-block
    arrays = random_quantized(rng, fmt, 11, inn, mx.bfloat16)
    ref_w = numpy_dequantize(arrays, fmt)
    np.testing.assert_allclose(np.array(ops.dequantize(arrays, fmt)), ref_w, rtol=1e-6, atol=1e-6)
    x = random_x(rng, (2, 3, inn), mx.float32)
    y = ops.quantized_matmul(x, arrays, fmt)
    assert y.shape == (2, 3, 11) and y.dtype == mx.float32
    ref = np.array(x).astype(np.float64) @ ref_w.T
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_result_in_x_dtype(dtype: mx.Dtype) -> None:
    fmt = Format(COMPACT, 4, 32, native=False)
    rng = np.random.default_rng(3)
    arrays = random_quantized(rng, fmt, 7, 256, mx.float16)
    x = random_x(rng, (5, 256), dtype)
    y = ops.quantized_matmul(x, arrays, fmt)
    assert y.dtype == dtype
    # the float64 product of the NumPy reading, to within the rounding of one value to dtype
    ref = np.array(x.astype(mx.float32)).astype(np.float64) @ numpy_dequantize(arrays, fmt).T
    eps = 2.0**-8 if dtype == mx.bfloat16 else 2.0**-11  # half an ulp, relative
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_matches_mlx_quantized_matmul(bits: int, group: int) -> None:
    w = mx.random.normal((40, 512), key=mx.random.key(bits + group))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    arrays = {"weight": wq, "scales": s, "biases": b}
    x = mx.random.normal((3, 512), key=mx.random.key(1))
    ours = ops.quantized_matmul(x, arrays, Format("affine", bits, group))
    theirs = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=bits)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4, atol=1e-4)


def _experts(bits: int, group: int, n: int = 6, out: int = 24, inn: int = 256):
    w = mx.random.normal((n, out, inn), key=mx.random.key(bits * group))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    return {"weight": wq, "scales": s, "biases": b}


@pytest.mark.parametrize(
    ("x_shape", "idx"),
    [
        ((1, 1, 256), [[2, 5]]),  # decode as SwitchGLU calls it: fewer entries than experts
        ((5, 1, 1, 256), [[0, 1], [2, 3], [1, 1], [5, 0], [3, 2]]),  # more entries than experts
        ((3, 4, 256), [1, 1, 4]),  # several rows per entry
    ],
)
def test_gather_matches_mlx_gather_qmm(x_shape: tuple[int, ...], idx: list) -> None:
    arrays = _experts(4, 64)
    x = mx.random.normal(x_shape, key=mx.random.key(7))
    indices = mx.array(idx, dtype=mx.uint32)
    ours = ops.gather_quantized_matmul(x, arrays, Format("affine", 4, 64), indices)
    theirs = mx.gather_qmm(
        x,
        arrays["weight"],
        arrays["scales"],
        arrays["biases"],
        rhs_indices=indices,
        transpose=True,
        group_size=64,
        bits=4,
    )
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4, atol=1e-4)


def test_gather_sorted_as_switch_glu_calls_it() -> None:
    arrays = _experts(3, 32)
    rng = np.random.default_rng(2)
    idx = mx.array(np.sort(rng.integers(0, 6, size=70)).astype(np.uint32))
    x = random_x(rng, (70, 1, 256), mx.float16)
    ours = ops.gather_quantized_matmul(x, arrays, Format("affine", 3, 32), idx, sorted_indices=True)
    theirs = mx.gather_qmm(
        x.astype(mx.float32),
        arrays["weight"],
        arrays["scales"],
        arrays["biases"],
        rhs_indices=idx,
        transpose=True,
        group_size=32,
        bits=3,
        sorted_indices=True,
    )
    assert ours.shape == (70, 1, 24) and ours.dtype == mx.float16
    np.testing.assert_allclose(
        np.array(ours.astype(mx.float32)), np.array(theirs), rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("fmt", [Format(COMPACT, 5, 16, False), Format("affine", 6, 256, False)])
def test_gather_extended_formats_match_numpy(fmt: Format) -> None:
    rng = np.random.default_rng(11)
    arrays = random_quantized(rng, fmt, 9, 512, mx.float16, experts=4)
    w = numpy_dequantize(arrays, fmt)
    x = random_x(rng, (3, 2, 512), mx.float32)
    for idx in ([0, 3, 3], [[1, 2, 0], [3, 3, 1], [0, 0, 2]]):  # 3 and 9 entries for 4 experts
        indices = mx.array(idx, dtype=mx.int32)
        y = np.array(ops.gather_quantized_matmul(x, arrays, fmt, indices))
        ref = np.array(x)[..., :, :] @ np.swapaxes(w[np.array(idx)], -1, -2)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", extended_formats()[::5], ids=lambda f: f.name)
def test_extended_storage_round_trip(fmt: Format) -> None:
    # What quantize_extended saves is what ops reads (576 wide: 3-group super-blocks at g64).
    w = mx.random.normal((8, 576), key=mx.random.key(fmt.bits))
    if not fmt.supports(w.shape):
        pytest.skip(f"{fmt.name} cannot store width 576")
    arrays = quantize_extended(w, fmt, mx.float16, scale_method="rtn")
    # ops reads the storage as an independent NumPy reading of the bits does ...
    read = numpy_dequantize(arrays, fmt)
    np.testing.assert_allclose(np.array(ops.dequantize(arrays, fmt)), read, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.array(dequantize_extended(arrays, fmt)), read, rtol=1e-6, atol=1e-6
    )
    # ... and what it reads is w: within each group, off by at most one step of the group's
    # own min-max grid (half a step from rounding, the rest from 16-bit scales), plus for
    # compact scales half a stored step S of the scale (times the largest code) and of the bias
    qmax = 2**fmt.bits - 1
    ref = np.array(w).astype(np.float64).reshape(8, -1, fmt.group_size)
    tol = (ref.max(-1) - ref.min(-1)) / qmax
    if fmt.mode == COMPACT:
        steps = np.array(arrays["super_scales"].astype(mx.float32)).astype(np.float64)
        block = np.arange(tol.shape[-1]) // compact_groups_per_block(576, fmt.group_size)
        tol = tol + (qmax * steps[:, block, 0] + steps[:, block, 1]) / 2
    err = np.abs(read.reshape(ref.shape) - ref).max(-1)
    assert np.all(err <= tol), float((err / tol).max())


def test_validation() -> None:
    fmt = Format(COMPACT, 4, 32, native=False)
    arrays = random_quantized(np.random.default_rng(0), fmt, 4, 128)
    with pytest.raises(ValueError, match="missing"):
        ops.dequantize({k: v for k, v in arrays.items() if k != "super_scales"}, fmt)
    with pytest.raises(ValueError, match="features"):
        ops.quantized_matmul(mx.zeros((1, 64)), arrays, fmt)
    with pytest.raises(ValueError, match="group_size"):
        ops.dequantize(arrays, Format(COMPACT, 4, 128, native=False))
    with pytest.raises(ValueError, match="stack"):
        ops.gather_quantized_matmul(mx.zeros((1, 1, 128)), arrays, fmt, mx.array([0]))
    with pytest.raises(ValueError, match="float16"):
        ops.quantized_matmul(mx.zeros((1, 128), dtype=mx.int32), arrays, fmt)
