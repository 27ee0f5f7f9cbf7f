"""Quantize and dequantize one weight tensor in one format, with MLX's own routines.

Analysis and save share these two functions, so the error the allocator is shown is the error
of exactly the arrays that get written.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mint_mlx.formats import Format
from mint_mlx.quant.extended import dequantize_extended, quantize_extended
from mint_mlx.quant.gptq import compensated, factor
from mint_mlx.quant.hqq import hqq_affine, hqq_fit
from mint_mlx.quant.scales import (
    AffineFit,
    fit_affine,
    optimized_affine,
    pack_numpy,
    storage_rounder,
)

#: How affine scales and biases are chosen: fitted to the weighted squared error
#: (:mod:`mint_mlx.quant.scales`), MLX's rule, HQQ's lp-norm zero-point solver
#: (:mod:`mint_mlx.quant.hqq`), or fitted with error-compensated codes (:mod:`mint_mlx.quant.gptq`;
#: layers without a linear input, and every layer when no input moments are given, are fitted
#: as ``optimized``).
SCALE_METHODS = ("optimized", "rtn", "hqq", "gptq")

#: The scale methods that fit each group's (scale, bias) instead of taking MLX's rule.
FITTED_SCALES = ("optimized", "hqq", "gptq")


def _fits_affine(fmt: Format, scale_method: str) -> bool:
    """Whether ``fmt`` under ``scale_method`` goes through a numpy fit (native affine, fitted scales);
    float modes always take MLX's own scales."""
    return (
        fmt.is_quantized and fmt.native and fmt.mode == "affine" and scale_method in FITTED_SCALES
    )


def fit_for(
    weight: mx.array,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    scale_method: str,
    columns: mx.array | None = None,
) -> AffineFit:
    """The per-group fit of a fitted scale method, without packing (``gptq`` fits as
    ``optimized``: its error feedback needs input moments, see :func:`quantize_compensated`)."""
    if scale_method == "hqq":
        return hqq_fit(weight, bits, group_size, dtype, columns)
    if scale_method in ("optimized", "gptq"):
        return fit_affine(weight, bits, group_size, dtype, columns)
    raise ValueError(f"{scale_method!r} is not a fitted scale method")


