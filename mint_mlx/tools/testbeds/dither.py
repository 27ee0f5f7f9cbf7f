"""The dither: seeded uniform noise of one GGUF grid step per element, so that a model read out
of a quantized GGUF does not already sit on the grid that mint-mlx quantizes to."""

from __future__ import annotations

import hashlib

import numpy as np

from mint_mlx.tools.testbeds.wheels import TestbedError

#: Default dither amplitude, in grid steps (1.0 = U(-d/2, d/2)) and base seed.
DITHER = 1.0


SEED = 0


DITHER_RULE = (
    "w += a * d * U(-1/2, 1/2) per element of every quantized GGUF tensor, d its block's grid "
    "step (K-quants: super-block d x sub-block scale); numpy PCG64 seeded with "
    "sha256('{seed}:{hf_name}')[:8] little-endian; F32/F16 tensors unchanged"
)


#: GGML types whose blocks start with one fp16 scale ``d`` that is also the grid step.
_SIMPLE_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


#: K-quants: super-blocks of 256 with one fp16 ``d`` times a small integer scale per sub-block.
_K_BLOCK_TYPES = ("Q4_K", "Q5_K", "Q6_K")


DITHER_TYPES = _SIMPLE_BLOCK_TYPES + _K_BLOCK_TYPES


def k4_scales(packed: np.ndarray) -> np.ndarray:
    """The eight 6-bit sub-block scales of Q4_K/Q5_K super-blocks (``packed``: ``(..., 12)`` bytes).

    llama.cpp's ``get_scale_min_k4``: scales 0-3 are the low 6 bits of bytes 0-3; scales 4-7 take
    their low 4 bits from bytes 8-11 and their high 2 bits from the top of bytes 0-3. (Bytes 4-7
    and the high nibbles of 8-11 hold the mins, which shift the grid but do not change its step.)
    """
    b = packed.astype(np.uint8)
    low = b[..., 0:4] & 0x3F
    high = (b[..., 8:12] & 0x0F) | ((b[..., 0:4] >> 6) << 4)
    return np.concatenate([low, high], axis=-1)


def block_steps(raw: np.ndarray, type_name: str, n_cols: int) -> np.ndarray:
    """Per-element grid step ``d`` (float32, shape rows x n_cols) of a GGML block format.

    The step is what one quantization level is worth where the element sits: the block scale for
    the simple formats, ``d * scale_j`` of its sub-block for K-quants (32 elements per scale in
    Q4_K/Q5_K, 16 in Q6_K). Dithering by one such step erases exactly that source grid.
    """
    # lazy: gguf is an optional (dev) dependency, needed only to build a testbed
    import gguf

    if type_name not in DITHER_TYPES:
        raise TestbedError(f"no dither rule for GGML type {type_name}; add one to block_steps")
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, n_cols // block, nbytes)

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., lo : lo + 2]).view(np.float16)[..., 0]

    if type_name in _SIMPLE_BLOCK_TYPES:
        return np.repeat(np.abs(f16(0).astype(np.float32)), block, axis=1)
    if type_name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales+mins, quants
        step = f16(0).astype(np.float32)[..., None] * k4_scales(blocks[..., 4:16])
        sub = 32
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d
        scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
        step = f16(208).astype(np.float32)[..., None] * scales
        sub = 16
    return np.repeat(np.abs(step).reshape(rows, -1), sub, axis=1)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on the base seed and the tensor's HF name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def dither(w: np.ndarray, step: np.ndarray, amplitude: float, seed: int, name: str) -> np.ndarray:
    """``w + U(-a*d/2, a*d/2)`` per element, numpy PCG64 seeded by :func:`tensor_seed`."""
    if amplitude == 0:
        return w
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, name)))
    noise = rng.uniform(-0.5, 0.5, size=w.shape).astype(np.float32)
    return (w + noise * (amplitude * step)).astype(np.float32)
