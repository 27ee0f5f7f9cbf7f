"""A 4-bit copy of the source to sample calibration text from when the float32 model does not fit.

The default objective samples its calibration text from the model itself. When the float32
model does not fit under ``--max-memory``, the exact alternative (:func:`mint_mlx.sensitivity.streamed.
streamed_sample`) reads every block from the shards once per sampled token: 255 reads of the
whole 16-bit model, ~80 minutes for a 3B model on a CPU and minutes per token on a Mac whose
SSD serves the weights. Like other MLX quantizers, we sample from a low-bit copy instead: the
source quantized exactly as ``mlx_lm convert -q`` does (affine, 4 bits, group 64, MLX's own
``nn.quantize`` with the architecture's ``quant_predicate``), built block by block from the
lazily read shards, so that the 16-bit model never exists whole: the peak is the 4-bit model
plus one block's 16-bit weights while it is quantized. The gradients still come from the
16-bit weights (the in-memory or streamed pass); only the text differs, so it has its own
calibration cache key and the plan's notes name the sampler.

Activations are float32, as everywhere on a CPU (bf16 matmuls are slow and inexact there), so
scales and biases are kept in float32 too: 5 bits per quantized weight in memory instead of the
4.5 a saved ``-q`` model holds, with the same 4-bit values.

Measured on this project's 2-core Linux CPU (SmolLM2-135M, 8 sequences per step, other jobs
running; ``benchmarks/results/proxy-sampler.md``): MLX's CPU quantized matmul, or a
dequantize inside the forward (tried: the same time), cost 1.3x to 3x the float32 model per
token, and the block-streamed sampler with the shards in the page cache was no slower (0.83 s
per token against the proxy's 1.40 s). So on a CPU the proxy saves memory (80 MiB against
513 MiB of float32 weights there) rather than time; it saves time where the streamed sampler
reads the shards from disk for every token (a model larger than RAM) and on Apple GPUs, whose
quantized matmul is fast.
"""

from __future__ import annotations

import re
from math import prod
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mint_mlx.sensitivity.sampling import sample_sequences
from mint_mlx.sensitivity.streamed import RUNTIME_BYTES, StreamLayout, kv_cache_bytes
from mint_mlx.source.model import Source, _build_model

#: The proxy's format: what ``mlx_lm convert -q`` writes by default.
PROXY_BITS = 4
PROXY_GROUP = 64
PROXY_NAME = f"affine-{PROXY_BITS}-g{PROXY_GROUP}"


def _quantization(source: Source) -> dict[str, tuple[int, int]]:
    """Weight key -> (bits, group size) of every tensor the proxy quantizes: what mlx-lm's
    ``quantize_model`` would (a layer with ``to_quantized``, allowed by the architecture's
    ``quant_predicate``, whose input width the group size divides), at the predicate's
    format where it pins one (MoE routers at 8 bits)."""
    out = {}
    for info in source.quantizable:
        bits, group = PROXY_BITS, PROXY_GROUP
        if info.fixed is not None and info.fixed.mode == "affine":
            bits, group = info.fixed.bits, info.fixed.group_size
        if info.shape[-1] % group == 0:
            out[info.key] = (bits, group)
    return out


def proxy_model_bytes(source: Source) -> int:
    """Bytes the built proxy holds: packed weights with float32 scales and biases for the
    quantized tensors, float32 for the rest (norms, biases, a width no group divides)."""
    quantized = _quantization(source)
    total = 0
    for key, shape in source.shapes.items():
        n = prod(shape)
        if key in quantized:
            bits, group = quantized[key]
            total += n * bits // 8 + 2 * 4 * (n // group)
        else:
            total += 4 * n
    return total


def _groups(source: Source) -> list[list[str]]:
    """The weight keys in the order the proxy is built: one block at a time, then every other
    tensor alone (a large vocabulary's embedding and head are each as big as several blocks)."""
    blocks: dict[int, list[str]] = {}
    rest: list[str] = []
    for key in source.shapes:
        m = re.search(r"layers\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(key)
        else:
            rest.append(key)
    return [blocks[i] for i in sorted(blocks)] + [[k] for k in rest]


def proxy_sampler_memory(source: Source, sequences: int, seq_len: int) -> int:
    """Estimated peak of :func:`proxy_sample`: the proxy itself, plus the larger of the
    build's transient (one group's 16-bit weights as read, their float32 copies inside
    ``mx.quantize`` and the quantized result: 3x the group's float32 size is an upper bound)
    and the sampler's (the KV cache and one step's logits)."""
    layout = StreamLayout.of(source)
    largest = max(sum(4 * prod(source.shapes[k]) for k in g) for g in _groups(source))
    sampling = kv_cache_bytes(source, layout, sequences, seq_len) + 3 * 4 * sequences * layout.vocab
    return RUNTIME_BYTES + proxy_model_bytes(source) + max(3 * largest, sampling)


def _float32(a: mx.array) -> mx.array:
    return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a


def build_proxy(source: Source) -> nn.Module:
    """The source model quantized as ``mlx_lm convert -q`` does, built one group of tensors
    at a time: each group's 16-bit weights are read from the shards, quantized, and dropped
    (:meth:`Source.release`) before the next group is read. A fresh model instance is used:
    its lazily initialised random weights are never evaluated, so they take no memory."""
    model = _build_model(source.config)
    quantized = _quantization(source)
    for group in _groups(source):
        model.update(tree_unflatten([(k, source.tensor(k)) for k in group]))
        paths = {k[: -len(".weight")]: quantized[k] for k in group if k in quantized}

        def predicate(
            path: str, module: nn.Module, paths: dict[str, tuple[int, int]] = paths
        ) -> bool | dict[str, Any]:
            if path not in paths or not hasattr(module, "to_quantized"):
                return False
            bits, size = paths[path]
            return {"group_size": size, "bits": bits}

        nn.quantize(model, class_predicate=predicate)
        built = {k: _float32(v) for k, v in _group_arrays(model, group).items()}
        model.update(tree_unflatten(list(built.items())))
        mx.eval(list(built.values()))
        del built
        for key in group:
            source.release(key)
    mx.clear_cache()
    return model


def _group_arrays(model: nn.Module, group: list[str]) -> dict[str, mx.array]:
    """The model's arrays that replaced ``group``'s weights: the weights themselves, or a
    quantized layer's packed weight with its scales and biases."""
    owners = {k.rpartition(".")[0] for k in group}
    flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return {k: v for k, v in flat if k in group or k.rpartition(".")[0] in owners}


def proxy_sample(
    source: Source, start: int, sequences: int, length: int, seed: int, progress: bool = False
) -> mx.array:
    """:func:`mint_mlx.sensitivity.sampling.sample_sequences` from the 4-bit copy of the source (same
    seed chain and KV cache as the full-precision samplers, but other text: the copy's
    distribution is not the source's)."""
    tokens = sample_sequences(build_proxy(source), start, sequences, length, seed, progress)
    mx.clear_cache()  # the proxy is gone: return its buffers before the gradient pass
    return tokens
