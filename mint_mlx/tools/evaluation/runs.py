"""The entry points: one model against a reference (:func:`evaluate`), many against one cached
reference run (:func:`evaluate_many`), or a perplexity alone (:func:`perplexity`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from mint_mlx.path_safety import writing
from mint_mlx.tools.evaluation.backends import load_for_eval, resolve_backend
from mint_mlx.tools.evaluation.kld import score_windows
from mint_mlx.tools.evaluation.reference_cache import (
    ReferenceCache,
    build_reference_cache,
    check_cache_dir,
    score_against_cache,
)
from mint_mlx.tools.evaluation.result import EvalResult, ppl_from_nll, result_from_scores
from mint_mlx.tools.evaluation.windows import make_windows, read_text, windows_from_tokens


def evaluate(
    model: str | Path,
    reference: str | Path | None,
    text: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` and, with a ``reference``, KL(R||Q) and top-1 agreement.

    ``text`` is the text itself, or a :class:`~pathlib.Path` to read. It is tokenized with the
    reference's tokenizer (the model's when there is no reference) and cut into non-overlapping
    ``seq_len`` windows from its first ``tokens`` tokens. ``batch_size=None`` picks one that keeps a
    batch's float32 logits near 512 MB. Both models stay loaded (in float32 for ``dequant-fp32``).
    """
    body = read_text(text)
    backend = resolve_backend(backend)
    start = time.perf_counter()
    ref_model = None
    if reference is not None:
        ref_model, tokenizer = load_for_eval(reference, backend)
        q_model, _ = load_for_eval(model, backend)
    else:
        q_model, tokenizer = load_for_eval(model, backend)
    windows = make_windows(tokenizer, body, seq_len, tokens)
    scores = score_windows(q_model, windows, ref_model, batch_size, progress)
    result = result_from_scores(scores, int(windows.shape[0]), seq_len, backend)
    result.seconds = time.perf_counter() - start
    return result


def perplexity(
    model_path: str | Path,
    text_or_tokens: str | Path | Sequence[int] | np.ndarray | mx.array,
    seq_len: int = 512,
    tokens: int | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
) -> float:
    """Perplexity of one model on a text (tokenized with its own tokenizer) or on token ids.

    Token ids may be 1-D (cut into windows here, no BOS added) or 2-D (taken as the windows,
    ``seq_len`` and ``tokens`` ignored).
    """
    backend = resolve_backend(backend)
    model, tokenizer = load_for_eval(model_path, backend)
    if isinstance(text_or_tokens, str | Path):
        windows = make_windows(tokenizer, read_text(text_or_tokens), seq_len, tokens)
    else:
        arr = np.asarray(text_or_tokens)
        if arr.ndim == 2:
            windows = mx.array(arr.astype(np.int32))
        else:
            windows = windows_from_tokens(arr, seq_len, tokens)
    return ppl_from_nll(score_windows(model, windows, None, batch_size)["nll"])[0]


def evaluate_cached(
    model: str | Path,
    cache: ReferenceCache,
    batch_size: int | None = None,
    progress: bool = False,
    per_window: bool = False,
) -> EvalResult:
    """:func:`evaluate` of one model directory against a :class:`ReferenceCache` (same windows,
    same backend as the cache was built with); ``seconds`` covers loading and scoring.
    ``per_window`` also fills :attr:`EvalResult.kld_windows`."""
    start = time.perf_counter()
    q_model, _ = load_for_eval(model, cache.backend)
    scores = score_against_cache(q_model, cache, batch_size, progress)
    del q_model
    result = result_from_scores(scores, cache.n_windows, cache.seq_len, cache.backend)
    if per_window:
        per = scores["kld"].astype(np.float64).reshape(cache.n_windows, -1).mean(axis=1)
        result.kld_windows = [float(x) for x in per]
    result.seconds = time.perf_counter() - start
    return result


def evaluate_many(
    models: Sequence[str | Path],
    reference: str | Path,
    text: str | Path,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int | None = None,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[EvalResult]:
    """:func:`evaluate` of each of ``models`` against one ``reference``, which runs only once.

    The reference's distributions go to a :class:`ReferenceCache` under ``cache_dir`` (kept, and
    reused by a later call with the same reference, text and settings) or, when ``cache_dir`` is
    None, under a temporary directory removed at the end. Models are loaded one at a time.
    Results equal :func:`evaluate`'s except for the float16 rounding of the reference in KL.
    """
    if cache_dir is not None:
        check_cache_dir(Path(cache_dir).expanduser(), [*models, reference], text)
    with (
        tempfile.TemporaryDirectory(prefix="mint-ref-") as tmp,
        writing("the reference cache in", Path(cache_dir or tmp)),
    ):
        cache = build_reference_cache(
            reference,
            text,
            cache_dir if cache_dir is not None else tmp,
            tokens=tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            backend=backend,
            progress=progress,
        )
        return [evaluate_cached(m, cache, batch_size, progress) for m in models]
