"""Optimized affine scales: same packing as MLX, never worse than MLX's rule, loadable as is."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import Format
from mint_mlx.quantize import dequantize_weight, quantize_weight
from mint_mlx.scales import optimized_affine, pack_codes, unpack_codes


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((0.02 * rng.standard_t(4, size=shape)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packing_matches_mlx(bits: int, group: int) -> None:
    w = heavy_tailed((8, 256), seed=bits)
    wq, _, _ = mx.quantize(w, group_size=group, bits=bits)
    codes = unpack_codes(wq, bits, group)
    assert float(codes.max().item()) <= 2**bits - 1
    assert mx.array_equal(pack_codes(codes, bits), wq).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_never_worse_than_round_to_nearest(bits: int, dtype: mx.Dtype) -> None:
    w = heavy_tailed((64, 512), seed=1)
    columns = mx.array(np.random.default_rng(2).gamma(0.5, size=512).astype(np.float32))
    fmt = Format("affine", bits, 64)

    def weighted_error(scales: str) -> float:
        restored = dequantize_weight(quantize_weight(w, fmt, dtype, scales, columns), fmt)
        return float((((restored - w) ** 2) * columns).sum().item())

    rtn, opt = weighted_error("rtn"), weighted_error("optimized")
    assert opt <= rtn
    assert opt < 0.95 * rtn  # and it actually helps on heavy-tailed weights


def test_scales_are_stored_in_the_output_dtype_and_reproduce_exactly() -> None:
    w = heavy_tailed((16, 128))
    wq, s, b = optimized_affine(w, 4, 32, mx.bfloat16)
    assert s.dtype == mx.bfloat16 and b.dtype == mx.bfloat16 and wq.dtype == mx.uint32
    assert wq.shape == (16, 16) and s.shape == (16, 4)
    # what stock MLX computes from the saved arrays is s * code + b, with codes in range
    codes = unpack_codes(wq, 4, 32).reshape(16, 4, 32)
    manual = (s.astype(mx.float32)[..., None] * codes + b.astype(mx.float32)[..., None]).reshape(
        16, 128
    )
    stock = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=4)
    assert mx.allclose(manual, stock, atol=1e-6).item()


def test_expert_stacks_use_per_expert_columns() -> None:
    w = heavy_tailed((3, 32, 128))
    columns = mx.array(np.random.default_rng(5).gamma(0.3, size=(3, 128)).astype(np.float32))
    weighted = optimized_affine(w, 3, 64, mx.float16, columns)
    unweighted = optimized_affine(w, 3, 64, mx.float16, None)
    assert weighted[0].shape == (3, 32, 12) and weighted[1].shape == (3, 32, 2)

    def expert_errors(arrays: tuple[mx.array, mx.array, mx.array]) -> list[float]:
        restored = mx.dequantize(
            arrays[0],
            arrays[1].astype(mx.float32),
            arrays[2].astype(mx.float32),
            group_size=64,
            bits=3,
        )
        err = ((restored - w) ** 2) * columns[:, None, :]
        return [float(err[e].sum().item()) for e in range(3)]

    # each expert's own columns steer its fit: weighted error no worse for every expert
    for fitted, plain in zip(expert_errors(weighted), expert_errors(unweighted), strict=True):
        assert fitted <= plain * (1 + 1e-6)


@pytest.mark.parametrize("scales", ["rtn", "optimized"])
@pytest.mark.parametrize("name", ["affine-3-g64", "affine-4-g32", "mxfp4", "fp16"])
def test_saving_in_row_blocks_gives_the_same_arrays(scales: str, name: str) -> None:
    """Save quantizes big tensors block by block to bound memory: rows are independent, so
    the result must be the whole-tensor result exactly (2-D and expert stacks)."""
    from mint_mlx.formats import format_by_name
    from mint_mlx.quantize import quantize_in_chunks

    fmt = format_by_name(name)
    for shape, cols_shape in (((37, 256), (256,)), ((3, 20, 128), (3, 128))):
        w = heavy_tailed(shape, seed=len(shape))
        cols = mx.array(np.random.default_rng(1).gamma(0.5, size=cols_shape).astype(np.float32))
        whole = quantize_weight(w, fmt, mx.bfloat16, scales, cols)
        blocks = quantize_in_chunks(w, fmt, mx.bfloat16, scales, cols, chunk_elements=5 * 256)
        assert whole.keys() == blocks.keys()
        for k in whole:
            assert whole[k].shape == blocks[k].shape, k
            assert mx.array_equal(whole[k], blocks[k]).item(), (name, shape, k)
