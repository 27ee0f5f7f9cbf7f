"""Declarations and launch rules of our quantized-matmul Metal kernels, for every extended format.

Two sources, each declared four times (affine or compact scales x one matrix or gathered over a
stack of experts) by ``#define``-ing ``MINT_COMPACT`` and ``MINT_GATHER`` before the header:

* ``metal/qmv.metal``: matrix-vector (decode; a few rows of x), simdgroups over output rows;
* ``metal/qmm.metal``: matrix-matrix (prefill), threadgroup tiles of x and dequantized W.

Both read packed values and scales through ``metal/quant_utils.metal``. A spec is the one
declaration the GPU path (:mod:`mint_mlx.runtime.kernels.ops`) and the emulator tests share, and a
``*_call`` function the one launch rule, so what is tested on Linux is what a Mac runs.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from mint_mlx.formats import COMPACT, Format
from mint_mlx.runtime.kernels.reference import check_quantized
from mint_mlx.runtime.kernels.spec import KernelCall, KernelSpec

#: Must match the constants in metal/qmv.metal and metal/qmm.metal (a test checks that).
QMV_SIMDGROUPS = 2
QMV_ROWS = 4
QMM_BM = 32
QMM_BN = 32
QMM_THREADS = 128
SIMD_WIDTH = 32

MODES = ("affine", COMPACT)
ACTIVATION_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
_TEMPLATE = ("T", "bits", "group_size")


def _inputs(mode: str, gathered: bool) -> tuple[str, ...]:
    names: tuple[str, ...] = ("x", "w", "scales", "biases")
    if mode == COMPACT:
        names += ("super_scales",)
    if gathered:
        names += ("indices",)
    return names


def _spec(source: str, kind: str, mode: str, gathered: bool) -> KernelSpec:
    if mode not in MODES:
        raise ValueError(f"no {kind} kernel for mode {mode!r}; modes: {MODES}")
    # Distinct names: MLX caches compiled kernels by name, and the variants differ in the header.
    name = f"mint_{'affine_cs' if mode == COMPACT else 'affine'}_{'gather_' if gathered else ''}"
    return KernelSpec.from_metal_file(
        source,
        name=name + kind,
        input_names=_inputs(mode, gathered),
        output_names=("y",),
        template_params=_TEMPLATE,
        defines=(("MINT_COMPACT", int(mode == COMPACT)), ("MINT_GATHER", int(gathered))),
        includes=("quant_utils.metal",),
    )


@functools.cache
def qmv_spec(mode: str) -> KernelSpec:
    """The matrix-vector kernel for ``mode`` (``affine`` or ``affine_cs``)."""
    return _spec("qmv.metal", "qmv", mode, gathered=False)


@functools.cache
def gather_qmv_spec(mode: str) -> KernelSpec:
    """The matrix-vector kernel over a stack of experts, one expert index per row of x."""
    return _spec("qmv.metal", "qmv", mode, gathered=True)


@functools.cache
def qmm_spec(mode: str) -> KernelSpec:
    """The tiled matrix-matrix kernel for ``mode``."""
    return _spec("qmm.metal", "qmm", mode, gathered=False)


@functools.cache
def gather_qmm_spec(mode: str) -> KernelSpec:
    """The tiled matrix-matrix kernel over a stack of experts (best with sorted indices)."""
    return _spec("qmm.metal", "qmm", mode, gathered=True)


def _kernel_inputs(
    x: mx.array, arrays: dict[str, mx.array], fmt: Format, indices: mx.array | None
) -> tuple[tuple[mx.array, ...], int]:
    """Validate a launch's operands; returns the kernel inputs in order and out_features."""
    lead, out_features, in_features = check_quantized(arrays, fmt)
    if len(lead) != (1 if indices is not None else 0):
        what = "a stack (E, out, in)" if indices is not None else "one (out, in) matrix"
        raise ValueError(f"the kernel takes {what}, got leading dims {lead}")
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must have shape (rows, {in_features}), got {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    inputs: tuple[mx.array, ...] = (x, arrays["weight"], arrays["scales"], arrays["biases"])
    if fmt.mode == COMPACT:
        inputs += (arrays["super_scales"],)
    if indices is not None:
        if tuple(indices.shape) != (x.shape[0],):
            raise ValueError(f"indices must have shape ({x.shape[0]},), got {indices.shape}")
        inputs += (indices.astype(mx.uint32),)
    return inputs, out_features


def _template(x: mx.array, fmt: Format) -> tuple[tuple[str, object], ...]:
    return (("T", x.dtype), ("bits", fmt.bits), ("group_size", fmt.group_size))


def qmv_call(
    x: mx.array, arrays: dict[str, mx.array], fmt: Format, indices: mx.array | None = None
) -> KernelCall:
    """The launch of :func:`qmv_spec` (or :func:`gather_qmv_spec` when ``indices``, one uint32
    expert per row of x, are given) for a 2-D x (rows, in)."""
    inputs, out_features = _kernel_inputs(x, arrays, fmt, indices)
    tiles = math.ceil(out_features / (QMV_SIMDGROUPS * QMV_ROWS))
    return KernelCall(
        inputs=inputs,
        output_shapes=((x.shape[0], out_features),),
        output_dtypes=(x.dtype,),
        grid=(SIMD_WIDTH, QMV_SIMDGROUPS * tiles, x.shape[0]),
        threadgroup=(SIMD_WIDTH, QMV_SIMDGROUPS, 1),
        template=_template(x, fmt),
    )


def qmm_call(
    x: mx.array, arrays: dict[str, mx.array], fmt: Format, indices: mx.array | None = None
) -> KernelCall:
    """The launch of :func:`qmm_spec` (or :func:`gather_qmm_spec` with ``indices``) for a 2-D
    x (rows, in)."""
    inputs, out_features = _kernel_inputs(x, arrays, fmt, indices)
    return KernelCall(
        inputs=inputs,
        output_shapes=((x.shape[0], out_features),),
        output_dtypes=(x.dtype,),
        grid=(QMM_THREADS * math.ceil(out_features / QMM_BN), math.ceil(x.shape[0] / QMM_BM), 1),
        threadgroup=(QMM_THREADS, 1, 1),
        template=_template(x, fmt),
    )
