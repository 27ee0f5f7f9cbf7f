"""Text -> token windows, the same for every model compared: tokenize once, cut non-overlapping
windows (with a BOS where the tokenizer prepends one), batch them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.source.tokens import cut_windows, encode, prepended_bos_id
from mint_mlx.tools.evaluation.result import EvaluateError

#: Upper bound on batch * seq_len * vocab (float32 logits elements) when batch_size is automatic.
_AUTO_BATCH_ELEMENTS = 1 << 27


def auto_batch_size(seq_len: int, vocab: int) -> int:
    return max(1, _AUTO_BATCH_ELEMENTS // max(1, seq_len * vocab))


def read_text(text: str | Path) -> str:
    if isinstance(text, Path):
        try:
            return text.read_text(encoding="utf-8")
        except OSError as e:
            raise EvaluateError(f"cannot read the text file {text}: {e.strerror}") from e
    return text


def windows_from_tokens(
    ids: Sequence[int] | np.ndarray,
    seq_len: int,
    tokens: int | None = None,
    bos_id: int | None = None,
) -> mx.array:
    """Non-overlapping windows ``(n_windows, seq_len)`` from the first ``tokens`` of ``ids``.

    With ``bos_id`` every window starts with BOS followed by ``seq_len - 1`` text tokens, so that
    models that expect a BOS (Gemma) see each window as a document start; BOS itself is never a
    scored prediction, so every window scores ``seq_len - 1`` tokens either way.
    """
    if seq_len < 2:
        raise EvaluateError(f"seq_len must be at least 2, got {seq_len}")
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if tokens is not None:
        arr = arr[:tokens]
    win = cut_windows(arr, seq_len, bos_id)
    if len(win) == 0:
        raise EvaluateError(
            f"the text holds {len(arr)} tokens, fewer than one window of {seq_len}; "
            "give a longer text or a smaller --seq-len"
        )
    return mx.array(win.astype(np.int32))


def make_windows(
    tokenizer: Any, text: str, seq_len: int = 512, tokens: int | None = None
) -> mx.array:
    """Tokenize ``text`` (no special tokens) and cut it into windows; see :func:`windows_from_tokens`."""
    return windows_from_tokens(
        encode(tokenizer, text), seq_len, tokens, bos_id=prepended_bos_id(tokenizer)
    )
