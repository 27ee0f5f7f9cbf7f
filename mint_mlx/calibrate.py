"""Sensitivity of the model's output to each weight: a diagonal Fisher estimate, data-free.

Plain weight error does not know which weights matter: the published weight-error allocators
lose to uniform quantization (and on our SmolLM2 testbed put the output head at 3 bits). The
Fisher information says how much the output distribution moves per unit of weight error:
KL(p_W || p_{W+dW}) ~= 1/2 * sum_ij F_ij dW_ij^2 per token.

Data-free by default: the model samples its own text from BOS at temperature 1, and the
gradients of the log-likelihood of those samples give the *true* Fisher (expectation over the
model's own distribution, no dataset). ``calibration_file`` uses a user's text instead
(empirical Fisher).

What is kept per tensor is the Fisher averaged over output rows, one weight per input column
(per expert for MoE stacks): it captures activation outliers (columns fed by large activations)
at a cost of one vector per tensor, so it scales to any model size. The analysis multiplies
squared errors by these column weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .errors import MintError, SourceError
from .paths import cache_root
from .sizes import format_size
from .source import Source


class CalibrationMemoryError(MintError):
    """The model is too large for the in-memory sensitivity pass on this machine."""


#: Bump when the estimate changes meaning.
CALIBRATION_VERSION = 2


@dataclass(frozen=True)
class CalibrationConfig:
    """How many sequences of how many tokens, the sampling seed, and an optional text file."""

    sequences: int = 8
    seq_len: int = 256
    seed: int = 0
    text_file: str | None = None

    def key(self, source: Source) -> str:
        h = hashlib.sha256()
        h.update(source.content_fingerprint().encode())
        h.update(f"v{CALIBRATION_VERSION}:{self.sequences}:{self.seq_len}:{self.seed}".encode())
        if self.text_file:
            h.update(hashlib.sha256(Path(self.text_file).read_bytes()).digest())
        return h.hexdigest()[:24]


def load_float32_model(source: Source) -> tuple[nn.Module, Any]:
    """The source model in float32 (fast BLAS path on CPUs) with its tokenizer."""
    from mlx_lm.utils import load_model, load_tokenizer

    from .evaluate import cast_to_float32

    model, config = load_model(source.path, lazy=True)
    cast_to_float32(model)
    tokenizer = load_tokenizer(source.path, eos_token_ids=config.get("eos_token_id", None))
    return model, tokenizer


def _start_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def sample_sequences(model: nn.Module, start: int, n: int, length: int, seed: int) -> mx.array:
    """``n`` sequences of ``length`` tokens sampled from the model at temperature 1 from ``start``."""
    from mlx_lm.models.cache import make_prompt_cache

    mx.random.seed(seed)
    cache = make_prompt_cache(model)
    tokens = mx.full((n, 1), start, dtype=mx.int32)
    out = [tokens]
    for _ in range(length - 1):
        logits = model(tokens, cache=cache)[:, -1, :]
        tokens = mx.random.categorical(logits)[:, None].astype(mx.int32)
        mx.eval(tokens)
        out.append(tokens)
    return mx.concatenate(out, axis=1)


def text_sequences(tokenizer: Any, path: Path, n: int, length: int) -> mx.array:
    ids = tokenizer.encode(path.read_text())
    if len(ids) < length + 1:
        raise SourceError(
            f"calibration text {path} has {len(ids)} tokens; need at least {length + 1}"
        )
    n = min(n, len(ids) // length)
    return mx.array([ids[i * length : (i + 1) * length] for i in range(n)], dtype=mx.int32)


def column_fisher(
    model: nn.Module, sequences: mx.array, keys: Sequence[str], progress: bool = False
) -> dict[str, mx.array]:
    """Per-token Fisher averaged over output rows, for each weight in ``keys``.

    For a sequence of T tokens with labels sampled from the model, the gradient G of the summed
    log-likelihood has E[G^2] = T x (per-token Fisher): cross terms vanish because the score has
    zero mean. So per-token F ~= mean over sequences of G^2 / T.
    """

    def loss_fn(m: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        logits = m(x)
        return nn.losses.cross_entropy(logits, y, reduction="sum")

    grad_fn = nn.value_and_grad(model, loss_fn)
    totals: dict[str, mx.array] = {}
    n = sequences.shape[0]
    for i in tqdm(range(n), desc="calibrate", unit="seq", disable=not progress):
        x = sequences[i : i + 1, :-1]
        y = sequences[i : i + 1, 1:]
        _, grads = grad_fn(model, x, y)
        flat = dict(tree_flatten(grads))
        t = y.size
        for key in keys:
            g = flat[key]
            # mean over output rows: the per-element Fisher of column j, assuming rows alike
            col = (g * g).mean(axis=-2) / t  # (in,) or (experts, in)
            totals[key] = totals[key] + col if key in totals else col
        mx.eval(list(totals.values()))
        del grads, flat
    out = {}
    for k, v in totals.items():
        v = v / n
        # A floor of 5% of the tensor's mean: a column (or an expert the calibration text never
        # routed to) with zero measured Fisher must still not count as free to destroy.
        out[k] = v + 0.05 * v.mean()
    return out


def physical_memory() -> int:
    """Bytes of RAM (unified memory on Apple Silicon); 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def required_memory(source: Source) -> int:
    """Rough peak of the calibration pass: float32 weights and gradients, plus activations."""
    return int(source.total_parameters * 4 * 2.5)


def memory_shortfall(source: Source) -> str | None:
    """Why the in-memory sensitivity pass cannot run here, or None if it can."""
    need, have = required_memory(source), physical_memory()
    if have and need > 0.8 * have:
        return (
            f"the fisher objective's sensitivity pass needs about {format_size(need)} of memory "
            f"and this machine has {format_size(have)}"
        )
    return None


def calibrate(
    source: Source, config: CalibrationConfig | None = None, progress: bool = False
) -> dict[str, mx.array]:
    """Column Fisher weights for every quantizable tensor of ``source`` (cached on disk).

    The pass holds the whole model in float32 with its gradients, so a model too large for
    this machine's memory is refused up front with the alternative, rather than swapping.
    """
    config = config or CalibrationConfig()
    path = cache_root() / "calibration" / f"{config.key(source)}.safetensors"
    if path.exists():
        loaded = mx.load(str(path))
        assert isinstance(loaded, dict)
        return loaded
    shortfall = memory_shortfall(source)
    if shortfall:
        raise CalibrationMemoryError(
            f"{shortfall}; use --objective nrmse (weight error only) or run on a machine with "
            "more memory"
        )
    model, tokenizer = load_float32_model(source)
    if config.text_file:
        seqs = text_sequences(tokenizer, Path(config.text_file), config.sequences, config.seq_len)
    else:
        seqs = sample_sequences(
            model, _start_token(tokenizer), config.sequences, config.seq_len, config.seed
        )
    keys = [t.key for t in source.quantizable]
    weights = column_fisher(model, seqs, keys, progress)
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.safetensors")  # ranks may share the cache
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path)
    return weights
