"""HQQ scales: Half-Quadratic Quantization's zero-point solver, in exactly MLX's affine format.

HQQ (Badri & Shaji 2023) fits each group's zero-point without calibration data by minimizing
an lp-norm (p < 1) of the weight error, which down-weights a group's few large errors
(outliers) against its many small ones. The scale stays at min/max; the zero z is found by
half-quadratic splitting, alternating

    W_q = clip(round(W / s + z))                      codes for the current zero
    W_e = shrink_p(W - (W_q - z) * s, beta)           generalized soft-threshold of the error
    z   = mean(W_q - (W - W_e) / s)                   closed-form zero update
    beta *= kappa

with shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / beta) and the paper's defaults p = 0.7,
beta = 10, kappa = 1.01, 20 rounds, stopping when the error stops falling. It is here as an
option (``--scales hqq``) and a measured baseline (issue 22), not because it was expected to
win: the MINT authors report that HQQ lowered their weight error but raised perplexity.

Our adaptations, each so that HQQ is measured on the same footing as the other methods:

- **Column weights.** Where the analysis has Fisher column weights c, the lp objective is
  sum c |e|^p and the zero update is the c-weighted mean (the shrink is per element, so c
  cancels from it). Without them every column weighs 1, as in HQQ.
- **Per group early stop.** HQQ stops the whole tensor at the first round whose mean error
  does not fall; here each group stops at its own first such round and keeps its best zero
  (every group's result depends only on its own weights, as in :mod:`mint_mlx.quant.scales`).
- **Stored values.** MLX stores w ~ scale * q + bias, so (s, z) becomes (scale = s,
  bias = -z * s), both rounded to the 16-bit storage dtype *before* the codes are chosen
  (round to nearest for what is stored), so the error measured is the error of what is saved.
- **Incumbent.** MLX's own (scale, bias) (plain min/max at group sizes MLX lacks) is kept
  for a group where it scores better under the same lp objective: HQQ is never worse than
  round-to-nearest in its own objective. The allocator is then shown the *squared*
  (Fisher-weighted) error of the kept values, like every other method's.

Extended formats (group 16/256, compact scales) take HQQ's (scale, bias) as they take the
fitted ones (:mod:`mint_mlx.quant.extended`); float modes keep MLX's own scales, as with every method.

Everything else - blocks of whole rows in the transposed (position, group) layout, the
thread pool, expert stacks, packing - is :mod:`mint_mlx.quant.scales`'s, through its block-fitter
hook, so the output packs exactly as ``mx.quantize`` packs and stock mlx-lm loads it.

Note: the defaults are in weight units. shrink_p is nonzero only where |e| > beta^(-1/(2-p))
(0.17 at beta = 10), and round-to-nearest errors are at most half a step, so on weights of
LLM magnitude (steps ~1e-3) the shrink is zero and the solver is alternating rounding with a
(weighted) mean zero update; that is what HQQ's own code computes on such weights too.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mint_mlx.quant.scales import (
    _TINY_SCALE,
    AffineFit,
    Rounder,
    _BlockFit,
    _codes_and_errors,
    _fit_numpy,
    mlx_scales,
)

#: The lp-norm HQQ minimizes (p < 1: robust to a group's outliers).
LP_NORM = 0.7

#: Half-quadratic penalty weight at the start, and its growth per round (HQQ's defaults).
BETA = 10.0
KAPPA = 1.01

#: Rounds at most (HQQ's default); a group stops earlier when its error stops falling.
ITERATIONS = 20

#: HQQ's guard against 0 ** (p - 1) in the shrink.
_EPS = 1e-8


def lp_errors(
    x: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    b: np.ndarray,
    qmax: float,
    p: float = LP_NORM,
) -> np.ndarray:
    """Per group of the transposed block ``x`` (g, m): sum c |x - (s q + b)|^p with q the
    round-to-nearest codes of the stored (s, b) (m,): HQQ's objective for what is saved."""
    t, q = np.empty_like(x), np.empty_like(x)
    _codes_and_errors(x, None, s, b, qmax, t, q)
    np.multiply(q, s, out=t)
    np.add(t, b, out=t)
    np.subtract(x, t, out=t)
    np.abs(t, out=t)
    np.power(t, np.float32(p), out=t)
    if c is None:
        return np.asarray(t.sum(axis=0, dtype=np.float32))
    return np.asarray(np.einsum("jm,jm->m", t, c))


