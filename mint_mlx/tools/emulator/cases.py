"""Random operands and the comparison rule for checking our kernels against the reference.

Shared by the tests and ``python -m mint_mlx.selftest`` so that both judge a kernel the same way.
Random packed words are used rather than quantized weights: every bit pattern is a valid matrix,
so all codes (0 and 2**bits - 1 included) and every straddling position occur.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mint_mlx.formats import COMPACT, Format, compact_groups_per_block

#: Allowed max |y - ref| relative to max |ref|. float32 differs from the reference only by the
#: order of summation; fp16 and bf16 outputs are additionally rounded once (half an ulp: 2**-11
#: and 2**-8).
TOLERANCE = {mx.float32: 2e-5, mx.float16: 1.5e-3, mx.bfloat16: 1.2e-2}


def random_quantized(
    rng: np.random.Generator,
    fmt: Format,
    out_features: int,
    in_features: int,
    dtype: mx.Dtype = mx.float16,
    experts: int | None = None,
) -> dict[str, mx.array]:
    """The saved arrays of a random (out, in) matrix in ``fmt`` (a stack of ``experts`` if given),
    with scales and biases sized so that dequantized weights are O(1)."""
    lead = () if experts is None else (experts,)
    rows = (*lead, out_features)
    words = rng.integers(0, 2**32, size=(*rows, in_features * fmt.bits // 32), dtype=np.uint64)
    groups = in_features // fmt.group_size
    arrays = {"weight": mx.array(words.astype(np.uint32))}
    step = 1.0 / 2**fmt.bits
    if fmt.mode == COMPACT:
        blocks = groups // compact_groups_per_block(in_features, fmt.group_size)
        steps = np.stack(
            [
                rng.uniform(0.5, 1.5, size=(*rows, blocks)) * step / 128.0,
                rng.uniform(0.5, 1.5, size=(*rows, blocks)) * 0.5 / 64.0,
            ],
            axis=-1,
        )
        arrays["scales"] = mx.array(rng.integers(0, 256, size=(*rows, groups), dtype=np.uint8))
        arrays["biases"] = mx.array(rng.integers(-127, 128, size=(*rows, groups), dtype=np.int8))
        arrays["super_scales"] = mx.array(steps.astype(np.float32)).astype(dtype)
    else:
        s = rng.uniform(0.5, 1.5, size=(*rows, groups)) * step
        b = rng.normal(size=(*rows, groups)) * 0.5
        arrays["scales"] = mx.array(s.astype(np.float32)).astype(dtype)
        arrays["biases"] = mx.array(b.astype(np.float32)).astype(dtype)
    return arrays


def random_x(rng: np.random.Generator, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """Standard normal activations in ``dtype``."""
    return mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| (inf when shapes differ or y is not finite)."""
    if y.shape != ref.shape or not np.isfinite(y).all():
        return float("inf")
    return float(np.abs(y - ref).max(initial=0.0) / max(np.abs(ref).max(initial=0.0), 1e-6))


def close_enough(y: np.ndarray, ref: np.ndarray, dtype: mx.Dtype) -> tuple[bool, float]:
    """Whether a kernel output matches the reference (already cast to ``dtype``), and the error."""
    err = relative_error(y, ref)
    return err <= TOLERANCE[dtype], err
