"""Affine quantized matrix-vector products (group sizes 16 and 256 as well as MLX's 32, 64 and
128) with separate ``w, scales, biases`` arguments: our Metal kernel on Apple GPUs, the pure-MLX
reference elsewhere.

A thin layer over :mod:`mint_mlx.runtime.kernels.quantized` (whose ``qmv`` kernel serves affine and
compact scales alike) kept for callers that hold the three arrays rather than a saved-arrays
dict; :mod:`mint_mlx.runtime.kernels.ops` is the general entry point.
"""

from __future__ import annotations

import mlx.core as mx

from mint_mlx.formats import Format
from mint_mlx.runtime.kernels.quantized import (
    QMV_ROWS,
    QMV_SIMDGROUPS,
    SIMD_WIDTH,
    qmv_call,
    qmv_spec,
)
from mint_mlx.runtime.kernels.reference import affine_qmv_reference
from mint_mlx.runtime.kernels.spec import KernelCall, KernelSpec

__all__ = [
    "QMV_ROWS",
    "QMV_SIMDGROUPS",
    "SIMD_WIDTH",
    "affine_qmv",
    "affine_qmv_call",
    "affine_qmv_spec",
]


def affine_qmv_spec() -> KernelSpec:
    """The affine matrix-vector kernel's declaration (``metal/qmv.metal``)."""
    return qmv_spec("affine")


def _format(bits: int, group_size: int) -> Format:
    return Format("affine", bits, group_size, native=group_size in (32, 64, 128))


def affine_qmv_call(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> KernelCall:
    """The launch of the kernel for a 2-D ``x`` (batch, in): inputs, grid, threadgroup, template."""
    arrays = {"weight": w, "scales": scales, "biases": biases}
    return qmv_call(x, arrays, _format(bits, group_size))


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
