"""Optimized affine scales and biases: better weights in exactly MLX's affine format.

MLX's ``mx.quantize`` takes each group's min and max, then shifts the scale so that 0.0 is
exactly representable: simple, but not the (scale, bias) that minimizes the error (on our
SmolLM2 testbed the shift alone costs ~4% NRMSE). Here each group's (scale, bias) is fitted by
alternating rounding and weighted least squares, starting from min/max, with the error weighted
per input column by the output sensitivity (Fisher) when given. The best of the iterates and of
MLX's own answer is kept per group, so the result is never worse than round-to-nearest under
the weighting. The output is packed exactly as ``mx.quantize`` packs: stock mlx-lm loads it.

Scales and biases are rounded to the 16-bit storage dtype *before* the codes are chosen, so the
error measured here is the error of what is saved.

The fit runs in numpy, not MLX: the analysis fits every tensor in ~18 formats, and on a CPU
MLX's elementwise ops are scalar and single-threaded while numpy's float32 ufuncs are SIMD
(the pure-MLX version, kept in :mod:`mint_mlx.tools.scales_reference`, measured 60-220 ns per weight
per format). The weights are cut into blocks of whole rows small enough to stay in the
last-level cache, each block laid out *transposed*, (position in group, group): then every per-group
scalar broadcasts along the slow axis and every per-group sum is a sum of contiguous rows,
both at full SIMD speed, where the natural (group, position) layout makes numpy run a short
inner loop per group. Blocks are independent and go to a small thread pool (numpy releases
the GIL inside each op); every group's numbers depend only on its own weights, so the result
is the same for any block size, thread count or row chunking.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

#: Group sizes ``mx.quantize`` supports (its answer is the fit's first incumbent there).
MLX_GROUP_SIZES = (32, 64, 128)

#: Alternating least-squares rounds; the error stops improving after 2-3 on real weights.
ITERATIONS = 4

#: Weights per block. Small enough that a block's four float32 working arrays (8 MiB) stay in
#: the last-level cache across the ~50 passes of a fit; large enough that each of its ~150
#: numpy calls runs long. The second matters more with threads: every call hands the GIL
#: back and forth, and at 2**17 (~25 us per call) two threads were no faster than one on the
#: 2-core x86 CI machine. Measured there, four formats of an 8192 x 3072 bfloat16 weight, two
#: threads: 2**17 2.35 s, 2**18 1.44 s, 2**19 1.19-1.43 s, 2**20 1.39 s, 2**21 1.67 s (one
#: thread at 2**17: 2.23 s). Results do not depend on it.
BLOCK_ELEMENTS = 1 << 19

#: Threads over blocks. Results do not depend on it (blocks are independent).
THREADS = max(1, min(8, os.cpu_count() or 1))

#: Scales below this (in magnitude) take the exact per-group path: their reciprocal could
#: overflow, and a zero scale (a constant group) has none.
_TINY_SCALE = 1e-30

Rounder = Callable[[np.ndarray], np.ndarray]


def _round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even, as MLX casts), returned as float32."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(a), a, r.view(np.float32))


def storage_rounder(dtype: mx.Dtype) -> Rounder:
    """Rounds float32 numpy values to ``dtype`` (the scales' storage dtype), kept as float32.

    numpy has no bfloat16, so that rounding is done on the bits; a test pins it to MLX's cast.
    """
    if dtype == mx.float32:
        return lambda a: np.asarray(a, dtype=np.float32)
    if dtype == mx.float16:

        def to_half(a: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as MLX's cast does
                return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)

        return to_half
    if dtype == mx.bfloat16:
        return _round_bf16
    raise ValueError(f"scales cannot be stored as {dtype}")


def mlx_scales(
    lo: np.ndarray, hi: np.ndarray, bits: int, rnd: Rounder
) -> tuple[np.ndarray, np.ndarray]:
    """The stored (scale, bias) ``mx.quantize`` gives a group with this min and max.

    MLX quantizes the weight already cast to the storage dtype, so its min and max are ours
    rounded. Then it puts the range's larger-magnitude end exactly on a code (so 0.0 is
    representable) with the same float32 operations as MLX's CPU kernel; a test pins this to
    ``mx.quantize`` itself. Computing it from min/max the fit needs anyway spares a whole
    quantize pass per format.
    """
    lo, hi = rnd(lo), rnd(hi)
    n_bins = np.float32(2**bits - 1)
    flip = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / n_bins, np.float32(1e-7))
    scale = np.where(flip, scale, -scale)
    edge = np.where(flip, lo, hi)
    q0 = np.rint(edge / scale)
    on_grid = q0 != 0
    scale = np.where(on_grid, edge / np.where(on_grid, q0, np.float32(1)), scale)
    bias = np.where(on_grid, edge, np.float32(0))
    return rnd(scale), rnd(bias)


def _codes_and_errors(
    x: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    b: np.ndarray,
    qmax: float,
    t: np.ndarray,
    q: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest codes of the transposed block ``x`` (g, m) for fixed per-group (s, b)
    (m,), left in ``q``, and each group's (weighted, plain) squared error.

    The error is taken from the residual in code units, s * ((x - b) / s - q): one pass
    instead of the three a dequantize-and-subtract costs. ``t`` is scratch.
    """
    normal = np.abs(s) >= _TINY_SCALE
    inv = np.float32(1) / np.where(normal, s, np.float32(1))
    np.subtract(x, b, out=t)
    np.multiply(t, inv, out=t)
    np.rint(t, out=q)
    np.clip(q, 0.0, qmax, out=q)
    np.subtract(t, q, out=t)
    s2 = s * s
    if c is None:
        plain = np.einsum("jm,jm->m", t, t) * s2
        weighted = plain
    else:
        np.multiply(t, t, out=t)
        plain = t.sum(axis=0) * s2
        weighted = np.einsum("jm,jm->m", t, c) * s2
    if not normal.all():  # rare: zero or tiny scales, done exactly as written
        k = np.flatnonzero(~normal)
        xs, sk, bk = x[:, k], s[k], b[k]
        qs = np.clip(np.rint((xs - bk) / np.where(sk == 0, np.float32(1), sk)), 0.0, qmax)
        q[:, k] = qs
        d2 = np.square(xs - (sk * qs + bk))
        plain[k] = d2.sum(axis=0)
        weighted[k] = plain[k] if c is None else (c[:, k] * d2).sum(axis=0)
    return weighted, plain


