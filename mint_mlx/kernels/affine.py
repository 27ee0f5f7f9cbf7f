"""Affine quantized matrix-vector products for the extended formats (group sizes 16 and 256 as
well as MLX's 32, 64 and 128): our Metal kernel on Apple GPUs, the pure-MLX reference elsewhere.

The kernel is declared once (:func:`affine_qmv_spec`) and its launch rule written once
(:func:`affine_qmv_call`); the GPU path and the emulator tests both go through them.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from .reference import affine_qmv_reference, check_affine_shapes
from .spec import KernelCall, KernelSpec

#: Must match QMV_SIMDGROUPS and QMV_ROWS in metal/affine_qmv.metal (a test checks that).
QMV_SIMDGROUPS = 2
QMV_ROWS = 4
SIMD_WIDTH = 32

_ACTIVATION_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@functools.cache
def affine_qmv_spec() -> KernelSpec:
    """The kernel declaration (reads ``metal/affine_qmv.metal`` on first use)."""
    return KernelSpec.from_metal_file(
        "affine_qmv.metal",
        input_names=("x", "w", "scales", "biases"),
        output_names=("y",),
        template_params=("T", "bits", "group_size"),
    )


def affine_qmv_call(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> KernelCall:
    """The launch of the kernel for a 2-D ``x`` (batch, in): inputs, grid, threadgroup, template."""
    out_features, in_features = check_affine_shapes(w, scales, biases, bits, group_size)
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must have shape (batch, {in_features}), got {tuple(x.shape)}")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    batch = x.shape[0]
    tiles = math.ceil(out_features / (QMV_SIMDGROUPS * QMV_ROWS))
    return KernelCall(
        inputs=(x, w, scales, biases),
        output_shapes=((batch, out_features),),
        output_dtypes=(x.dtype,),
        grid=(SIMD_WIDTH, QMV_SIMDGROUPS * tiles, batch),
        threadgroup=(SIMD_WIDTH, QMV_SIMDGROUPS, 1),
        template=(("T", x.dtype), ("bits", bits), ("group_size", group_size)),
    )


def affine_qmv(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """``x @ W.T`` for affine quantized W (packed as ``mx.quantize`` packs), in x's dtype.

    x is (..., in). Runs our Metal kernel when a Metal GPU is available, else the float32
    reference (then cast to x's dtype).
    """
    if not mx.metal.is_available():
        return affine_qmv_reference(x, w, scales, biases, bits, group_size).astype(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    (y,) = affine_qmv_spec().run_metal(affine_qmv_call(x2, w, scales, biases, bits, group_size))
    return y.reshape(*lead, y.shape[-1])
