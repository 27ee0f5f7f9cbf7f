"""The public entry points the runtime calls for weights stored in an extended format.

Every function takes the arrays exactly as saved (``weight``, ``scales``, ``biases`` and, for
compact scales, ``super_scales``) plus the :class:`~mint_mlx.formats.Format` they are stored in,
so a loader never has to know how a format is laid out. On an Apple GPU they run our Metal kernels
(:mod:`mint_mlx.runtime.kernels.quantized`): the matrix-vector kernel when x has few rows (decode), the
tiled matrix-matrix kernel otherwise (prefill). Elsewhere they run the float32 reference: the
weight is dequantized and multiplied in float32, and the result cast to x's dtype. That is slow but
exact, and it is what every kernel is tested against.

Native affine formats (group 32/64/128) are accepted too, so callers may route every affine layer
through here; stock ``mx.quantized_matmul`` remains the faster choice for those on a GPU.
:func:`gather_matmul` is the one gathered entry point for every format (16-bit, native, extended),
and :func:`gathered_rows` the one flattening of its broadcast batch.
"""

from __future__ import annotations

import math

import mlx.core as mx

from mint_mlx.formats import Format
from mint_mlx.quant.extended import dequantize_extended
from mint_mlx.runtime.kernels import quantized
from mint_mlx.runtime.kernels.reference import check_quantized

#: x with at most this many rows (after flattening the leading dims) takes the matrix-vector
#: kernel; more rows take the tiled kernel, which reuses each dequantized weight tile across rows.
QMV_MAX_ROWS = 8

_ACTIVATION_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def _use_metal() -> bool:
    return bool(mx.metal.is_available())


def _check_x(x: mx.array, in_features: int) -> None:
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last axis, got {x.shape}")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def dequantize(arrays: dict[str, mx.array], fmt: Format) -> mx.array:
    """The float32 weight (..., out, in) that ``arrays`` store in ``fmt``.

    Works for any leading dims (a stack of experts included). Computed in float32 with the
    scales and biases cast first, so it is the exact value every kernel approximates.
    """
    check_quantized(arrays, fmt)
    return dequantize_extended(arrays, fmt)


def quantized_matmul(x: mx.array, arrays: dict[str, mx.array], fmt: Format) -> mx.array:
    """``x @ W.T`` for x (..., in) and W (out, in) stored as ``arrays`` in ``fmt``; (..., out)
    in x's dtype.

    On a Metal GPU: our qmv kernel for at most :data:`QMV_MAX_ROWS` rows of x, our qmm kernel
    otherwise. Elsewhere: the float32 reference.
    """
    lead, out_features, in_features = check_quantized(arrays, fmt)
    if lead:
        raise ValueError(f"quantized_matmul takes one matrix, got a stack {lead} (use gather)")
    _check_x(x, in_features)
    if not _use_metal():
        w = dequantize_extended(arrays, fmt)
        return (x.astype(mx.float32) @ w.T).astype(x.dtype)
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return mx.zeros((*batch_shape, out_features), dtype=x.dtype)
    if x2.shape[0] <= QMV_MAX_ROWS:
        call = quantized.qmv_call(x2, arrays, fmt)
        spec = quantized.qmv_spec(fmt.mode)
    else:
        call = quantized.qmm_call(x2, arrays, fmt)
        spec = quantized.qmm_spec(fmt.mode)
    (y,) = spec.run_metal(call)
    return y.reshape(*batch_shape, out_features)


def gathered_rows(x: mx.array, indices: mx.array) -> tuple[tuple[int, ...], mx.array, mx.array]:
    """A gathered matmul's operands flattened over ``mx.gather_qmm``'s broadcast batch: (batch
    shape, x broadcast to (n, M, in), indices broadcast to (n,) as uint32), n = prod(batch)."""
    batch = tuple(mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape)))
    n = math.prod(batch)
    m, in_features = x.shape[-2], x.shape[-1]
    xb = mx.broadcast_to(x, (*batch, m, in_features)).reshape(n, m, in_features)
    idx = mx.broadcast_to(indices.astype(mx.uint32), batch).reshape(n)
    return batch, xb, idx


