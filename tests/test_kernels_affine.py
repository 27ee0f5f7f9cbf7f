"""The affine qmv Metal kernel (metal/qmv.metal), run through the CPU emulator, against the
pure-MLX reference; and the reference against MLX's own quantization where MLX has it."""

from __future__ import annotations

import re
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from test_metal_harness import mlx_generated_source

from mint_mlx.quant.scales import unpack_codes
from mint_mlx.runtime.kernels import affine
from mint_mlx.runtime.kernels.affine import affine_qmv, affine_qmv_call, affine_qmv_spec
from mint_mlx.runtime.kernels.reference import affine_qmv_reference, dequantize_affine
from mint_mlx.tools.emulator.emulate import emulate_call, find_compiler, run_call

needs_cxx = pytest.mark.skipif(
    find_compiler() is None,
    reason="g++ not found: the Metal emulator compiles kernels with a C++ compiler "
    "(apt-get install g++, or set MINT_MLX_CXX)",
)

# Relative to max |y|: float32 differs from the reference only by summation order; fp16 and bf16
# outputs are additionally rounded once (half an ulp: 2**-11 and 2**-8).
TOLERANCE = {mx.float32: 2e-5, mx.float16: 1.5e-3, mx.bfloat16: 1.2e-2}


def random_qmatrix(rng: np.random.Generator, out: int, inn: int, bits: int, group: int, dtype):
    """Random packed words (every bit pattern is a valid matrix) with small scales and biases."""
    words = rng.integers(0, 2**32, size=(out, inn * bits // 32), dtype=np.uint64)
    w = mx.array(words.astype(np.uint32))
    scale = 1.0 / (2**bits)
    s = mx.array(rng.uniform(0.5, 1.5, size=(out, inn // group)).astype(np.float32) * scale)
    b = mx.array(rng.normal(size=(out, inn // group)).astype(np.float32) * 0.5)
    return w, s.astype(dtype), b.astype(dtype)


def run_case(bits, group, dtype, batch, out, inn, seed=0, **options):
    rng = np.random.default_rng(seed)
    w, s, b = random_qmatrix(rng, out, inn, bits, group, dtype)
    x = mx.array(rng.normal(size=(batch, inn)).astype(np.float32)).astype(dtype)
    call = affine_qmv_call(x, w, s, b, bits, group)
    (y,) = run_call(affine_qmv_spec(), call, **options)
    ref = affine_qmv_reference(x, w, s, b, bits, group)
    ref = np.array(ref.astype(dtype).astype(mx.float32))
    return y, ref


def assert_close(y: np.ndarray, ref: np.ndarray, dtype) -> None:
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= TOLERANCE[dtype], f"max error {err:.3g} relative to max |y|"


# ------------------------------------------------------------------------------------------------
# Reference path


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_an_lsb_first_bit_stream(bits: int) -> None:
    # Quantize a row whose levels we know, and read the words as one little-endian bit stream.
    levels = np.arange(64) % (2**bits)
    levels[:2] = [0, 2**bits - 1]
    wq, s, b = mx.quantize(mx.array(levels[None].astype(np.float32)), group_size=64, bits=bits)
    q = np.round((levels - np.array(b)[0, 0]) / np.array(s)[0, 0]).astype(np.int64)
    stream = np.unpackbits(np.array(wq)[0].view(np.uint8), bitorder="little")
    decoded = [int((stream[j * bits : (j + 1) * bits] << np.arange(bits)).sum()) for j in range(64)]
    assert decoded == list(q)
    assert list(np.array(unpack_codes(wq, bits))[0]) == list(q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_matches_mlx(bits: int, group: int) -> None:
    w = mx.random.normal((24, 384), key=mx.random.key(bits * 1000 + group)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    ours = dequantize_affine(wq, s, b, bits, group)
    theirs = mx.dequantize(
        wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits
    )
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-6, atol=1e-6)


def test_reference_matches_mlx_quantized_matmul() -> None:
    x = mx.random.normal((3, 512), key=mx.random.key(1))
    w = mx.random.normal((40, 512), key=mx.random.key(2))
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    ours = affine_qmv_reference(x, wq, s, b, 4, 64)
    theirs = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4, atol=1e-4)


def test_affine_qmv_without_metal_uses_the_reference() -> None:
    if mx.metal.is_available():
        pytest.skip("a Metal GPU is available: affine_qmv runs the kernel")
    rng = np.random.default_rng(5)
    w, s, b = random_qmatrix(rng, 20, 256, 4, 256, mx.float16)
    x = mx.array(rng.normal(size=(2, 3, 256)).astype(np.float16))
    y = affine_qmv(x, w, s, b, 4, 256)
    assert y.shape == (2, 3, 20) and y.dtype == mx.float16
    ref = affine_qmv_reference(x, w, s, b, 4, 256).astype(mx.float16)
    np.testing.assert_array_equal(np.array(y), np.array(ref))


def test_shape_validation() -> None:
    rng = np.random.default_rng(6)
    w, s, b = random_qmatrix(rng, 8, 128, 4, 64, mx.float32)
    with pytest.raises(ValueError, match="group_size"):
        affine_qmv_call(mx.zeros((1, 128)), w, s, b, 4, 48)
    with pytest.raises(ValueError, match="shape"):
        affine_qmv_call(mx.zeros((1, 128)), w, s, b, 4, 32)
    with pytest.raises(ValueError, match="x must have shape"):
        affine_qmv_call(mx.zeros((1, 64)), w, s, b, 4, 64)


def test_launch_constants_match_the_kernel_source() -> None:
    header = affine_qmv_spec().header
    for name in ("QMV_SIMDGROUPS", "QMV_ROWS"):
        m = re.search(rf"constexpr int {name} = (\d+);", header)
        assert m and int(m.group(1)) == getattr(affine, name)


def test_kernel_source_is_what_mlx_generates() -> None:
    rng = np.random.default_rng(8)
    w, s, b = random_qmatrix(rng, 16, 256, 3, 32, mx.bfloat16)
    x = mx.array(rng.normal(size=(2, 256)).astype(np.float32)).astype(mx.bfloat16)
    call = affine_qmv_call(x, w, s, b, 3, 32)
    spec = affine_qmv_spec()
    ref = mlx_generated_source(
        spec, list(call.inputs), list(call.output_shapes), list(call.output_dtypes), call.template
    )
    if ref is None:
        pytest.skip("this MLX cannot export a custom kernel call without Metal")
    assert spec.metal_source(call.inputs, call.output_dtypes, call.template) == ref


# ------------------------------------------------------------------------------------------------
# The kernel in the emulator


@needs_cxx
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
def test_kernel_all_formats_float32(bits: int, group: int) -> None:
    # out=13: not a multiple of the 8-row tile; in=768: 24 of the 32 lanes busy, no full stride.
    y, ref = run_case(bits, group, mx.float32, batch=1, out=13, inn=768, seed=bits * 7 + group)
    assert_close(y, ref, mx.float32)


SHAPES = [
    # bits, group, dtype, batch, out, in
    (4, 16, mx.float32, 1, 1, 48),  # one row; a ragged half pack per row
    (2, 16, mx.float16, 7, 8, 1040),  # exactly one tile; 1024 + 16: one lane gets a half pack
    (6, 16, mx.bfloat16, 7, 37, 2064),  # several strides over the row, ragged end
    (8, 16, mx.float16, 1, 200, 16),  # a single half pack per row, many rows
    (3, 32, mx.float16, 7, 37, 2080),  # lanes loop 2-3 times
    (5, 64, mx.bfloat16, 7, 9, 4096),
    (4, 128, mx.bfloat16, 1, 64, 1152),
    (3, 256, mx.float16, 7, 5, 512),
    (5, 256, mx.float32, 7, 130, 3072),
    (8, 128, mx.bfloat16, 7, 3, 128),
    (6, 64, mx.float16, 1, 17, 64),
    (2, 32, mx.float32, 7, 1, 32),  # a single pack, a single row
]


@needs_cxx
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"b{c[0]}g{c[1]}{str(c[2])[9:]}x{c[3:]}")
def test_kernel_shapes_and_dtypes(case) -> None:
    bits, group, dtype, batch, out, inn = case
    y, ref = run_case(bits, group, dtype, batch, out, inn, seed=out + inn)
    assert_close(y, ref, dtype)


@needs_cxx
def test_kernel_is_schedule_independent() -> None:
    results = [
        run_case(3, 16, mx.float32, 2, 21, 96, schedule=s, seed=4)[0]
        for s in ("forward", "reverse", "shuffle")
    ]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


@needs_cxx
def test_kernel_checks_ran() -> None:
    rng = np.random.default_rng(9)
    w, s, b = random_qmatrix(rng, 13, 256, 5, 32, mx.float16)
    x = mx.array(rng.normal(size=(2, 256)).astype(np.float16))
    call = affine_qmv_call(x, w, s, b, 5, 32)
    res = emulate_call(affine_qmv_spec(), call)
    assert res.error is None
    assert res.stats["threadgroups"] == 2 * 2  # 2 tiles of 8 rows x 2 batch rows
    assert res.stats["collectives"] == 2 * 2 * 2 * 4  # per simdgroup: one simd_sum per row
    assert res.stats["checked_accesses"] > w.size  # every weight word was bounds-checked


@needs_cxx
def test_a_wrong_kernel_fails_the_comparison() -> None:
    # The comparison must be able to fail: read the packed values in the wrong order.
    spec = affine_qmv_spec()
    broken = replace(
        spec,
        source=spec.source.replace("qmv_value<bits>(words, j)", "qmv_value<bits>(words, j ^ 1)"),
    )
    assert broken.source != spec.source
    rng = np.random.default_rng(10)
    w, s, b = random_qmatrix(rng, 8, 256, 3, 64, mx.float32)
    x = mx.array(rng.normal(size=(1, 256)).astype(np.float32))
    (y,) = run_call(broken, affine_qmv_call(x, w, s, b, 3, 64))
    ref = np.array(affine_qmv_reference(x, w, s, b, 3, 64))
    with pytest.raises(AssertionError):
        assert_close(y, ref, mx.float32)
