"""Optimized affine scales: same packing as MLX, never worse than MLX's rule, loadable as is."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import Format
from mint_mlx.quant.quantize import dequantize_weight, quantize_weight
from mint_mlx.quant.scales import optimized_affine, pack_codes, unpack_codes


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((0.02 * rng.standard_t(4, size=shape)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packing_matches_mlx(bits: int, group: int) -> None:
    w = heavy_tailed((8, 256), seed=bits)
    wq, _, _ = mx.quantize(w, group_size=group, bits=bits)
    codes = unpack_codes(wq, bits)
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
    codes = unpack_codes(wq, 4).reshape(16, 4, 32)
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

    # each expert's own columns steer its fit: under those columns every expert's error is
    # clearly below the unweighted fit's and below a fit steered by another expert's columns
    # (the columns rolled by one expert), so ignoring them, or sharing one expert's, fails
    rolled = optimized_affine(w, 3, 64, mx.float16, mx.roll(columns, 1, axis=0))
    own, plain, other = (expert_errors(a) for a in (weighted, unweighted, rolled))
    for e in range(3):
        assert own[e] < 0.9 * plain[e], (e, own[e], plain[e])
        assert own[e] < 0.9 * other[e], (e, own[e], other[e])


@pytest.mark.parametrize("scales", ["rtn", "optimized"])
@pytest.mark.parametrize("name", ["affine-3-g64", "affine-4-g32", "mxfp4", "fp16"])
def test_saving_in_row_blocks_gives_the_same_arrays(scales: str, name: str) -> None:
    """Save quantizes big tensors block by block to bound memory: rows are independent, so
    the result must be the whole-tensor result exactly (2-D and expert stacks)."""
    from mint_mlx.formats import format_by_name
    from mint_mlx.quant.quantize import quantize_in_chunks

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


# ----------------------------------------------------------------- the numpy fast path


def _per_group_reference(
    w: np.ndarray, cols: np.ndarray | None, bits: int, group: int, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The fit written out group by group in float64 (only the storage rounding is shared
    with MLX, through its own cast): (weighted error, plain error) per group of the kept
    (scale, bias), shape (rows, groups)."""

    def rnd(v: float) -> float:
        return float(mx.array(np.float32(v)).astype(dtype).astype(mx.float32).item())

    rows, n = w.shape
    qmax = 2**bits - 1
    _, s0, b0 = mx.quantize(mx.array(w).astype(dtype), group_size=group, bits=bits)
    s0n, b0n = np.array(s0.astype(mx.float32)), np.array(b0.astype(mx.float32))
    out_w = np.zeros((rows, n // group))
    out_p = np.zeros((rows, n // group))
    for r in range(rows):
        for k in range(n // group):
            x = w[r, k * group : (k + 1) * group].astype(np.float64)
            c = np.ones(group) if cols is None else cols[k * group : (k + 1) * group].astype(float)

            def errors(
                s: float, b: float, x: np.ndarray = x, c: np.ndarray = c
            ) -> tuple[float, float, np.ndarray]:
                q = np.clip(np.rint((x - b) / (s if s != 0 else 1.0)), 0, qmax)
                d2 = (x - (s * q + b)) ** 2
                return float((c * d2).sum()), float(d2.sum()), q

            best = errors(s0n[r, k], b0n[r, k])[:2]
            s, b = rnd((x.max() - x.min()) / qmax), rnd(x.min())
            for _ in range(4):
                err_w, err_p, q = errors(s, b)
                if err_w < best[0]:
                    best = (err_w, err_p)
                a = np.array([[(c * q * q).sum(), (c * q).sum()], [(c * q).sum(), c.sum()]])
                rhs = np.array([(c * q * x).sum(), (c * x).sum()])
                if abs(np.linalg.det(a)) > 1e-12 * abs(a[0, 0] * a[1, 1]):
                    s_new, b_new = np.linalg.solve(a, rhs)
                    s, b = rnd(s_new), rnd(b_new)
            out_w[r, k], out_p[r, k] = best
    return out_w, out_p


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_matches_a_per_group_reference(bits: int, weighted: bool) -> None:
    from mint_mlx.quant.scales import fit_affine

    w = np.array(heavy_tailed((6, 256), seed=bits))
    w[0, :64] = 0.0  # a zero group and a constant one: no division by a zero scale
    w[1, :64] = 0.03
    cols = np.random.default_rng(3).gamma(0.5, size=256).astype(np.float32) if weighted else None
    for group in (32, 64):
        fit = fit_affine(
            mx.array(w), bits, group, mx.bfloat16, None if cols is None else mx.array(cols)
        )
        ref_w, ref_p = _per_group_reference(w, cols, bits, group, mx.bfloat16)
        got_w = np.array(fit.weighted_error)[..., 0]
        got_p = np.array(fit.plain_error)[..., 0]
        assert np.isfinite(got_w).all() and got_w[0, 0] == 0.0
        # float32 sums vs float64 ones: the same candidates, errors equal to rounding
        assert np.allclose(got_w, ref_w, rtol=1e-4, atol=1e-9), (group, np.abs(got_w - ref_w).max())
        assert np.allclose(got_p, ref_p, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_incumbent_is_mx_quantize_scale_and_bias(dtype: mx.Dtype) -> None:
    from mint_mlx.quant.scales import mlx_scales, storage_rounder

    w = np.array(heavy_tailed((32, 512), seed=7))
    w[0, :128], w[1, :128], w[2, :128] = 0.0, 0.5, -0.01  # zero and constant groups
    w[3] *= 1e-4
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            _, s0, b0 = mx.quantize(mx.array(w).astype(dtype), group_size=group, bits=bits)
            x = w.reshape(32, -1, group)
            s, b = mlx_scales(x.min(-1), x.max(-1), bits, storage_rounder(dtype))
            assert np.array_equal(s, np.array(s0.astype(mx.float32))), (bits, group)
            assert np.array_equal(b, np.array(b0.astype(mx.float32))), (bits, group)


def test_storage_rounding_is_mlx_cast() -> None:
    from mint_mlx.quant.scales import storage_rounder

    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1 << 16) * np.exp(rng.uniform(-50, 50, 1 << 16))).astype(np.float32)
    a[:8] = [0.0, -0.0, 1e-45, 3.3e38, -3.3e38, 1.0000001, 65520.0, np.inf]
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        mine = storage_rounder(dtype)(a)
        theirs = np.array(mx.array(a).astype(dtype).astype(mx.float32))
        assert np.array_equal(mine, theirs), dtype


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_fit_agrees_with_the_pure_mlx_reference(bits: int) -> None:
    """The fit it replaced: same candidates, so the same errors up to float summation order."""
    from mint_mlx.quant.scales import optimized_affine_error
    from mint_mlx.tools.scales_reference import optimized_affine_error_reference

    w = heavy_tailed((96, 512), seed=bits)
    cols = mx.array(np.random.default_rng(bits).gamma(0.5, size=512).astype(np.float32))
    for group in (32, 128):
        for c in (None, cols):
            new = optimized_affine_error(w, bits, group, mx.bfloat16, c)
            old = optimized_affine_error_reference(w, bits, group, mx.bfloat16, c)
            for a, b in zip(new, old, strict=True):
                if a is None or b is None:
                    assert a is None and b is None
                    continue
                assert abs(float(a.item()) / float(b.item()) - 1) < 1e-4, (group, c is None)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_transposed_packing_is_mlx_packing(bits: int) -> None:
    """Save packs codes in the fit's transposed block layout: the same words as mx.quantize."""
    from mint_mlx.quant.scales import _pack_transposed

    w = heavy_tailed((8, 768), seed=bits)
    for group in (32, 64, 128):
        wq, _, _ = mx.quantize(w, group_size=group, bits=bits)
        codes = np.array(unpack_codes(wq, bits)).reshape(-1, group)  # (m, g)
        packed = _pack_transposed(np.ascontiguousarray(codes.T), bits).reshape(8, -1)
        assert np.array_equal(packed, np.array(wq)), group


@pytest.mark.parametrize("weighted", [False, True])
def test_analysis_error_is_the_error_of_what_save_writes(
    weighted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error the analysis reports (no packing) is the error of the saved arrays, whatever
    the block size and thread count the fit runs with (expert stacks included)."""
    import mint_mlx.quant.scales as scales

    for shape, cols_shape in (((70, 384), (384,)), ((3, 24, 256), (3, 256))):
        w = heavy_tailed(shape, seed=11)
        cols = mx.array(np.random.default_rng(4).gamma(0.5, size=cols_shape).astype(np.float32))
        c = cols if weighted else None
        plain, wsum = scales.optimized_affine_error(w, 3, 64, mx.bfloat16, c)
        wq, s, b = scales.optimized_affine(w, 3, 64, mx.bfloat16, c)
        restored = mx.dequantize(
            wq, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=3
        )
        d2 = (restored - w) ** 2
        assert abs(float(d2.sum().item()) / float(plain.item()) - 1) < 1e-5
        if weighted:
            cw = cols if cols.ndim == 1 else cols[:, None, :]
            assert wsum is not None
            assert abs(float((d2 * cw).sum().item()) / float(wsum.item()) - 1) < 1e-5
        monkeypatch.setattr(scales, "BLOCK_ELEMENTS", 1000)  # ragged blocks of a few rows
        for threads in (1, 3):
            monkeypatch.setattr(scales, "THREADS", threads)
            again = scales.optimized_affine(w, 3, 64, mx.bfloat16, c)
            for x, y in zip(again, (wq, s, b), strict=True):
                assert mx.array_equal(x, y).item()
        monkeypatch.undo()


@pytest.mark.parametrize("stored", [mx.bfloat16, mx.float16])
def test_a_16_bit_weight_fits_exactly_as_its_float32_values(stored: mx.Dtype) -> None:
    """The fit widens 16-bit weights block by block (bfloat16 through its bit patterns); the
    result must be bit-identical to fitting the same values handed over as float32, strided
    views included."""
    from mint_mlx.quant.scales import fit_affine, pack_for

    w16 = heavy_tailed((96, 384), seed=7).astype(stored)
    w32 = w16.astype(mx.float32)
    cols = mx.array(np.random.default_rng(5).gamma(0.5, size=384).astype(np.float32))
    for bits, group in ((4, 64), (3, 32), (8, 128)):
        got = optimized_affine(w16, bits, group, mx.bfloat16, cols)
        want = optimized_affine(w32, bits, group, mx.bfloat16, cols)
        for g_arr, w_arr in zip(got, want, strict=True):
            assert mx.array_equal(g_arr, w_arr).item(), (bits, group)
        fit = fit_affine(w16, bits, group, mx.bfloat16, cols)
        assert mx.array_equal(pack_for(w16, fit.scales, fit.biases, bits, group), want[0]).item()
    # a strided view (every other row of a larger 16-bit tensor) is read correctly too
    wide = heavy_tailed((192, 384), seed=8).astype(stored)
    view = wide[::2]
    got = optimized_affine(view, 4, 64, mx.bfloat16, cols)
    want = optimized_affine(view.astype(mx.float32), 4, 64, mx.bfloat16, cols)
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want, strict=True))
