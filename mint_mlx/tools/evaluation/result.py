"""What an evaluation measured (:class:`EvalResult`), from per-token arrays."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mint_mlx.blas import openblas_active
from mint_mlx.errors import MintError


class EvaluateError(MintError):
    """The evaluation cannot run as asked (bad text, too few tokens, mismatched models)."""


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. Reference fields are ``None`` when no reference was given.

    KL divergence is KL(R || Q) in nats per scored token (R the reference's next-token
    distribution, Q the model's); ``top1_agreement`` is the fraction of scored positions where
    both models' most likely next token is the same.
    """

    ppl: float
    ppl_stderr: float
    ppl_reference: float | None
    kld_mean: float | None
    kld_median: float | None
    kld_p99: float | None
    top1_agreement: float | None
    n_tokens: int
    n_windows: int
    seq_len: int
    backend: str
    openblas: bool
    seconds: float
    #: Mean KLD of each window, in order (only from :func:`evaluate_cached` with ``per_window``):
    #: two models scored on the same windows can then be compared pairwise, window by window.
    kld_windows: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ppl_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """Perplexity and its delta-method standard error (as mlx-lm's ``eval_ppl``)."""
    mean = float(np.mean(nll, dtype=np.float64))
    ppl = math.exp(mean)
    se = float(np.std(nll, ddof=1, dtype=np.float64)) / math.sqrt(nll.size) if nll.size > 1 else 0.0
    return ppl, ppl * se


def result_from_scores(
    scores: dict[str, np.ndarray], n_windows: int, seq_len: int, backend: str
) -> EvalResult:
    """An :class:`EvalResult` from per-token arrays (``seconds`` left for the caller)."""
    ppl, se = ppl_from_nll(scores["nll"])
    result = EvalResult(
        ppl=ppl,
        ppl_stderr=se,
        ppl_reference=None,
        kld_mean=None,
        kld_median=None,
        kld_p99=None,
        top1_agreement=None,
        n_tokens=int(scores["nll"].size),
        n_windows=n_windows,
        seq_len=seq_len,
        backend=backend,
        openblas=openblas_active(),
        seconds=0.0,
    )
    if "kld" in scores:
        kld = scores["kld"].astype(np.float64)
        result.ppl_reference = ppl_from_nll(scores["nll_ref"])[0]
        result.kld_mean = float(kld.mean())
        result.kld_median = float(np.median(kld))
        result.kld_p99 = float(np.percentile(kld, 99))
        result.top1_agreement = float(scores["same_top1"].mean(dtype=np.float64))
    return result
