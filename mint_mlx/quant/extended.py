"""Quantize and dequantize in the extended formats (pure MLX: the reference every kernel is
tested against, and what the analysis measures).

- Affine at group 16 or 256: MLX's layout (packed codes, 16-bit scale and bias per group); MLX
  only refuses the group size, so the codes are packed with :func:`mint_mlx.quant.scales.pack_codes`.
- Compact scales (``affine_cs``): each group's fitted scale is stored as a uint8 multiple of a
  per-super-block step S (scale = s_q * S, S = max scale / 255) and its bias as an int8 multiple
  of a step B (bias = b_q * B, B = max |bias| / 127), with (S, B) in 16 bits per super-block
  weights of a row. Codes are chosen *after* the scale and bias are rounded, so they are the
  best codes for what is stored.
"""

from __future__ import annotations

import mlx.core as mx

from mint_mlx.formats import COMPACT, Format, compact_groups_per_block
from mint_mlx.quant.hqq import hqq_fit
from mint_mlx.quant.scales import fit_affine, pack_for, unpack_codes


def _fit(
    weight: mx.array, fmt: Format, dtype: mx.Dtype, scales: str, columns: mx.array | None
) -> tuple[mx.array, mx.array]:
    """Per-group (scale, bias), float32, shape (..., groups, 1): fitted (least squares or
    HQQ) or min/max."""
    if scales == "hqq":
        fit = hqq_fit(weight, fmt.bits, fmt.group_size, dtype, columns)
        return fit.scales, fit.biases
    fit = fit_affine(
        weight,
        fmt.bits,
        fmt.group_size,
        dtype,
        columns,
        iterations=0 if scales == "rtn" else None,
    )
    return fit.scales, fit.biases


def _compact(
    s: mx.array, b: mx.array, bits: int, group_size: int, dtype: mx.Dtype
) -> dict[str, mx.array]:
    """Round per-group (scale, bias) (..., groups, 1) onto the compact grid."""
    lead, groups = s.shape[:-2], s.shape[-2]
    per_block = compact_groups_per_block(groups * group_size, group_size)
    # MLX's rule may give a negative scale (with the bias at the group's max); the same values
    # with codes mirrored have scale -s and bias b + s * qmax, and uint8 scales need s >= 0
    flip = s < 0
    b = mx.where(flip, b + s * float(2**bits - 1), b)
    s = mx.abs(s)
    sb = s.reshape(*lead, groups // per_block, per_block)
    bb = b.reshape(*lead, groups // per_block, per_block)
    step_s = (sb.max(axis=-1, keepdims=True) / 255.0).astype(dtype).astype(mx.float32)
    step_b = (mx.abs(bb).max(axis=-1, keepdims=True) / 127.0).astype(dtype).astype(mx.float32)
    s_q = mx.clip(mx.round(sb / mx.where(step_s == 0, 1.0, step_s)), 0, 255)
    b_q = mx.clip(mx.round(bb / mx.where(step_b == 0, 1.0, step_b)), -127, 127)
    return {
        "scales": s_q.reshape(*lead, groups).astype(mx.uint8),
        "biases": b_q.reshape(*lead, groups).astype(mx.int8),
        "super_scales": mx.concatenate([step_s, step_b], axis=-1).astype(dtype),
    }


def _compact_values(arrays: dict[str, mx.array], group_size: int) -> tuple[mx.array, mx.array]:
    """Float32 per-group (scale, bias), shape (..., groups, 1), from the compact arrays."""
    s_q = arrays["scales"].astype(mx.float32)
    b_q = arrays["biases"].astype(mx.float32)
    lead, groups = s_q.shape[:-1], s_q.shape[-1]
    per_block = compact_groups_per_block(groups * group_size, group_size)
    steps = arrays["super_scales"].astype(mx.float32)  # (..., blocks, 2)
    s = s_q.reshape(*lead, groups // per_block, per_block) * steps[..., 0:1]
    b = b_q.reshape(*lead, groups // per_block, per_block) * steps[..., 1:2]
    return s.reshape(*lead, groups, 1), b.reshape(*lead, groups, 1)


def quantize_extended(
    weight: mx.array,
    fmt: Format,
    dtype: mx.Dtype,
    scale_method: str = "optimized",
    columns: mx.array | None = None,
) -> dict[str, mx.array]:
    """The arrays saved for ``weight`` in an extended format (see the module docstring)."""
    if fmt.native or fmt.mode not in ("affine", COMPACT):
        raise ValueError(f"{fmt.name} is not an extended affine format")
    s, b = _fit(weight, fmt, dtype, scale_method, columns)
    out: dict[str, mx.array]
    if fmt.mode == COMPACT:
        out = _compact(s, b, fmt.bits, fmt.group_size, dtype)
        s, b = _compact_values(out, fmt.group_size)
    else:
        out = {"scales": s[..., 0].astype(dtype), "biases": b[..., 0].astype(dtype)}
    return {"weight": pack_for(weight, s, b, fmt.bits, fmt.group_size), **out}


def dequantize_extended(arrays: dict[str, mx.array], fmt: Format) -> mx.array:
    """The float32 weight the saved arrays of an extended format represent."""
    q = unpack_codes(arrays["weight"], fmt.bits).astype(mx.float32)
    lead, n = q.shape[:-1], q.shape[-1]
    qg = q.reshape(*lead, n // fmt.group_size, fmt.group_size)
    if fmt.mode == COMPACT:
        s, b = _compact_values(arrays, fmt.group_size)
    else:
        s = arrays["scales"].astype(mx.float32)[..., None]
        b = arrays["biases"].astype(mx.float32)[..., None]
    return (qg * s + b).reshape(*lead, n)
