"""The pure-MLX affine scale fit, as it was before the numpy fast path in
:mod:`mint_mlx.quant.scales`: the independent reference that path is tested and benchmarked against.

Same algorithm (MLX's own (scale, bias) as the incumbent, then rounds of round-to-nearest and a
column-weighted least-squares refit, keeping the best per group), written as whole-tensor MLX
ops: on a CPU each op is a scalar single-threaded pass, which is why it was replaced.
Not used by the analysis or save.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

#: Group sizes ``mx.quantize`` supports (its answer is the fit's first incumbent there).
MLX_GROUP_SIZES = (32, 64, 128)

#: Alternating least-squares rounds; the error stops improving after 2-3 on real weights.
ITERATIONS = 4


def pack_codes_reference(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes (..., n) into uint32 words (..., n * bits / 32) as ``mx.quantize`` does.

    Each row is a little-endian, least-significant-bit-first bit stream; values may straddle two
    words (3, 5, 6 bits), and every 32 values fill exactly ``bits`` words.
    """
    lead, n = codes.shape[:-1], codes.shape[-1]
    if n % 32:
        raise ValueError(f"width {n} is not a multiple of 32")
    blocks = codes.astype(mx.uint32).reshape(*lead, n // 32, 32)
    words = [mx.zeros((*lead, n // 32), dtype=mx.uint32) for _ in range(bits)]
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        value = blocks[..., i]
        words[word] = words[word] | (value << shift)
        if shift + bits > 32:
            words[word + 1] = words[word + 1] | (value >> (32 - shift))
    return mx.stack(words, axis=-1).reshape(*lead, n * bits // 32)


@dataclass
class AffineFit:
    """Per-group scales and biases (float32, already rounded to the storage dtype), with the
    per-group squared error they give: column-weighted and plain."""

    scales: mx.array  # (..., groups, 1)
    biases: mx.array  # (..., groups, 1)
    weighted_error: mx.array  # (..., groups, 1)
    plain_error: mx.array  # (..., groups, 1)


def _grouped_columns(
    columns: mx.array | None, shape: tuple[int, ...], group_size: int
) -> mx.array | None:
    """Column weights shaped to broadcast against the grouped weight ``(..., groups, g)``."""
    if columns is None:
        return None
    cols = columns.astype(mx.float32)
    groups = shape[-1] // group_size
    if cols.ndim == 2:  # experts: (E, in) -> (E, 1, groups, g) against (E, out, groups, g)
        return cols.reshape(cols.shape[0], 1, groups, group_size)
    return cols.reshape(groups, group_size)


def _codes(x: mx.array, s: mx.array, b: mx.array, qmax: float) -> mx.array:
    """Round-to-nearest codes for fixed (scale, bias): the best codes for that pair."""
    return mx.clip(mx.round((x - b) / mx.where(s == 0, 1.0, s)), 0.0, qmax)


def fit_affine_reference(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    iterations: int | None = None,
) -> AffineFit:
    """Fit each group's (scale, bias) to minimize the column-weighted squared error.

    Candidates per group: MLX's own (scale, bias) (plain min/max at group sizes MLX lacks),
    then ``iterations`` rounds of alternating
    round-to-nearest codes and a weighted least-squares refit, starting from min/max. The best
    candidate under the weighted error is kept, so the fit is never worse than MLX's rule.
    Only small per-group arrays are carried between rounds (the analysis measures every
    candidate format with this fit, so its cost matters).
    """
    iterations = ITERATIONS if iterations is None else iterations
    w = weight.astype(mx.float32)
    lead, n = w.shape[:-1], w.shape[-1]
    x = w.reshape(*lead, n // group_size, group_size)
    c = _grouped_columns(columns, w.shape, group_size)
    qmax = float(2**bits - 1)

    def to_dtype(a: mx.array) -> mx.array:
        return a.astype(dtype).astype(mx.float32)

    def errors(s: mx.array, b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q = _codes(x, s, b, qmax)
        d = x - (s * q + b)
        d2 = d * d
        plain = d2.sum(axis=-1, keepdims=True)
        weighted = plain if c is None else (c * d2).sum(axis=-1, keepdims=True)
        return q, weighted, plain

    s = to_dtype((x.max(axis=-1, keepdims=True) - x.min(axis=-1, keepdims=True)) / qmax)
    b = to_dtype(x.min(axis=-1, keepdims=True))
    if group_size in MLX_GROUP_SIZES:
        _, s0, b0 = mx.quantize(weight.astype(dtype), group_size=group_size, bits=bits)
        best_s = s0.astype(mx.float32)[..., None]
        best_b = b0.astype(mx.float32)[..., None]
    else:  # a group size MLX lacks: the plain min/max rule is the incumbent
        best_s, best_b = s, b
    _, best_w, best_p = errors(best_s, best_b)

    if c is None:
        csum = mx.array(float(group_size))
        cw = x.sum(axis=-1, keepdims=True)
    else:
        csum = mx.broadcast_to(c, x.shape).sum(axis=-1, keepdims=True)
        cw = (c * x).sum(axis=-1, keepdims=True)
    for _ in range(iterations):
        q, err_w, err_p = errors(s, b)
        better = err_w < best_w
        best_s = mx.where(better, s, best_s)
        best_b = mx.where(better, b, best_b)
        best_w = mx.where(better, err_w, best_w)
        best_p = mx.where(better, err_p, best_p)
        # weighted least squares for (s, b) with the codes fixed
        cq = q if c is None else c * q
        sq = cq.sum(axis=-1, keepdims=True)
        sqq = (cq * q).sum(axis=-1, keepdims=True)
        sqx = (cq * x).sum(axis=-1, keepdims=True)
        det = csum * sqq - sq * sq
        ok = det > 1e-12 * mx.maximum(csum * sqq, 1e-30)
        s_new = mx.where(ok, (csum * sqx - sq * cw) / mx.where(ok, det, 1.0), s)
        b_new = mx.where(ok, (cw - s_new * sq) / mx.maximum(csum, 1e-30), b)
        s, b = to_dtype(s_new), to_dtype(b_new)
        mx.eval(s, b, best_s, best_b, best_w, best_p)
    return AffineFit(best_s, best_b, best_w, best_p)


def pack_for_reference(
    weight: mx.array, s: mx.array, b: mx.array, bits: int, group_size: int
) -> mx.array:
    """MLX-packed round-to-nearest codes of ``weight`` for per-group (scale, bias) given as
    float32 arrays of shape (..., groups, 1): the best codes for what is stored."""
    lead, n = weight.shape[:-1], weight.shape[-1]
    x = weight.astype(mx.float32).reshape(*lead, n // group_size, group_size)
    return pack_codes_reference(_codes(x, s, b, float(2**bits - 1)).reshape(*lead, n), bits)


def optimized_affine_reference(
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
    fit = fit_affine_reference(weight, bits, group_size, dtype, columns)
    packed = pack_for_reference(weight, fit.scales, fit.biases, bits, group_size)
    return packed, fit.scales[..., 0].astype(dtype), fit.biases[..., 0].astype(dtype)


def optimized_affine_error_reference(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    columns: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """(plain, weighted) squared error of :func:`optimized_affine_reference`, without packing: the same
    fit and the same codes, so the analysis measures exactly what save writes."""
    fit = fit_affine_reference(weight, bits, group_size, dtype, columns)
    weighted = None if columns is None else fit.weighted_error.sum()
    return fit.plain_error.sum(), weighted
