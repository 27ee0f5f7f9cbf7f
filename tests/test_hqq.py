"""HQQ scales (issue 22): MLX's packing, never worse than RTN in HQQ's own objective, the
solver as the paper writes it, stock loading, and their own analysis cache."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import Format
from mint_mlx.quant.hqq import BETA, ITERATIONS, KAPPA, LP_NORM, hqq_affine, hqq_fit
from mint_mlx.quant.quantize import dequantize_weight, quantize_weight


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((0.02 * rng.standard_t(4, size=shape)).astype(np.float32))


def unpack_bitstream(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing read back bit by bit (each row a little-endian, LSB-first stream), written
    independently of :func:`mint_mlx.quant.scales.pack_numpy`."""
    rows = packed.reshape(-1, packed.shape[-1]).astype(np.uint64)
    stream = np.unpackbits(rows.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    n = stream.shape[-1] // bits
    weights = (1 << np.arange(bits)).astype(np.int64)
    codes = (stream[:, : n * bits].reshape(rows.shape[0], n, bits) * weights).sum(-1)
    return codes.reshape(*packed.shape[:-1], n)


def model_weights(src: Path) -> dict[str, mx.array]:
    """The 2-D quantizable weights of a tiny model's checkpoint, as float32."""
    out: dict[str, mx.array] = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            if k.endswith(".weight") and v.ndim == 2 and "norm" not in k:
                out[k] = v.astype(mx.float32)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_hqq_output_is_mx_quantize_format(bits: int, dtype: mx.Dtype) -> None:
    """(a) Same arrays, dtypes and shapes as ``mx.quantize``; ``mx.dequantize`` of them is
    s * q + b with q the round-to-nearest codes of the *stored* (s, b), recomputed here in
    float64 and unpacked bit by bit."""
    for shape in ((16, 256), (2, 8, 128)):
        w = heavy_tailed(shape, seed=bits)
        cols = mx.array(np.random.default_rng(1).gamma(0.5, size=shape[-1]).astype(np.float32))
        for group in (32, 64, 128):
            wq, s, b = hqq_affine(w, bits, group, dtype, cols)
            ref = mx.quantize(w.astype(dtype), group_size=group, bits=bits)
            for mine, theirs in zip((wq, s, b), ref, strict=True):
                assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            sn = np.array(s.astype(mx.float32)).astype(np.float64)[..., None]
            bn = np.array(b.astype(mx.float32)).astype(np.float64)[..., None]
            x = np.array(w).astype(np.float64).reshape(*sn.shape[:-1], group)
            q_ind = np.clip(np.rint((x - bn) / sn), 0, 2**bits - 1)
            q_packed = unpack_bitstream(np.array(wq), bits).reshape(q_ind.shape)
            # the packed codes are the rounding of the stored values (float32 vs float64:
            # an exact tie may round either way)
            assert np.mean(q_packed != q_ind) < 1e-3, (bits, group)
            stock = mx.dequantize(
                wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits
            )
            manual = (sn * q_packed + bn).reshape(w.shape)
            assert np.allclose(np.array(stock), manual, rtol=0, atol=1e-6), (bits, group)


def _lp_per_group(w: np.ndarray, restored: np.ndarray, cols: np.ndarray, group: int) -> np.ndarray:
    d = np.abs(w.astype(np.float64) - restored.astype(np.float64)) ** LP_NORM * cols
    return d.reshape(w.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("weighted", [False, True])
def test_hqq_never_worse_than_rtn_in_its_own_objective(tiny_llama: Path, weighted: bool) -> None:
    """(b) On a tiny model's weights, per group: HQQ's stored result has an lp error (p < 1,
    column-weighted where weights are given) no larger than MLX's round-to-nearest; and
    strictly smaller in total (the solver does something)."""
    weights = model_weights(tiny_llama)
    assert len(weights) >= 7
    rng = np.random.default_rng(0)
    total_rtn = total_hqq = 0.0
    for name, w in weights.items():
        n = w.shape[-1]
        cols = rng.gamma(0.5, size=n).astype(np.float32) if weighted else np.ones(n, np.float32)
        for bits in (2, 3, 4):
            for group in (32, 64):
                if n % group:
                    continue
                fmt = Format("affine", bits, group)
                c = mx.array(cols) if weighted else None
                hqq = dequantize_weight(quantize_weight(w, fmt, mx.bfloat16, "hqq", c), fmt)
                rtn = dequantize_weight(quantize_weight(w, fmt, mx.bfloat16, "rtn", c), fmt)
                wn = np.array(w)
                e_h = _lp_per_group(wn, np.array(hqq), cols, group)
                e_r = _lp_per_group(wn, np.array(rtn), cols, group)
                worse = e_h > e_r * (1 + 1e-5) + 1e-12
                assert not worse.any(), (name, bits, group, int(worse.sum()))
                total_rtn += float(e_r.sum())
                total_hqq += float(e_h.sum())
    assert total_hqq < 0.99 * total_rtn


def _hqq_reference(x: np.ndarray, c: np.ndarray, bits: int) -> float:
    """HQQ on one group, written out as the paper's loop in float64: fixed min/max scale,
    zero from -min/s, shrink, weighted-mean zero update, beta *= kappa, stop when the lp
    error stops falling. Returns the best zero."""
    qmax = 2**bits - 1
    s = (x.max() - x.min()) / qmax
    z = -x.min() / s
    beta, best, best_z = BETA, np.inf, z
    for _ in range(ITERATIONS):
        wq = np.clip(np.rint(x / s + z), 0, qmax)
        err = x - (wq - z) * s
        lp = float((c * np.abs(err) ** LP_NORM).sum())
        if lp >= best:
            break
        best, best_z = lp, z
        a = np.abs(err)
        we = np.sign(err) * np.maximum(a - (a + 1e-8) ** (LP_NORM - 1) / beta, 0)
        z = float((c * (wq - (x - we) / s)).sum() / c.sum())
        beta *= KAPPA
    return best_z


@pytest.mark.parametrize("magnitude", [1.0, 30.0])
def test_solver_follows_the_paper(magnitude: float) -> None:
    """The vectorized solver gives the per-group loop's zero (before storage rounding, seen
    through float32 scales and biases). At LLM magnitudes the shrink is zero everywhere; at
    30x it is active, so both regimes are covered."""
    from mint_mlx.quant.hqq import _solve_zero

    rng = np.random.default_rng(3)
    g, m = 64, 200
    x = (magnitude * 0.02 * rng.standard_t(3, size=(g, m))).astype(np.float32)
    c = rng.gamma(0.5, size=(g, m)).astype(np.float32)
    s = (x.max(0) - x.min(0)) / np.float32(15)
    z = _solve_zero(x, c, s, -x.min(0) / s, 15.0, ITERATIONS)
    ref = np.array([_hqq_reference(x[:, j].astype(np.float64), c[:, j], 4) for j in range(m)])
    close = np.abs(z - ref) <= 1e-3 * np.maximum(1.0, np.abs(ref))
    assert close.mean() > 0.97, close.mean()  # float32 vs float64: a rare early-stop flip
    if magnitude > 1:  # the shrink moved the zero away from the plain mean update
        assert not np.allclose(ref, _plain_mean_zero(x.astype(np.float64), c, s, 4), atol=1e-3)


def _plain_mean_zero(x: np.ndarray, c: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """The same loop with the shrink left out (W_e = 0): the zero HQQ would give without it."""
    qmax = 2**bits - 1
    out = []
    for j in range(x.shape[1]):
        xs, cs, sj = x[:, j], c[:, j], float(s[j])
        z, best, best_z = -xs.min() / sj, np.inf, 0.0
        for _ in range(ITERATIONS):
            wq = np.clip(np.rint(xs / sj + z), 0, qmax)
            lp = float((cs * np.abs(xs - (wq - z) * sj) ** LP_NORM).sum())
            if lp >= best:
                break
            best, best_z = lp, z
            z = float((cs * (wq - xs / sj)).sum() / cs.sum())
        out.append(best_z)
    return np.array(out)


def test_analysis_error_is_the_error_of_what_save_writes() -> None:
    """The allocator is shown the squared error of exactly the arrays HQQ saves (2-D and
    expert stacks, weighted and plain)."""
    from mint_mlx.quant.quantize import squared_error

    for shape, cols_shape in (((70, 384), (384,)), ((3, 24, 256), (3, 256))):
        w = heavy_tailed(shape, seed=11)
        cols = mx.array(np.random.default_rng(4).gamma(0.5, size=cols_shape).astype(np.float32))
        fmt = Format("affine", 3, 64)
        fit = hqq_fit(w, 3, 64, mx.bfloat16, cols)
        restored = dequantize_weight(quantize_weight(w, fmt, mx.bfloat16, "hqq", cols), fmt)
        d2 = (restored - w) ** 2
        cw = cols if cols.ndim == 1 else cols[:, None, :]
        assert abs(float(d2.sum().item()) / float(fit.plain_error.sum().item()) - 1) < 1e-5
        weighted = float((d2 * cw).sum().item())
        assert abs(weighted / float(fit.weighted_error.sum().item()) - 1) < 1e-5
        if len(shape) == 2:
            plain, wsum = squared_error(w, fmt, mx.bfloat16, cols, "hqq")
            assert wsum is not None and abs(float(wsum.item()) / weighted - 1) < 1e-5


def test_extended_formats_take_hqq_scales() -> None:
    """Group 16/256 and compact scales are fitted by HQQ too (then stored their way)."""
    from mint_mlx.formats import format_by_name

    w = heavy_tailed((8, 512), seed=2)
    for name in ("affine-4-g256", "affine-4-g32-cs"):
        fmt = format_by_name(name)
        hqq = dequantize_weight(quantize_weight(w, fmt, mx.bfloat16, "hqq"), fmt)
        opt = dequantize_weight(quantize_weight(w, fmt, mx.bfloat16, "optimized"), fmt)
        assert float(((hqq - w) ** 2).sum().item()) < 2 * float(((opt - w) ** 2).sum().item())
        assert not mx.array_equal(hqq, opt).item()


def test_hqq_conversion_loads_in_stock_mlx_lm(tiny_llama: Path, tmp_path: Path) -> None:
    """(c) A ``--scales hqq`` conversion is plain MLX affine: stock mlx-lm loads it and
    generates, in a process that never imports mint_mlx."""
    from mint_mlx.allocation.allocate import Plan
    from mint_mlx.convert import convert

    from test_convert import stock_load, weight_bytes

    out = tmp_path / "out"
    result = convert(tiny_llama, out, bpw=4.5, scales="hqq")
    assert weight_bytes(out) == result.plan.total_bytes <= result.plan.budget
    assert Plan.load(out / "mint_plan.json").scales == "hqq"
    info = stock_load(out)
    assert not info["mint_imported"] and info["finite"]
    assert isinstance(info["text"], str) and info["text"]


def test_cli_accepts_hqq_and_refuses_unknown(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mint_mlx.convert import main
    from mint_mlx.errors import MintError
    from mint_mlx.plan import plan

    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"]
    assert main([*args, "--scales", "hqq", "--dry-run", "--quiet"]) == 0
    with pytest.raises(MintError, match="unknown scale method"):
        plan(tiny_llama, budgets=["1MB"], scales="hq")
    capsys.readouterr()


def test_analysis_cache_keys_differ_between_scale_methods(tiny_llama: Path) -> None:
    """(d) Each scale method gets its own analysis cache: an hqq plan never reuses the curves
    of another method (with the same candidate set, only the key tells them apart)."""
    from mint_mlx.analysis.analyze import cache_key, default_cache_path
    from mint_mlx.formats import formats_for
    from mint_mlx.quant.quantize import SCALE_METHODS
    from mint_mlx.source.model import open_source

    source = open_source(tiny_llama)
    fitted = formats_for("fisher", "hqq")
    assert fitted == formats_for("fisher", "optimized")  # same candidates as the default
    keys = {cache_key(source, fitted, mx.bfloat16, "cal", s) for s in SCALE_METHODS}
    paths = {default_cache_path(source, fitted, mx.bfloat16, "cal", s) for s in SCALE_METHODS}
    assert len(keys) == len(SCALE_METHODS) == len(paths) == 4
