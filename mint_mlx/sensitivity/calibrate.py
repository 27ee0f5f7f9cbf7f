"""Sensitivity of the model's output to each weight: a diagonal Fisher estimate, data-free.

Plain weight error does not know which weights matter: the published weight-error allocators
lose to uniform quantization (and on our SmolLM2 testbed put the output head at 3 bits). The
Fisher information says how much the output distribution moves per unit of weight error:
KL(p_W || p_{W+dW}) ~= 1/2 * sum_ij F_ij dW_ij^2 per token.

Data-free by default: the model samples its own text from BOS at temperature 1, and the
gradients of the log-likelihood of those samples give the *true* Fisher (expectation over the
model's own distribution, no dataset). ``calibration_file`` uses a user's text instead
(empirical Fisher). When the float32 model does not fit under ``--max-memory``, the text comes
from a 4-bit copy of the source (:mod:`mint_mlx.sensitivity.proxy`) while the gradients still come from the
16-bit weights; that text has its own cache key, and the plan's notes say which model sampled it.

What is kept per tensor is the Fisher averaged over output rows, one weight per input column
(per expert for MoE stacks): it captures activation outliers (columns fed by large activations)
at a cost of one vector per tensor, so it scales to any model size. The analysis multiplies
squared errors by these column weights.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from mint_mlx.errors import MintError, SourceError
from mint_mlx.paths import cache_root
from mint_mlx.sensitivity.fisher import FisherSums, fisher_units, sequences_per_unit
from mint_mlx.sensitivity.inputs import (
    InputMoments,
    collect_input_moments,
    input_moments_path,
    save_input_moments,
)
from mint_mlx.sensitivity.proxy import PROXY_NAME, proxy_sample, proxy_sampler_memory
from mint_mlx.sensitivity.sampling import sample_sequences, start_token, text_sequences
from mint_mlx.sensitivity.streamed import (
    RUNTIME_BYTES,
    STREAMABLE_ARCHITECTURES,
    NotStreamableError,
    streamed_column_fisher,
    streamed_memory,
    streamed_sample,
    streamed_sampler_memory,
)
from mint_mlx.sizes import format_size
from mint_mlx.source.model import Source, cast_to_float32


class CalibrationMemoryError(MintError):
    """The model is too large for the in-memory sensitivity pass on this machine."""


#: Bump when the estimate changes meaning.
CALIBRATION_VERSION = 2

#: Sequences of sampled (or read) calibration text, and their length in tokens.
DEFAULT_SEQUENCES = 8
SEQ_LEN = 256

#: How the pass may run: chosen by memory, or forced (tests, users who know better).
SENSITIVITY_PASSES = ("auto", "in-memory", "streamed")

#: Which model samples the calibration text: ``full`` the source itself in float32 (in memory
#: or one block resident: the same tokens), ``proxy`` its 4-bit copy, ``auto`` the source (in
#: memory when its float32 model fits under ``--max-memory``, else one block at a time), and the
#: copy only when even that does not fit (see :func:`_samplers` for why the copy comes last).
SAMPLERS = ("auto", "full", "proxy")


@dataclass(frozen=True)
class CalibrationConfig:
    """How many sequences of how many tokens, the sampling seed, an optional text file, and
    whether the 4-bit copy samples the text (``proxy``; ignored with a text file)."""

    sequences: int = DEFAULT_SEQUENCES
    seq_len: int = SEQ_LEN
    seed: int = 0
    text_file: str | None = None
    proxy: bool = False

    def key(self, source: Source) -> str:
        """The cache key: the source's content and the text's recipe. The proxy's text is other
        text, so it has its own key; the full-precision samplers (in memory, streamed) give the
        same tokens and share one, which is also the key from before the proxy existed."""
        h = hashlib.sha256()
        h.update(source.content_fingerprint().encode())
        h.update(f"v{CALIBRATION_VERSION}:{self.sequences}:{self.seq_len}:{self.seed}".encode())
        per_unit = sequences_per_unit(self.seq_len)
        if per_unit > 1:  # short sequences, batched per backward pass
            h.update(f":units-of-{per_unit}".encode())
        if self.text_file:
            h.update(hashlib.sha256(Path(self.text_file).read_bytes()).digest())
            h.update(b":windows-with-bos")  # the text's windows start with BOS (session 14)
        elif self.proxy:
            h.update(f":sampled-by-{PROXY_NAME}".encode())
        return h.hexdigest()[:24]


def load_float32_model(source: Source) -> nn.Module:
    """The whole source model in float32 (the fast BLAS path on CPUs)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(source.path, lazy=True)
    cast_to_float32(model)
    return model


