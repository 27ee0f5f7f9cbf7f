"""What a testbed check measures, and how much of it each check level runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.tools.testbeds.wheels import TestbedError

#: Held-out evaluation used by the full build check: 32 windows of 512 tokens.
CHECK_SEQ_LEN = 512


CHECK_WINDOWS = 32


#: How much a testbed build verifies (``--check``). ``none``: nothing. ``quick`` (the default,
#: seconds): the NRMSE of 4-bit RTN, the tokenizer round trip on ``heldout.txt`` and the PPL of
#: the model alone over its first ``QUICK_WINDOWS`` windows, enough to catch a wrong Q/K
#: permutation, norm offset or tokenizer (hundreds of PPL). ``full`` (minutes): the same over
#: ``CHECK_WINDOWS`` windows, a dithered model against its undithered reference (PPL of both,
#: KLD); the test suite asks for it. The build itself is the same bytes at every level.
CHECK_LEVELS = ("none", "quick", "full")


DEFAULT_CHECK = "quick"


QUICK_WINDOWS = 2


MIN_HELDOUT_TOKENS = 40_000


#: The dither has erased the Q4_1 grid when plain min/max 4-bit g32 NRMSE is at least this
#: fraction of g64's (a normal model's ratio; measured 0.86 at full dither, 0.59 at half).
GRID_RATIO = 0.75


def minmax_dequant(w: np.ndarray, group_size: int, bits: int = 4) -> np.ndarray:
    """Plain min/max affine round-to-nearest (GGUF Q4_1's rule at 4 bits, g32), float32.

    Unlike MLX's rule it does not shift the scale to make 0.0 exact, so on weights that sit on a
    Q4_1 grid it reproduces them almost exactly at g32: the artifact the dither must remove.
    """
    r = w.reshape(-1, group_size).astype(np.float32)
    lo = r.min(axis=1, keepdims=True)
    d = (r.max(axis=1, keepdims=True) - lo) / (2**bits - 1)
    d[d == 0] = 1.0
    q = np.clip(np.round((r - lo) / d), 0, 2**bits - 1)
    return (q * d + lo).reshape(w.shape)


def rtn_nrmse(model_dir: Path, bits: int = 4, group_sizes: Sequence[int] = (32, 64)) -> dict:
    """NRMSE of 4-bit round-to-nearest over all linear (projection) weights, two rules.

    ``mlx``: MLX's own affine quantization (``mx.quantize``); ``minmax``: plain min/max
    (:func:`minmax_dequant`). Pooled: ``sqrt(sum ||W - Q(W)||^2 / sum ||W||^2)`` over the tensors,
    and the mean of the per-tensor NRMSEs. On GGUF Q4_1 weights min/max at g32 is near lossless
    (measured 0.0014 against 0.080 at g64); after the dither both rules must look like a normal
    model's: a few percent, g32 somewhat below g64.
    """
    weights: dict[str, mx.array] = mx.load(str(model_dir / "model.safetensors"))  # type: ignore[assignment]
    linear = [k for k in sorted(weights) if k.endswith("_proj.weight")]
    result: dict[str, Any] = {"bits": bits, "tensors": len(linear)}
    for rule in ("mlx", "minmax"):
        for g in group_sizes:
            err = ref = 0.0
            per: list[float] = []
            for k in linear:
                w = np.array(weights[k].astype(mx.float32))
                if rule == "mlx":
                    q, sc, b = mx.quantize(mx.array(w), g, bits)
                    wq = np.array(mx.dequantize(q, sc, b, g, bits, dtype=mx.float32))
                else:
                    wq = minmax_dequant(w, g, bits)
                e = float(np.sum((w - wq) ** 2, dtype=np.float64))
                r = float(np.sum(w**2, dtype=np.float64))
                err += e
                ref += r
                per.append((e / r) ** 0.5)
            key = f"g{g}" if rule == "mlx" else f"minmax_g{g}"
            result[key] = {"pooled": (err / ref) ** 0.5, "mean": float(np.mean(per))}
    return result


#: Held-out PPL above which a build counts as broken. A wrong Q/K permutation, norm offset or
#: tokenizer gives hundreds or more; measured (32 x 512, dithered / undithered): SmolLM2 29.0 / 22.7,
#: Gemma 3 270M 25.7 / 23.4.
MAX_PPL = {"smollm2-135m": 40.0, "gemma3-270m": 40.0}


def check_level(check: str) -> int:
    if check not in CHECK_LEVELS:
        raise TestbedError(f"unknown check {check!r}; choose one of {', '.join(CHECK_LEVELS)}")
    return CHECK_LEVELS.index(check)


def recorded_check(meta: dict[str, Any]) -> str:
    """The check level a ``testbed.json`` records. Testbeds built before levels existed carry
    ``checks`` only when they ran the full check (the only one there was)."""
    return str(meta.get("check") or ("full" if meta.get("checks") else "none"))
