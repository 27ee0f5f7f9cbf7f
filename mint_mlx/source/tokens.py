"""Text -> token ids the way the model expects them: no special tokens from the encoder, and a
BOS at the start of every window when the tokenizer itself prepends one.

One module for the calibration text (``--calibration``) and the evaluator's windows, so the
Fisher weights and the KLD that judges them see the same kind of window. Models trained with a
BOS at every document start (Gemma) behave very differently on a window without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def prepended_bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer itself prepends one to an encoded text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer.encode("a")
    return bos if ids and ids[0] == bos else None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS added)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast HF tokenizers
    if backend is not None:
        # Same ids as tokenizer.encode, without its "longer than model_max_length" warning.
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def cut_windows(
    ids: Sequence[int] | np.ndarray, seq_len: int, bos_id: int | None = None
) -> np.ndarray:
    """Non-overlapping windows ``(n, seq_len)`` of ``ids`` (int64); with ``bos_id`` each window
    is BOS followed by ``seq_len - 1`` text tokens. ``n`` is 0 when ``ids`` is too short."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    body = seq_len - 1 if bos_id is not None else seq_len
    n = len(arr) // body
    win = arr[: n * body].reshape(n, body)
    if bos_id is not None:
        win = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), win], axis=1)
    return win
