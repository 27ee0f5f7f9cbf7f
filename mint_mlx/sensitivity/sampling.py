"""Calibration text as token ids: sampled from the model itself, or a user's text encoded.

Self-sampling needs token ids only (the start token comes from config.json), so a checkpoint
without tokenizer files converts with the default objective; only ``--calibration FILE`` needs
the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from mint_mlx.errors import SourceError
from mint_mlx.source.model import Source
from mint_mlx.source.tokens import cut_windows, encode, prepended_bos_id


def _first_int(value: Any) -> int | None:
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def start_token(source: Source) -> int:
    """The token self-sampled text starts from: BOS (else EOS) from config.json, then from
    generation_config.json, else 0. Token ids only: no tokenizer is needed to sample."""
    configs = [source.config]
    generation = source.path / "generation_config.json"
    if generation.is_file():
        try:
            configs.append(json.loads(generation.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    for name in ("bos_token_id", "eos_token_id"):
        for config in configs:
            token = _first_int(config.get(name)) if isinstance(config, dict) else None
            if token is not None:
                return token
    return 0


def sample_sequences(
    model: nn.Module, start: int, n: int, length: int, seed: int, progress: bool = False
) -> mx.array:
    """``n`` sequences of ``length`` tokens sampled from the model at temperature 1 from ``start``."""
    from mlx_lm.models.cache import make_prompt_cache

    # An explicit key chain, the same draws as ``mx.random.seed(seed)`` then global draws, but
    # immune to anything else drawing from the global state meanwhile (the streamed sampler
    # builds models, whose initializers draw, between two tokens).
    key = mx.random.key(seed)
    cache = make_prompt_cache(model)
    tokens = mx.full((n, 1), start, dtype=mx.int32)
    out = [tokens]
    for _ in tqdm(range(length - 1), desc="sample", unit="tok", disable=not progress):
        logits = model(tokens, cache=cache)[:, -1, :]
        key, draw = mx.random.split(key)
        tokens = mx.random.categorical(logits, key=draw)[:, None].astype(mx.int32)
        mx.eval(tokens)
        out.append(tokens)
    return mx.concatenate(out, axis=1)


def text_sequences(tokenizer: Any, path: Path, n: int, length: int) -> mx.array:
    """The first ``n`` non-overlapping windows of ``length`` tokens of the text in ``path``, cut
    as the evaluator cuts its windows: each starts with BOS when the tokenizer prepends one.

    Cutting one long encoding into chunks would leave every chunk but the first without a BOS;
    Gemma's activations on such windows are far from those it sees in use, and Fisher weights
    from them cost it almost 2x the KLD at the same bytes.
    """
    ids = encode(tokenizer, path.read_text(encoding="utf-8"))
    bos = prepended_bos_id(tokenizer)
    windows = cut_windows(ids, length, bos)
    if len(windows) == 0:
        need = length - 1 if bos is not None else length  # BOS is the window's first token
        raise SourceError(
            f"calibration text {path} has {len(ids)} tokens; need at least {need} for one "
            f"sequence of {length}: give a longer text"
        )
    return mx.array(windows[:n].astype(np.int32))