def gather_quantized_matmul(
    x: mx.array,
    arrays: dict[str, mx.array],
    fmt: Format,
    rhs_indices: mx.array,
    sorted_indices: bool = False,
) -> mx.array:
    """What ``mx.gather_qmm(x, w, scales, biases, rhs_indices=rhs_indices, transpose=True, ...)``
    computes, for a stack of expert weights (E, out, in) stored in ``fmt``.

    x is (..., M, in); its batch dims (all but the last two) broadcast with ``rhs_indices``; the
    result is (broadcast batch..., M, out) in x's dtype, where each batch entry is multiplied by
    expert ``rhs_indices[...]``. This is how mlx-lm's ``QuantizedSwitchLinear`` calls it.
    ``sorted_indices`` is a hint only (the results do not depend on it).

    On a Metal GPU each row of x is multiplied by its own expert: by the gathered matrix-vector
    kernel for at most :data:`QMV_MAX_ROWS` rows, else by the gathered tiled kernel on the rows
    sorted by expert (sorted here unless ``sorted_indices`` says they already are). Elsewhere the float32 reference: when fewer entries are gathered than there are
    experts (decode) only the gathered experts are dequantized, else the whole stack is and
    ``mx.gather_mm`` does the rest.
    """
    lead, out_features, in_features = check_quantized(arrays, fmt)
    if len(lead) != 1:
        raise ValueError(f"gather_quantized_matmul takes a stack (E, out, in), got leading {lead}")
    _check_x(x, in_features)
    if x.ndim < 2:
        raise ValueError(f"x must be (..., M, {in_features}), got {x.shape}")
    if rhs_indices.dtype not in (mx.uint32, mx.int32, mx.int64, mx.uint64, mx.int16, mx.uint16):
        raise ValueError(f"rhs_indices must be integers, got {rhs_indices.dtype}")
    experts = lead[0]
    batch = tuple(mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(rhs_indices.shape)))
    m = x.shape[-2]
    if not _use_metal():
        xf = x.astype(mx.float32)
        if rhs_indices.size < experts:
            picked = {k: mx.take(v, rhs_indices.flatten(), axis=0) for k, v in arrays.items()}
            w = dequantize_extended(picked, fmt).reshape(
                *rhs_indices.shape, out_features, in_features
            )
            y = xf @ w.swapaxes(-1, -2)
        else:
            w = dequantize_extended(arrays, fmt)
            y = mx.gather_mm(
                xf, w.swapaxes(-1, -2), rhs_indices=rhs_indices, sorted_indices=sorted_indices
            )
        return y.astype(x.dtype)
    _, xb, idx = gathered_rows(x, rhs_indices)
    n_batch = idx.shape[0]
    rows = n_batch * m
    if rows == 0:
        return mx.zeros((*batch, m, out_features), dtype=x.dtype)
    xb = xb.reshape(rows, in_features)
    idx = mx.broadcast_to(idx.reshape(n_batch, 1), (n_batch, m)).reshape(rows)
    if rows <= QMV_MAX_ROWS:
        call = quantized.qmv_call(xb, arrays, fmt, indices=idx)
        (y,) = quantized.gather_qmv_spec(fmt.mode).run_metal(call)
        return y.reshape(*batch, m, out_features)
    # The tiled kernel runs a tile once per run of equal experts in it: sort the rows by expert
    # unless the caller already did (mlx-lm sorts for 64 or more entries).
    order = None if sorted_indices else mx.argsort(idx)
    if order is not None:
        xb, idx = xb[order], idx[order]
    call = quantized.qmm_call(xb, arrays, fmt, indices=idx)
    (y,) = quantized.gather_qmm_spec(fmt.mode).run_metal(call)
    if order is not None:
        y = y[mx.argsort(order)]
    return y.reshape(*batch, m, out_features)


def gather_matmul(
    x: mx.array,
    arrays: dict[str, mx.array],
    fmt: Format,
    rhs_indices: mx.array,
    sorted_indices: bool = False,
) -> mx.array:
    """``x @ W[rhs_indices].T`` for a stack W (n, out, in) saved as ``arrays`` in ``fmt``, with
    ``mx.gather_qmm(..., transpose=True)``'s broadcasting: one entry point for every format
    (16-bit through ``mx.gather_mm``, native through ``mx.gather_qmm``, extended through
    :func:`gather_quantized_matmul`)."""
    if not fmt.is_quantized:
        w = arrays["weight"]
        if not mx.metal.is_available():  # MLX's CPU gather_mm computes in float32 only
            x, w = x.astype(mx.float32), w.astype(mx.float32)
        return mx.gather_mm(
            x, w.swapaxes(-1, -2), rhs_indices=rhs_indices, sorted_indices=sorted_indices
        )
    if not fmt.native:
        return gather_quantized_matmul(x, arrays, fmt, rhs_indices, sorted_indices)
    return mx.gather_qmm(
        x,
        arrays["weight"],
        arrays["scales"],
        arrays.get("biases"),
        rhs_indices=rhs_indices,
        transpose=True,
        group_size=fmt.group_size,
        bits=fmt.bits,
        mode=fmt.mode,
        sorted_indices=sorted_indices,
    )