def load_source_tokenizer(source: Source) -> Any:
    """The source's tokenizer, needed only to encode a ``--calibration`` text."""
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(source.path, eos_token_ids=source.config.get("eos_token_id"))
    except Exception as e:  # noqa: BLE001 - transformers fails in many ways without the files
        raise SourceError(
            f"--calibration needs the model's tokenizer, which {source.path} lacks or cannot "
            f"load ({type(e).__name__}); copy the tokenizer files into it, or drop --calibration "
            "to sample text from the model itself"
        ) from e


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
    sums = FisherSums(keys)
    units = fisher_units(sequences.shape[0], sequences.shape[1])
    for unit in tqdm(units, desc="calibrate", unit="step", disable=not progress):
        x = sequences[unit, :-1]
        y = sequences[unit, 1:]
        _, grads = grad_fn(model, x, y)
        flat = dict(tree_flatten(grads))
        for key in keys:
            sums.add(key, flat[key], y.size)
        mx.eval(sums.arrays())
        del grads, flat
    return sums.finish(len(units))


def add_sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-memory``, ``--sensitivity-pass`` and ``--sampler``, the same on ``convert`` and
    ``plan``."""
    parser.add_argument(
        "--max-memory",
        help="memory the conversion may use: 12GB, 1.5GiB (default: on Apple Silicon the GPU's "
        "wired limit, elsewhere 80%% of RAM); picks the sensitivity pass",
    )
    parser.add_argument(
        "--sensitivity-pass",
        choices=SENSITIVITY_PASSES,
        default="auto",
        help="auto (default): in memory when it fits under --max-memory, else streamed "
        "block by block (same numbers, one block resident)",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="auto",
        help="which model samples the calibration text: auto (default): the float32 model when "
        "it fits under --max-memory, else a 4-bit copy of it when that fits, else the float32 "
        "model one block at a time (exact but slow); full: never the copy; proxy: always it",
    )


def in_memory_need(source: Source) -> int:
    """Rough peak of the in-memory pass: float32 weights and gradients, plus activations."""
    return int(source.total_parameters * 4 * 2.5) + RUNTIME_BYTES


def sampler_need(source: Source) -> int:
    """The float32 model alone, as the in-memory sampler holds it."""
    return source.total_parameters * 4 + RUNTIME_BYTES


def proxy_need(source: Source, config: CalibrationConfig) -> int:
    """:func:`mint_mlx.sensitivity.proxy.proxy_sampler_memory` for ``config``'s text."""
    return proxy_sampler_memory(source, config.sequences, config.seq_len)


@dataclass(frozen=True)
class PassChoice:
    """How the sensitivity pass runs, and why that fits."""

    kind: str  # "in-memory" or "streamed"
    # "in-memory" or "streamed" (the same tokens either way), "proxy" (the 4-bit copy's text),
    # "none" for a text file
    sampler: str
    activations_on_disk: bool
    need: int  # estimated peak bytes

    def describe(self, max_memory: int | None) -> str:
        limit = "" if max_memory is None else f" of --max-memory {format_size(max_memory)}"
        how = {
            "in-memory": "in memory (the float32 model and its gradients)",
            "streamed": "streamed (one block resident"
            + (", activations on disk)" if self.activations_on_disk else ")"),
        }[self.kind]
        return f"sensitivity pass {how}, estimated peak {format_size(self.need)}{limit}"


def _samplers(source: Source, config: CalibrationConfig, sampler: str) -> list[tuple[str, int]]:
    """The samplers the streamed pass may use, best first, with their estimated peaks: the
    float32 model in memory, the float32 model one block at a time (the same text; every
    block is read from the shards once per token), and last the 4-bit copy (a model ~6x
    smaller than the float32 one, held in memory, but other text). The copy comes last because
    its text measured far from the source's on Gemma 3 270M (15.4 nats per token under the
    source, against 2.9 for the source's own; the plan it calibrated was predicted 25% worse),
    while on a CPU it was not faster than the streamed sampler (benchmarks/RESULTS.md, "Proxy
    sampler"). See :mod:`mint_mlx.sensitivity.proxy`."""
    if config.text_file:  # nothing to sample: the text is the user's
        return [("none", 0)]
    n, length = config.sequences, config.seq_len
    full = [
        ("in-memory", sampler_need(source)),
        ("streamed", streamed_sampler_memory(source, n, length)),
    ]
    proxy = [("proxy", proxy_need(source, config))]
    return {"full": full, "proxy": proxy}.get(sampler, [*full, *proxy])