def _refit(
    x: np.ndarray,
    c: np.ndarray | None,
    q: np.ndarray,
    u: np.ndarray,
    csum: np.ndarray,
    cw: np.ndarray,
    s: np.ndarray,
    b: np.ndarray,
    rnd: Rounder,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares (s, b) for the codes ``q`` fixed, rounded for storage."""
    if c is None:
        sq = q.sum(axis=0)
        sqq = np.einsum("jm,jm->m", q, q)
        sqx = np.einsum("jm,jm->m", q, x)
    else:
        np.multiply(c, q, out=u)
        sq = u.sum(axis=0)
        sqq = np.einsum("jm,jm->m", u, q)
        sqx = np.einsum("jm,jm->m", u, x)
    det = csum * sqq - sq * sq
    ok = det > 1e-12 * np.maximum(csum * sqq, 1e-30)
    s_new = np.where(ok, (csum * sqx - sq * cw) / np.where(ok, det, np.float32(1)), s)
    b_new = np.where(ok, (cw - s_new * sq) / np.maximum(csum, 1e-30), b)
    return rnd(s_new), rnd(b_new)


@dataclass
class _BlockFit:
    s: np.ndarray  # (m,)
    b: np.ndarray
    weighted: np.ndarray
    plain: np.ndarray
    codes: np.ndarray | None  # (g, m) float32 codes of (s, b) when asked for
    #: The errors of the incumbent (MLX's own rule: what ``mlx_lm convert`` writes), free here
    #: because the fit measures it first; the stock comparison prices stock settings with it.
    rtn_weighted: np.ndarray | None = None
    rtn_plain: np.ndarray | None = None


#: A per-block fit: (x (g, m), column weights (g, m) or None, bits, rounder, iterations,
#: MLX's rule is the incumbent, want codes) -> the block's kept (s, b), errors and codes.
#: :func:`_fit_block` is this module's; :mod:`mint_mlx.quant.hqq` plugs in HQQ's through the same
#: block, thread and expert machinery.
BlockFitter = Callable[[np.ndarray, np.ndarray | None, int, Rounder, int, bool, bool], _BlockFit]


def _fit_block(
    x: np.ndarray,
    c: np.ndarray | None,
    bits: int,
    rnd: Rounder,
    iterations: int,
    mlx_incumbent: bool,
    want_codes: bool,
) -> _BlockFit:
    """The fit of one transposed block ``x`` (g, m): the best of MLX's (scale, bias) and the
    iterates per group, under the weighted error.

    A group whose refit returns the (s, b) it started from has reached a fixed point: every
    later round would repeat it, so it leaves the working set (an exact shortcut, not an
    approximation; in 16-bit storage most groups get there in two or three rounds).
    """
    g, m = x.shape
    qmax = float(2**bits - 1)
    bufs = [np.empty(g * m, dtype=np.float32) for _ in range(2 if c is None else 3)]
    t, q = bufs[0].reshape(g, m), bufs[1].reshape(g, m)
    lo, hi = x.min(axis=0), x.max(axis=0)
    s = rnd((hi - lo) / np.float32(qmax))
    b = rnd(lo)
    if mlx_incumbent:
        best_s, best_b = mlx_scales(lo, hi, bits, rnd)
    else:  # a group size MLX lacks: the plain min/max rule is the incumbent
        best_s, best_b = s.copy(), b.copy()
    best_w, best_p = _codes_and_errors(x, c, best_s, best_b, qmax, t, q)
    best_w, best_p = best_w.copy(), best_p.copy()
    rtn_w, rtn_p = best_w.copy(), best_p.copy()
    if c is None:
        csum: np.ndarray = np.full(m, g, dtype=np.float32)
        cw = x.sum(axis=0)
    else:
        csum = c.sum(axis=0)
        cw = np.einsum("jm,jm->m", c, x)
    active = np.arange(m)  # indices into the block of the groups still moving
    xa, ca = x, c
    for it in range(iterations):
        err_w, err_p = _codes_and_errors(xa, ca, s, b, qmax, t, q)
        better = np.flatnonzero(err_w < best_w[active])
        sel = active[better]
        best_s[sel], best_b[sel] = s[better], b[better]
        best_w[sel], best_p[sel] = err_w[better], err_p[better]
        if it == iterations - 1:
            break
        u = t if ca is None else bufs[2][: t.size].reshape(t.shape)  # scratch, weighted only
        s_new, b_new = _refit(xa, ca, q, u, csum, cw, s, b, rnd)
        moved = np.flatnonzero((s_new != s) | (b_new != b))
        if len(moved) <= 0.75 * len(active):  # compact: the rest are at their fixed point
            if len(moved) == 0:
                break
            active = active[moved]
            xa = np.ascontiguousarray(xa[:, moved])
            ca = None if ca is None else np.ascontiguousarray(ca[:, moved])
            csum, cw = csum[moved], cw[moved]
            s_new, b_new = s_new[moved], b_new[moved]
            t = bufs[0][: g * len(moved)].reshape(g, len(moved))
            q = bufs[1][: g * len(moved)].reshape(g, len(moved))
        s, b = s_new, b_new
    codes = None
    if want_codes:
        q = bufs[1].reshape(g, m)
        _codes_and_errors(x, None, best_s, best_b, qmax, bufs[0].reshape(g, m), q)
        codes = q
    return _BlockFit(best_s, best_b, best_w, best_p, codes, rtn_w, rtn_p)


def _block_rows(rows: int, width: int) -> list[tuple[int, int]]:
    """Row ranges of about :data:`BLOCK_ELEMENTS` weights each (at least one row)."""
    step = max(1, BLOCK_ELEMENTS // width)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _map(fn: Callable[[tuple[int, int]], None], blocks: list[tuple[int, int]]) -> None:
    """Run ``fn`` on every block, on :data:`THREADS` threads when there is more than one."""
    if THREADS <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(blk)
        return
    with ThreadPoolExecutor(min(THREADS, len(blocks))) as pool:
        for _ in pool.map(fn, blocks):
            pass


def _as_numpy(a: mx.array) -> np.ndarray:
    """A float32 numpy copy of an MLX array (numpy cannot hold bfloat16)."""
    return np.array(a.astype(mx.float32), copy=True)


def _stored(a: mx.array) -> np.ndarray:
    """An MLX weight as numpy in its storage dtype, without a copy where numpy can hold it:
    bfloat16 as its uint16 bit patterns, float16 and float32 as themselves.

    Widening a whole tensor to float32 up front (MLX's cast, then a copy) cost more than a
    third of a 4-bit fit on a bfloat16 weight here; :func:`_transposed_f32` widens each block
    inside the pass that transposes it anyway, and the float32 copy of the whole tensor is
    never held.
    """
    if a.dtype == mx.bfloat16:
        return np.asarray(a.view(mx.uint16))
    if a.dtype in (mx.float16, mx.float32):
        return np.asarray(a)
    return _as_numpy(a)


def _transposed_f32(rows: np.ndarray, group_size: int) -> np.ndarray:
    """The block layout of the fit, (position in group, group), as contiguous float32, from
    rows in a storage dtype of :func:`_stored` (uint16 means bfloat16 bit patterns: widening
    those is exact, a 16-bit shift)."""
    t = rows.reshape(-1, group_size).T
    if rows.dtype == np.uint16:
        x = t.astype(np.uint32, order="C")
        x <<= np.uint32(16)
        return x.view(np.float32)
    return np.ascontiguousarray(t, dtype=np.float32)


def pack_numpy(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (..., n) into uint32 words (..., n * bits / 32) as ``mx.quantize`` does.

    Each row is a little-endian, least-significant-bit-first bit stream; values may straddle two
    words (3, 5, 6 bits). Eight values fill exactly ``bits`` bytes, so each run of eight is
    shifted together into one 64-bit integer and its low ``bits`` bytes are kept.
    """
    lead, n = codes.shape[:-1], codes.shape[-1]
    if n % 32:
        raise ValueError(f"width {n} is not a multiple of 32")
    eights = codes.reshape(-1, 8).astype(np.uint64)
    eights <<= np.arange(0, 8 * bits, bits, dtype=np.uint64)
    acc = np.bitwise_or.reduce(eights, axis=1).astype("<u8")
    stream = np.ascontiguousarray(acc.view(np.uint8).reshape(-1, 8)[:, :bits])
    return stream.reshape(-1).view("<u4").astype(np.uint32).reshape(*lead, n * bits // 32)


def _pack_transposed(q: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack_numpy` for a transposed block of codes ``q`` (g, m) (float, in range): the
    flat uint32 words of its m groups in order. The shifts run along the slow axis, so each is
    one contiguous op over all groups (2.5x faster than packing the (m, g) layout here)."""
    g, m = q.shape
    eights = q.astype(np.uint64).reshape(g // 8, 8, m)
    acc = eights[:, 0].copy()
    for i in range(1, 8):
        acc |= eights[:, i] << np.uint64(i * bits)
    stream = np.ascontiguousarray(acc.T.astype("<u8")).view(np.uint8).reshape(m, g // 8, 8)
    return np.ascontiguousarray(stream[:, :, :bits]).reshape(-1).view("<u4").astype(np.uint32)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes (..., n) into uint32 words (..., n * bits / 32) as ``mx.quantize`` does
    (see :func:`pack_numpy`)."""
    return mx.array(pack_numpy(np.array(codes.astype(mx.uint32)), bits))


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The integer codes (uint32, (..., n)) of MLX-packed words (..., n * bits / 32): the inverse
    of :func:`pack_codes`, for any group size (``mx.dequantize`` only takes MLX's own).

    MLX packs each row as a little-endian, LSB-first bit stream: value i occupies bits
    [i * bits, (i + 1) * bits) of the row, straddling word boundaries for 3, 5 and 6 bits.
    """
    words = packed.shape[-1]
    n = words * 32 // bits
    bit = np.arange(n, dtype=np.int64) * bits
    word = bit // 32
    shift = bit % 32
    straddles = shift + bits > 32
    lo = mx.take(packed, mx.array(word.astype(np.int32)), axis=-1) >> mx.array(
        shift.astype(np.uint32)
    )
    hi_word = np.minimum(word + 1, words - 1).astype(np.int32)
    hi_shift = np.where(straddles, 32 - shift, 0).astype(np.uint32)
    hi = mx.take(packed, mx.array(hi_word), axis=-1) << mx.array(hi_shift)
    hi = mx.where(mx.array(straddles), hi, mx.zeros_like(hi))
    return (lo | hi) & mx.array((1 << bits) - 1, dtype=mx.uint32)


@dataclass
class AffineFit:
    """Per-group scales and biases (float32, already rounded to the storage dtype), with the
    per-group squared error they give: column-weighted and plain. ``packed`` holds the
    MLX-packed codes of (scales, biases) when the fit was asked for them."""

    scales: mx.array  # (..., groups, 1)
    biases: mx.array  # (..., groups, 1)
    weighted_error: mx.array  # (..., groups, 1)
    plain_error: mx.array  # (..., groups, 1)
    packed: mx.array | None = None  # (..., in * bits / 32) uint32
    #: Per-group errors of MLX's own (scale, bias) (round to nearest): the fit's incumbent.
    rtn_weighted_error: mx.array | None = None  # (..., groups, 1)
    rtn_plain_error: mx.array | None = None  # (..., groups, 1)


@dataclass
class _Fit2D:
    s: np.ndarray  # (rows, groups)
    b: np.ndarray
    weighted: np.ndarray
    plain: np.ndarray
    packed: np.ndarray | None  # (rows, in * bits / 32)
    rtn_weighted: np.ndarray  # (rows, groups): MLX's own rule, the incumbent
    rtn_plain: np.ndarray


def _fit_2d(
    w: np.ndarray,
    c: np.ndarray | None,
    bits: int,
    group_size: int,
    rnd: Rounder,
    iterations: int,
    want_packed: bool,
    fitter: BlockFitter | None = None,
) -> _Fit2D:
    """The fit of a 2-D weight (rows, in), float32 or as :func:`_stored` holds it, with column
    weights (in,), block by block, each block by ``fitter`` (default :func:`_fit_block`)."""
    rows, n = w.shape
    groups = n // group_size
    out = [np.empty((rows, groups), dtype=np.float32) for _ in range(6)]
    packed = np.empty((rows, n * bits // 32), dtype=np.uint32) if want_packed else None
    blocks = _block_rows(rows, n)
    step = blocks[0][1] - blocks[0][0]
    # column weights in the transposed block layout: [j, r * groups + k] = c[k * g + j]
    ct = None
    if c is not None:
        ct = np.tile(c.reshape(groups, group_size).T, (1, step))
    mlx_incumbent = group_size in MLX_GROUP_SIZES

    def work(block: tuple[int, int]) -> None:
        r0, r1 = block
        m = (r1 - r0) * groups
        x = _transposed_f32(w[r0:r1], group_size)
        fit = (fitter or _fit_block)(
            x, None if ct is None else ct[:, :m], bits, rnd, iterations, mlx_incumbent, want_packed
        )
        fields = (fit.s, fit.b, fit.weighted, fit.plain, fit.rtn_weighted, fit.rtn_plain)
        for dst, src in zip(out, fields, strict=True):
            # a fitter that does not measure MLX's rule first (HQQ's) leaves its errors unknown
            dst[r0:r1] = np.nan if src is None else src.reshape(r1 - r0, groups)
        if packed is not None and fit.codes is not None:
            packed[r0:r1] = _pack_transposed(fit.codes, bits).reshape(r1 - r0, -1)

    _map(work, blocks)
    return _Fit2D(out[0], out[1], out[2], out[3], packed, out[4], out[5])


def _fit_numpy(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None,
    iterations: int,
    want_packed: bool,
    fitter: BlockFitter | None = None,
) -> _Fit2D:
    """The fit of any weight (..., in): leading axes are rows, except that a 3-D expert stack
    with columns (E, in) is fitted expert by expert, each with its own columns. Arrays come
    back with the weight's leading shape."""
    lead, n = tuple(weight.shape[:-1]), weight.shape[-1]
    if n % group_size:
        raise ValueError(f"width {n} is not a multiple of the group size {group_size}")
    rnd = storage_rounder(dtype)
    w = _stored(weight)
    cols = None if columns is None else _as_numpy(columns)
    if cols is not None and cols.ndim == 2:
        parts = [
            _fit_2d(
                w[e].reshape(-1, n), cols[e], bits, group_size, rnd, iterations, want_packed, fitter
            )
            for e in range(w.shape[0])
        ]

        def stacked(k: str) -> np.ndarray:
            return np.stack([getattr(p, k) for p in parts])

        fit = _Fit2D(
            *(stacked(k) for k in ("s", "b", "weighted", "plain")),
            packed=np.stack([p.packed for p in parts]) if want_packed else None,  # type: ignore[misc]
            rtn_weighted=stacked("rtn_weighted"),
            rtn_plain=stacked("rtn_plain"),
        )
    else:
        fit = _fit_2d(
            w.reshape(-1, n), cols, bits, group_size, rnd, iterations, want_packed, fitter
        )

    def shaped(a: np.ndarray) -> np.ndarray:
        return a.reshape(*lead, a.shape[-1])

    return _Fit2D(
        shaped(fit.s),
        shaped(fit.b),
        shaped(fit.weighted),
        shaped(fit.plain),
        None if fit.packed is None else shaped(fit.packed),
        shaped(fit.rtn_weighted),
        shaped(fit.rtn_plain),
    )


def fit_affine(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    iterations: int | None = None,
    pack: bool = False,
) -> AffineFit:
    """Fit each group's (scale, bias) to minimize the column-weighted squared error.

    Candidates per group: MLX's own (scale, bias) (plain min/max at group sizes MLX lacks),
    then ``iterations`` rounds of alternating
    round-to-nearest codes and a weighted least-squares refit, starting from min/max. The best
    candidate under the weighted error is kept, so the fit is never worse than MLX's rule.
    With ``pack`` the codes of the kept (scale, bias) come back packed, computed in the same
    pass: the codes whose error was measured.
    """
    iterations = ITERATIONS if iterations is None else iterations
    fit = _fit_numpy(weight, bits, group_size, dtype, columns, iterations, pack)
    return AffineFit(
        mx.array(fit.s[..., None]),
        mx.array(fit.b[..., None]),
        mx.array(fit.weighted[..., None]),
        mx.array(fit.plain[..., None]),
        None if fit.packed is None else mx.array(fit.packed),
        mx.array(fit.rtn_weighted[..., None]),
        mx.array(fit.rtn_plain[..., None]),
    )


def pack_for(weight: mx.array, s: mx.array, b: mx.array, bits: int, group_size: int) -> mx.array:
    """MLX-packed round-to-nearest codes of ``weight`` for per-group (scale, bias) given as
    float32 arrays of shape (..., groups, 1): the best codes for what is stored (computed by
    the same code as the fit's, so they are the codes it measured for the same (s, b))."""
    lead, n = tuple(weight.shape[:-1]), weight.shape[-1]
    groups = n // group_size
    w = _stored(weight).reshape(-1, n)
    sn = _as_numpy(s).reshape(-1, groups)
    bn = _as_numpy(b).reshape(-1, groups)
    packed = np.empty((w.shape[0], n * bits // 32), dtype=np.uint32)
    qmax = float(2**bits - 1)

    def work(block: tuple[int, int]) -> None:
        r0, r1 = block
        x = _transposed_f32(w[r0:r1], group_size)
        t, q = np.empty_like(x), np.empty_like(x)
        _codes_and_errors(x, None, sn[r0:r1].ravel(), bn[r0:r1].ravel(), qmax, t, q)
        packed[r0:r1] = _pack_transposed(q, bits).reshape(r1 - r0, -1)

    _map(work, _block_rows(w.shape[0], n))
    return mx.array(packed.reshape(*lead, packed.shape[-1]))


def optimized_affine(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed weight, scales, biases) in MLX affine layout minimizing column-weighted error.

    ``columns`` has the weight's shape without the row axis (``(in,)``, or ``(experts, in)`` for
    a 3-D stack); ``None`` weighs every column alike.
    """
    fit = _fit_numpy(weight, bits, group_size, dtype, columns, ITERATIONS, True)
    assert fit.packed is not None
    return mx.array(fit.packed), mx.array(fit.s).astype(dtype), mx.array(fit.b).astype(dtype)


def optimized_affine_error(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """(plain, weighted) squared error of :func:`optimized_affine`, without packing: the same
    fit and the same codes, so the analysis measures exactly what save writes."""
    fit = _fit_numpy(weight, bits, group_size, dtype, columns, ITERATIONS, False)
    # summed in float64 (the groups' float32 errors span many magnitudes), handed back as the
    # float32 scalars the analysis expects
    plain = mx.array(float(fit.plain.sum(dtype=np.float64)), dtype=mx.float32)
    weighted = (
        None
        if columns is None
        else mx.array(float(fit.weighted.sum(dtype=np.float64)), dtype=mx.float32)
    )
    return plain, weighted