def _solve_zero(
    x: np.ndarray, c: np.ndarray | None, s: np.ndarray, z: np.ndarray, qmax: float, rounds: int
) -> np.ndarray:
    """HQQ's half-quadratic zero-point iteration for a fixed scale ``s`` (m,), all groups at
    once: each group's best zero under the (weighted) lp error of its unrounded (s, z), each
    group stopping at the first round whose error does not fall, as HQQ stops."""
    g, m = x.shape
    p = np.float32(LP_NORM)
    csum = np.full(m, g, dtype=np.float32) if c is None else c.sum(axis=0)
    best_z = z.copy()
    best_err = np.full(m, np.inf, dtype=np.float32)
    active = np.arange(m)
    xa, ca, sa, za, cs = x, c, s, z.copy(), csum
    inv = np.float32(1) / sa
    xs = xa * inv  # W / s, fixed: only the zero moves
    beta = BETA
    for it in range(rounds):
        d = xs + za  # W / s + z
        q = np.clip(np.rint(d), 0.0, qmax)
        np.subtract(d, q, out=d)  # (W - W_r) / s, W_r = (W_q - z) s
        r = d * sa  # the error in weight units
        a = np.abs(r)
        pw = np.power(a + np.float32(_EPS), p - np.float32(1))  # |e|^(p - 1)
        lp = a * pw
        err = lp.sum(axis=0) if ca is None else np.einsum("jm,jm->m", lp, ca)
        fell = err < best_err[active]
        idx = active[fell]
        best_err[idx], best_z[idx] = err[fell], za[fell]
        if it == rounds - 1 or not fell.any():
            break
        # generalized soft-threshold, then the closed-form (weighted) zero update:
        # z = mean(W_q - (W - W_e) / s) = z - mean(d) + mean(W_e) / s
        np.subtract(a, pw / np.float32(beta), out=a)
        np.maximum(a, 0.0, out=a)
        we = np.copysign(a, r) * inv
        np.subtract(we, d, out=we)
        step = (we.sum(axis=0) if ca is None else np.einsum("jm,jm->m", we, ca)) / cs
        za = za + step
        beta *= KAPPA
        if not fell.all():  # the groups whose error stopped falling are done
            keep = np.flatnonzero(fell)
            active = active[keep]
            xa, xs = xa[:, keep], xs[:, keep]
            ca = None if ca is None else ca[:, keep]
            sa, za, cs, inv = sa[keep], za[keep], cs[keep], inv[keep]
    return best_z


def _hqq_block(
    x: np.ndarray,
    c: np.ndarray | None,
    bits: int,
    rnd: Rounder,
    iterations: int,
    mlx_incumbent: bool,
    want_codes: bool,
) -> _BlockFit:
    """HQQ's fit of one transposed block ``x`` (g, m), as a :data:`mint_mlx.quant.scales.BlockFitter`:
    the (scale, bias) kept per group (HQQ's or the incumbent's, whichever has the smaller lp
    error once stored), their squared errors, and their codes when asked."""
    g, m = x.shape
    qmax = float(2**bits - 1)
    lo, hi = x.min(axis=0), x.max(axis=0)
    s = (hi - lo) / np.float32(qmax)
    usable = s >= _TINY_SCALE  # a constant group has no scale to fit: the incumbent is exact
    s = np.where(usable, s, np.float32(1))
    z = _solve_zero(x, c, s, -lo / s, qmax, iterations)
    hq_s, hq_b = rnd(s), rnd(-z * s)
    if mlx_incumbent:
        in_s, in_b = mlx_scales(lo, hi, bits, rnd)
    else:  # a group size MLX lacks: the plain min/max rule is the incumbent
        in_s, in_b = rnd((hi - lo) / np.float32(qmax)), rnd(lo)
    hq_err = np.where(usable, lp_errors(x, c, hq_s, hq_b, qmax), np.inf)
    take = hq_err <= lp_errors(x, c, in_s, in_b, qmax)
    best_s, best_b = np.where(take, hq_s, in_s), np.where(take, hq_b, in_b)
    t, q = np.empty_like(x), np.empty_like(x)
    weighted, plain = _codes_and_errors(x, c, best_s, best_b, qmax, t, q)
    return _BlockFit(best_s, best_b, weighted.copy(), plain.copy(), q if want_codes else None)


def hqq_fit(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    pack: bool = False,
) -> AffineFit:
    """HQQ's per-group (scale, bias), rounded to ``dtype``, with the squared error (weighted
    by ``columns`` and plain) of what is stored; with ``pack`` the MLX-packed codes too.
    Shapes as :func:`mint_mlx.quant.scales.fit_affine`."""
    fit = _fit_numpy(weight, bits, group_size, dtype, columns, ITERATIONS, pack, _hqq_block)
    return AffineFit(
        mx.array(fit.s[..., None]),
        mx.array(fit.b[..., None]),
        mx.array(fit.weighted[..., None]),
        mx.array(fit.plain[..., None]),
        None if fit.packed is None else mx.array(fit.packed),
    )


def hqq_affine(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed weight, scales, biases) in MLX affine layout with HQQ's scales and biases."""
    fit = _fit_numpy(weight, bits, group_size, dtype, columns, ITERATIONS, True, _hqq_block)
    assert fit.packed is not None
    return mx.array(fit.packed), mx.array(fit.s).astype(dtype), mx.array(fit.b).astype(dtype)