def choose_pass(
    source: Source,
    config: CalibrationConfig,
    requested: str,
    max_memory: int | None,
    sampler: str = "auto",
) -> PassChoice:
    """The pass ``requested`` (``auto``: in memory when it fits under ``max_memory``, else
    streamed) and the model that samples its text (``sampler``, see :data:`SAMPLERS`), or a
    one-line error when nothing fits, which names the smallest limit that does. Never a silent
    switch to another objective."""
    if requested not in SENSITIVITY_PASSES:
        raise MintError(
            f"unknown --sensitivity-pass {requested!r}; use one of {', '.join(SENSITIVITY_PASSES)}"
        )
    if sampler not in SAMPLERS:
        raise MintError(f"unknown --sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    limit = max_memory if max_memory is not None else 2**63
    whole = in_memory_need(source)
    streamable = source.model_type in STREAMABLE_ARCHITECTURES
    if requested == "in-memory" or (requested == "auto" and (whole <= limit or not streamable)):
        if whole > limit:
            alternative = (
                "use --sensitivity-pass streamed"
                if streamable
                else f"{source.model_type} cannot be streamed block by block yet, so choose "
                "--objective nrmse explicitly (weight error only: measured worse than stock "
                "uniform quantization)"
            )
            raise CalibrationMemoryError(
                f"the in-memory sensitivity pass needs about {format_size(whole)}, over "
                f"--max-memory {format_size(limit)}; raise --max-memory or {alternative}"
            )
        if config.text_file:
            return PassChoice("in-memory", "none", False, whole)
        if sampler == "proxy":  # the copy samples and is dropped before the float32 model loads
            need = max(whole, proxy_need(source, config))
            if need > limit:
                raise CalibrationMemoryError(
                    f"the 4-bit sampler and the in-memory pass need about {format_size(need)}, "
                    f"over --max-memory {format_size(limit)}; raise --max-memory"
                )
            return PassChoice("in-memory", "proxy", False, need)
        return PassChoice("in-memory", "in-memory", False, whole)
    if not streamable:
        raise CalibrationMemoryError(
            f"--sensitivity-pass streamed does not support {source.model_type} yet (supported: "
            f"{', '.join(sorted(STREAMABLE_ARCHITECTURES))}); use --sensitivity-pass in-memory"
        )
    n, length = config.sequences, config.seq_len
    samplers = _samplers(source, config, sampler)
    for name, sampler_bytes in samplers:  # the faster sampler first, activations on disk if need be
        for on_disk in (False, True):
            need = max(streamed_memory(source, n, length, on_disk), sampler_bytes)
            if need <= limit:
                return PassChoice("streamed", name, on_disk, need)
    least = min(max(streamed_memory(source, n, length, True), b) for _, b in samplers)
    raise CalibrationMemoryError(
        f"--max-memory {format_size(limit)} is below the smallest the sensitivity pass can run "
        f"in ({format_size(least, round_up=True)}: one block, the head and the activations); "
        f"raise --max-memory to at least {format_size(least, round_up=True)}"
    )


@dataclass
class Sensitivity:
    """The column Fisher weights, and how they were obtained (for the plan's notes)."""

    columns: dict[str, mx.array]
    choice: PassChoice | None  # None: read from the cache
    text: str  # which model or file produced the calibration text
    key: str = ""  # the cache key of these weights (:meth:`CalibrationConfig.key`)
    config: CalibrationConfig | None = None  # the recipe of the text they came from


def calibration_tokens(
    source: Source, config: CalibrationConfig, sampler: str, progress: bool = False
) -> tuple[mx.array, nn.Module | None]:
    """The calibration token ids: the user's text encoded, or sampled by ``sampler``: the
    source ("in-memory" or "streamed") or its 4-bit copy ("proxy"); with the float32 model if
    one was loaded."""
    if config.text_file:
        tokenizer = load_source_tokenizer(source)
        text = Path(config.text_file)
        return text_sequences(tokenizer, text, config.sequences, config.seq_len), None
    start, n, length, seed = start_token(source), config.sequences, config.seq_len, config.seed
    if sampler == "in-memory":
        model = load_float32_model(source)
        return sample_sequences(model, start, n, length, seed, progress), model
    if sampler == "proxy":
        return proxy_sample(source, start, n, length, seed, progress), None
    return streamed_sample(source, start, n, length, seed, progress), None


def calibration_path(source: Source, config: CalibrationConfig) -> Path:
    return cache_root() / "calibration" / f"{config.key(source)}.safetensors"


def _text(config: CalibrationConfig, sampler: str) -> str:
    """Which model or file produced the calibration text, for the plan's notes."""
    if config.text_file:
        return f"the calibration file {Path(config.text_file).name}"
    if not config.proxy:
        return "text the source model sampled itself (float32, from its start token)"
    why = (
        "--sampler proxy"
        if sampler == "proxy"
        else "the float32 source does not fit under --max-memory"
    )
    return (
        f"text sampled by a 4-bit copy of the source ({PROXY_NAME}, as mlx_lm convert -q "
        f"quantizes; {why}), from its start token; gradients from the 16-bit weights"
    )


def sensitivity(
    source: Source,
    config: CalibrationConfig | None = None,
    progress: bool = False,
    sensitivity_pass: str = "auto",
    max_memory: int | None = None,
    sampler: str = "auto",
) -> Sensitivity:
    """Column Fisher weights for every quantizable tensor of ``source`` (cached on disk).

    In memory or block by block (:mod:`mint_mlx.sensitivity.streamed`), as :func:`choose_pass` decides
    from ``max_memory``: both give the same numbers, so they share the cache entry. Text the
    4-bit copy sampled has its own entry; an entry from the source's own text is preferred
    whenever it exists (unless ``sampler`` is ``proxy``): it is the better estimate.
    """
    config = config or CalibrationConfig()
    if sampler not in SAMPLERS:
        raise MintError(f"unknown --sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    refused: MintError | None = None
    try:
        choice: PassChoice | None = choose_pass(
            source, config, sensitivity_pass, max_memory, sampler
        )
    except (CalibrationMemoryError, NotStreamableError) as e:
        choice, refused = None, e  # a cached entry still serves; else this is raised below
    full, proxy = replace(config, proxy=False), replace(config, proxy=True)
    if config.text_file or sampler == "full":
        lookups = [full]
    elif sampler == "proxy":
        lookups = [proxy]
    elif choice is None or choice.sampler == "proxy":
        lookups = [full, proxy]
    else:
        lookups = [full]
    for candidate in lookups:
        path = calibration_path(source, candidate)
        if path.exists():
            loaded = mx.load(str(path))
            assert isinstance(loaded, dict)
            text = _text(candidate, sampler)
            return Sensitivity(loaded, None, text, candidate.key(source), candidate)
    if choice is None:
        assert refused is not None
        raise refused
    used = proxy if choice.sampler == "proxy" else full
    path = calibration_path(source, used)
    keys = [t.key for t in source.quantizable]
    seqs, model = calibration_tokens(source, config, choice.sampler, progress)
    if choice.kind == "in-memory":
        model = model if model is not None else load_float32_model(source)
        weights = column_fisher(model, seqs, keys, progress)
    else:
        del model  # the sampler's copy: the streamed pass holds one block at a time
        weights = streamed_column_fisher(source, seqs, keys, choice.activations_on_disk, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.safetensors")  # ranks may share the cache
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path)
    return Sensitivity(weights, choice, _text(used, sampler), used.key(source), used)


def input_moments(
    source: Source, config: CalibrationConfig, progress: bool = False
) -> InputMoments:
    """The second moments of every linear layer's inputs over the calibration text of
    ``config`` (the text the column Fisher came from: the same tokens), cached beside it.

    The forward pass holds the float32 model in memory; a streamed version is not written yet.
    """
    path = input_moments_path(calibration_path(source, config))
    if not path.exists():
        sampler = "proxy" if config.proxy else "in-memory"  # a text file takes precedence
        seqs, model = calibration_tokens(source, config, sampler, progress)
        model = model if model is not None else load_float32_model(source)
        keys = [t.key for t in source.quantizable]
        matrices, aliases = collect_input_moments(model, seqs, keys, progress)
        save_input_moments(path, matrices, aliases)
    return InputMoments(path)


def calibrate(
    source: Source,
    config: CalibrationConfig | None = None,
    progress: bool = False,
    sensitivity_pass: str = "auto",
    max_memory: int | None = None,
    sampler: str = "auto",
) -> dict[str, mx.array]:
    """The column weights of :func:`sensitivity`."""
    return sensitivity(source, config, progress, sensitivity_pass, max_memory, sampler).columns
