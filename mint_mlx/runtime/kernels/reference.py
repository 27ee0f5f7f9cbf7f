"""Pure-MLX reference paths for our kernels: what every kernel is tested against, and what runs
where there is no Metal GPU.

Everything is computed in float32, with scales and biases cast to float32 *before* use (MLX's
``dequantize`` with bfloat16 scales computes in bfloat16 even when asked for float32). The unpacking
(:func:`mint_mlx.quant.scales.unpack_codes`) is written in MLX ops rather than calling
``mx.dequantize`` because MLX only supports group sizes 32, 64 and 128; the tests check it against
``mx.dequantize`` where MLX has it.
"""

from __future__ import annotations

import mlx.core as mx

from mint_mlx.formats import COMPACT, COMPACT_GROUPS, Format
from mint_mlx.quant.scales import unpack_codes

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (16, 32, 64, 128, 256)


def check_affine_shapes(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> tuple[int, int]:
    """Validate an affine quantized matrix; returns (out_features, in_features)."""
    if bits not in AFFINE_BITS:
        raise ValueError(f"bits must be one of {AFFINE_BITS}, got {bits}")
    if group_size not in AFFINE_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {AFFINE_GROUP_SIZES}, got {group_size}")
    if w.ndim != 2 or w.dtype != mx.uint32:
        raise ValueError(f"w must be a 2-D uint32 array, got {w.dtype} {tuple(w.shape)}")
    out_features, words = w.shape
    if (words * 32) % bits:
        raise ValueError(f"{words} words per row do not hold a whole number of {bits}-bit values")
    in_features = words * 32 // bits
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    want = (out_features, in_features // group_size)
    if tuple(scales.shape) != want or tuple(biases.shape) != want:
        raise ValueError(
            f"scales and biases must have shape {want}, got {tuple(scales.shape)} and "
            f"{tuple(biases.shape)}"
        )
    return out_features, in_features


def dequantize_affine(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Float32 weights (out, in) = scale * q + bias per group, for any supported group size."""
    out_features, in_features = check_affine_shapes(w, scales, biases, bits, group_size)
    q = unpack_codes(w, bits).astype(mx.float32)
    q = q.reshape(out_features, in_features // group_size, group_size)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    return (q * s + b).reshape(out_features, in_features)


def affine_qmv_reference(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """``x @ W.T`` in float32 for affine quantized W; x is (..., in), the result (..., out)."""
    weights = dequantize_affine(w, scales, biases, bits, group_size)
    if x.shape[-1] != weights.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weights {weights.shape[1]}")
    return x.astype(mx.float32) @ weights.T


def check_quantized(arrays: dict[str, mx.array], fmt: Format) -> tuple[tuple[int, ...], int, int]:
    """Validate the saved arrays of an affine or compact-scale weight (any leading dims, e.g. a
    stack of experts); returns (leading dims, out_features, in_features).

    Why here and not in each kernel: the reference path, every kernel launch and ``ops`` must
    refuse the same malformed inputs with the same message, before anything reads out of bounds.
    """
    if fmt.mode not in ("affine", COMPACT):
        raise ValueError(f"{fmt.name} is not an affine or compact-scale format")
    if fmt.bits not in AFFINE_BITS:
        raise ValueError(f"bits must be one of {AFFINE_BITS}, got {fmt.bits}")
    groups_allowed = COMPACT_GROUPS if fmt.mode == COMPACT else AFFINE_GROUP_SIZES
    if fmt.group_size not in groups_allowed:
        raise ValueError(f"{fmt.name}: group_size must be one of {groups_allowed}")
    need = ("weight", "scales", "biases") + (("super_scales",) if fmt.mode == COMPACT else ())
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ValueError(f"{fmt.name} needs arrays {list(need)}, missing {missing}")
    w = arrays["weight"]
    if w.ndim < 2 or w.dtype != mx.uint32:
        raise ValueError(f"weight must be uint32 with >= 2 dims, got {w.dtype} {tuple(w.shape)}")
    *lead, out_features, words = w.shape
    in_features = words * 32 // fmt.bits
    if in_features * fmt.bits != words * 32 or in_features % fmt.group_size:
        raise ValueError(f"{words} words per row do not hold whole groups of {fmt.name}")
    groups = in_features // fmt.group_size
    want = (*lead, out_features, groups)
    for key in ("scales", "biases"):
        if tuple(arrays[key].shape) != want:
            raise ValueError(f"{key} must have shape {want}, got {tuple(arrays[key].shape)}")
    if fmt.mode == COMPACT:
        if arrays["scales"].dtype != mx.uint8 or arrays["biases"].dtype != mx.int8:
            raise ValueError("compact scales are uint8 and compact biases int8")
        ss = arrays["super_scales"]
        if ss.ndim != w.ndim + 1 or tuple(ss.shape[:-2]) != (*lead, out_features):
            raise ValueError(f"super_scales must be (..., {out_features}, blocks, 2)")
        blocks = ss.shape[-2]
        if ss.shape[-1] != 2 or blocks < 1 or groups % blocks:
            raise ValueError(
                f"super_scales has {blocks} blocks for {groups} groups ({tuple(ss.shape)})"
            )
    return tuple(lead), out_features, in_features
