"""Load a model for evaluation with one of two backends (see :mod:`mint_mlx.tools.evaluation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mint_mlx.errors import SourceError
from mint_mlx.runtime.load import load, load_model, load_tokenizer
from mint_mlx.source.model import cast_to_float32
from mint_mlx.source.origin import looks_like_hub_id
from mint_mlx.tools.evaluation.result import EvaluateError

BACKENDS = ("auto", "native", "dequant-fp32")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``native`` on a Metal GPU, ``dequant-fp32`` elsewhere; others pass through."""
    if backend not in BACKENDS:
        raise EvaluateError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "native" if mx.metal.is_available() else "dequant-fp32"
    return backend


def check_model_dir(path: str | Path) -> Path:
    """A local model directory, or a clear error: evaluation never downloads (``mlx_lm.load``
    would take a missing path spelled ``org/name`` for a hub id and try the hub)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        hub = " (it reads as a hub id: download it first)" if looks_like_hub_id(str(path)) else ""
        raise SourceError(
            f"{p} is not a model directory (no config.json){hub}; pass a local MLX model path"
        )
    return p


def _dequantized(module: nn.Module) -> nn.Module | None:
    """The float32 twin of a quantized layer, or None when ``module`` is not quantized.

    Scales and biases are cast to float32 before ``mx.dequantize``: with bf16 scales it would
    compute in bf16 even when asked for a float32 result (max error ~1e-2 measured).
    """
    known = nn.QuantizedLinear | nn.QuantizedEmbedding | QuantizedSwitchLinear
    custom = getattr(module, "dequantized_weight", None)
    if callable(custom):
        # Opt-in for other quantized layers (e.g. mint_mlx's extended formats): they say
        # themselves what float32 weight they compute with.
        weight = custom().astype(mx.float32)
    elif type(module) in (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear):
        weight = _dequantize_weight(module)
    else:
        w = module.get("weight")
        packed = isinstance(w, mx.array) and w.dtype == mx.uint32
        if isinstance(module, known) or (packed and "scales" in module):
            # A subclass or another quantized layer (e.g. nn.QQLinear, which also quantizes
            # activations): plain dequantization could compute something else.
            raise EvaluateError(
                f"cannot dequantize a {type(module).__name__} layer (give it a "
                "dequantized_weight() method); use backend='native'"
            )
        return None

    has_bias = "bias" in module
    new: nn.Module
    # an embedding table (stock or an opt-in layer such as mint_mlx.runtime.layers's) has as_linear
    if isinstance(module, nn.QuantizedEmbedding) or hasattr(module, "as_linear"):
        new = nn.Embedding(weight.shape[0], weight.shape[1])
    elif weight.ndim == 2:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        new = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=has_bias)
    new.weight = weight
    if has_bias:
        new.bias = module["bias"].astype(mx.float32)
    mx.eval(new.parameters())
    return new


def _dequantize_weight(module: nn.Module) -> mx.array:
    """``mx.dequantize`` of a stock quantized layer's saved arrays, in float32."""

    def f32(a: mx.array) -> mx.array:
        return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a

    scales = f32(module["scales"])
    biases = module.get("biases")
    biases = None if biases is None else f32(biases)
    global_scale = getattr(module, "global_scale", None)
    group_size: int = module.group_size
    bits: int = module.bits
    mode: str = module.mode
    q = module["weight"]
    if global_scale is not None and global_scale.size > 1:
        # One nvfp4 tensor scale per expert (mlx_lm's QuantizedSwitchLinear).
        weight = mx.stack(
            [
                mx.dequantize(
                    q[e],
                    scales[e],
                    None,
                    group_size,
                    bits,
                    mode,
                    global_scale=global_scale[e].astype(mx.float32),
                    dtype=mx.float32,
                )
                for e in range(q.shape[0])
            ]
        )
    else:
        gs = None if global_scale is None else global_scale.astype(mx.float32)
        weight = mx.dequantize(
            q, scales, biases, group_size, bits, mode, global_scale=gs, dtype=mx.float32
        )

    return weight


def dequantize_to_float32(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by its float32 dequantized twin and cast all else to float32.

    In place (and returned). Works layer by layer, evaluating each new weight at once, so the
    quantized and the float32 copy of the whole model never coexist. Handles per-layer
    bits/group_size/mode (affine, mxfp4, nvfp4, mxfp8) because each layer carries its own.
    ``mlx_lm.utils.dequantize_model`` is not used: it passes bf16 scales straight to
    ``mx.dequantize`` and so computes in bf16.
    """
    for name, module in list(model.named_modules()):
        new = _dequantized(module)
        if new is not None:
            model.update_modules(tree_unflatten([(name, new)]))
    cast_to_float32(model)
    return model


def load_for_eval(path: str | Path, backend: str = "auto") -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local MLX (or HF-format) model directory for evaluation.

    Through :func:`mint_mlx.load`, which reads every directory mlx-lm reads plus mint-mlx's
    extended formats; ``dequant-fp32`` then swaps each quantized layer (extended ones through
    their ``dequantized_weight()``) for a float32 twin.
    """
    p = check_model_dir(path)
    backend = resolve_backend(backend)
    if backend == "native":
        loaded = load(p)
        return loaded[0], loaded[1]
    model, config = load_model(p, lazy=True)
    dequantize_to_float32(model)
    return model, load_tokenizer(p, config)