def quantize_weight(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    scale_method: str = "rtn",
    columns: mx.array | None = None,
) -> dict[str, mx.array]:
    """The arrays saved for ``weight`` in ``fmt``: suffix (``weight``/``scales``/``biases``) -> array.

    ``dtype`` is the 16-bit output dtype; affine scales and biases are stored in it, as mlx-lm does.
    ``scales="optimized"`` fits affine scales/biases to minimize the error weighted by ``columns``,
    ``scales="hqq"`` runs HQQ's lp-norm zero-point solver (weighted by ``columns``); both are
    still plain MLX affine. Float modes always use MLX's own scales.
    """
    w = weight.astype(dtype)
    if not fmt.is_quantized:
        return {"weight": w}
    if not fmt.native:
        return quantize_extended(weight, fmt, dtype, scale_method, columns)
    if _fits_affine(fmt, scale_method):
        fit = hqq_affine if scale_method == "hqq" else optimized_affine
        wq, s, b = fit(weight, fmt.bits, fmt.group_size, dtype, columns)
        return {"weight": wq, "scales": s, "biases": b}
    out = mx.quantize(w, group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
    if fmt.mode == "affine":
        return {"weight": out[0], "scales": out[1], "biases": out[2]}
    return {"weight": out[0], "scales": out[1]}


#: Elements per piece when quantizing a large tensor for saving: rows are independent, so a
#: tensor is quantized in row blocks and the pieces joined, and memory stays bounded by a
#: block's temporaries (the scale fit keeps several float32 copies) instead of the tensor's.
SAVE_CHUNK_ELEMENTS = 1 << 23


def quantize_in_chunks(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    scale_method: str = "rtn",
    columns: mx.array | None = None,
    chunk_elements: int = SAVE_CHUNK_ELEMENTS,
    moments: np.ndarray | None = None,
) -> dict[str, mx.array]:
    """:func:`quantize_weight`, block by block of rows (and expert by expert): same arrays.

    With ``scales="gptq"`` and the ``moments`` of a 2-D weight's inputs, a native affine format
    is rounded with error feedback (:func:`quantize_compensated`) instead."""
    if moments is not None and compensates(fmt, scale_method) and weight.ndim == 2:
        assert columns is not None, "error feedback needs the column Fisher"
        return quantize_compensated(weight, fmt, dtype, columns, moments)
    if weight.ndim == 3:
        parts = [
            quantize_in_chunks(
                weight[e],
                fmt,
                dtype,
                scale_method,
                None if columns is None or columns.ndim == 1 else columns[e],
                chunk_elements,
            )
            for e in range(weight.shape[0])
        ]
        return {k: mx.stack([p[k] for p in parts]) for k in parts[0]}
    step = max(1, chunk_elements // max(1, weight.shape[-1]))
    if weight.ndim != 2 or weight.shape[0] <= step:
        out = quantize_weight(weight, fmt, dtype, scale_method, columns)
        mx.eval(out)
        return out
    pieces = []
    for start in range(0, weight.shape[0], step):
        piece = quantize_weight(weight[start : start + step], fmt, dtype, scale_method, columns)
        mx.eval(piece)
        pieces.append(piece)
    return {k: mx.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}


def compensates(fmt: Format, scale_method: str) -> bool:
    """Whether ``fmt`` is rounded with error feedback under ``scale_method`` (given moments)."""
    return scale_method == "gptq" and _fits_affine(fmt, scale_method)


def quantize_compensated(
    weight: mx.array, fmt: Format, dtype: mx.Dtype, columns: mx.array, moments: np.ndarray
) -> dict[str, mx.array]:
    """The arrays saved for a 2-D ``weight`` in native affine ``fmt``, rounded with error
    feedback (:mod:`mint_mlx.quant.gptq`) under the column Fisher ``columns`` and the input
    ``moments``: the same arithmetic the analysis measured on its row sample."""
    cols = np.array(columns.astype(mx.float32))
    w = np.array(weight.astype(mx.float32))
    r = compensated(
        w, [(fmt.bits, fmt.group_size)], cols, factor(moments, cols), storage_rounder(dtype)
    )[0]
    return {
        "weight": mx.array(pack_numpy(r.codes.astype(np.uint32), fmt.bits)),
        "scales": mx.array(r.scales).astype(dtype),
        "biases": mx.array(r.biases).astype(dtype),
    }


def dequantize_weight(arrays: dict[str, mx.array], fmt: Format) -> mx.array:
    """The float32 weight the saved arrays represent.

    Affine scales and biases are cast to float32 first: with 16-bit scales ``mx.dequantize``
    otherwise computes in 16 bits even when asked for float32 (measured max error ~1e-2).
    """
    if not fmt.is_quantized:
        return arrays["weight"].astype(mx.float32)
    if not fmt.native:
        return dequantize_extended(arrays, fmt)
    if fmt.mode == "affine":
        return mx.dequantize(
            arrays["weight"],
            arrays["scales"].astype(mx.float32),
            arrays["biases"].astype(mx.float32),
            group_size=fmt.group_size,
            bits=fmt.bits,
            mode="affine",
            dtype=mx.float32,
        )
    return mx.dequantize(
        arrays["weight"],
        arrays["scales"],
        group_size=fmt.group_size,
        bits=fmt.bits,
        mode=fmt.mode,
        dtype=mx.float32,
    )


class RowErrors(NamedTuple):
    """Per-row squared errors of one format: as stored (plain, column-weighted) and, for a
    fitted affine format, those of MLX's own round-to-nearest scales (``None`` otherwise: then
    the stored error is already what stock mlx-lm would write)."""

    plain: mx.array
    weighted: mx.array | None
    rtn_plain: mx.array | None = None
    rtn_weighted: mx.array | None = None


def _summed(per_group: mx.array | None) -> mx.array | None:
    return None if per_group is None else per_group.sum(axis=(-2, -1))


def row_errors(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    column_weights: mx.array | None = None,
    scale_method: str = "rtn",
) -> RowErrors:
    """Per row of a 2-D ``weight``: the squared difference between it (as float32) and its
    stored version, and the same with each input column weighted by ``column_weights`` (if
    given). Rows are what the analysis samples (:mod:`mint_mlx.analysis.row_sample`). The scale fit
    measures MLX's own rule first, so its error comes along at no cost."""
    if _fits_affine(fmt, scale_method):
        fit = fit_for(weight, fmt.bits, fmt.group_size, dtype, scale_method, column_weights)
        weighted = column_weights is not None
        # that fit measures MLX's own rule first; HQQ's does not
        rtn = scale_method in ("optimized", "gptq")
        return RowErrors(
            fit.plain_error.sum(axis=(-2, -1)),
            fit.weighted_error.sum(axis=(-2, -1)) if weighted else None,
            _summed(fit.rtn_plain_error) if rtn else None,
            _summed(fit.rtn_weighted_error) if rtn and weighted else None,
        )
    stored = quantize_weight(weight, fmt, dtype, scale_method, column_weights)
    restored = dequantize_weight(stored, fmt)
    diff = restored - weight.astype(mx.float32)
    d2 = diff * diff
    weighted_rows = None if column_weights is None else (d2 * column_weights).sum(axis=-1)
    return RowErrors(d2.sum(axis=-1), weighted_rows)


def row_squared_errors(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    column_weights: mx.array | None = None,
    scale_method: str = "rtn",
) -> tuple[mx.array, mx.array | None]:
    """(plain, weighted) of :func:`row_errors`."""
    e = row_errors(weight, fmt, dtype, column_weights, scale_method)
    return e.plain, e.weighted


def squared_error(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    column_weights: mx.array | None = None,
    scale_method: str = "rtn",
) -> tuple[mx.array, mx.array | None]:
    """Sum of squared differences between ``weight`` (as float32) and its stored version, and
    the same sum with each input column weighted by ``column_weights`` (if given)."""
    plain, weighted = row_squared_errors(weight, fmt, dtype, column_weights, scale_method)
    return plain.sum(), None if weighted is None else weighted.sum()
