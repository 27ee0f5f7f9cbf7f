"""One accumulator for the column Fisher, shared by the in-memory and the streamed pass.

Both passes must give the same numbers (they share a cache entry), so the arithmetic that turns
per-sequence gradients into column weights lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

#: A column's weight is floored at this share of its tensor's mean: a column (or an expert the
#: calibration text never routed to) with zero measured Fisher must still not count as free.
FLOOR = 0.05

#: Tokens per backward pass: sequences shorter than this go through one backward together, as
#: one unit whose gradients are summed before squaring. Cross terms between sequences vanish in
#: expectation exactly as those between the tokens of one sequence do (each token's score has
#: zero mean given everything before it), so a unit is a sequence for the estimate; a recipe of
#: many short sequences (faster to sample) then costs the default's backward passes.
UNIT_TOKENS = 256


def sequences_per_unit(seq_len: int) -> int:
    """``UNIT_TOKENS // seq_len`` sequences per backward pass; one when they are at least that
    long, as for the default 8 x 256. The calibration cache key names it, so it lives once."""
    return max(1, UNIT_TOKENS // seq_len)


def fisher_units(sequences: int, seq_len: int) -> list[slice]:
    """Consecutive groups of :func:`sequences_per_unit` sequences, each one backward pass of
    the estimate."""
    per = sequences_per_unit(seq_len)
    return [slice(a, min(a + per, sequences)) for a in range(0, sequences, per)]


class FisherSums:
    """Sum over sequences of the per-token Fisher averaged over output rows, per weight."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(keys)
        self.totals: dict[str, mx.array] = {}

    def add(self, key: str, grad: mx.array, tokens: int) -> None:
        """One sequence's gradient of the summed log-likelihood over ``tokens`` tokens.

        E[G^2] = T x (per-token Fisher): the score has zero mean, so cross terms vanish. The
        mean over output rows (axis -2) assumes the rows of a column alike.
        """
        self._accumulate(key, (grad * grad).mean(axis=-2) / tokens)

    def add_row_sums(self, key: str, squares: mx.array, rows: int, tokens: int) -> None:
        """Like :meth:`add`, given the gradient's squares already summed over its ``rows``
        rows (the streamed pass sums a lookup's few nonzero rows without the dense gradient)."""
        self._accumulate(key, squares / rows / tokens)

    def _accumulate(self, key: str, col: mx.array) -> None:
        self.totals[key] = self.totals[key] + col if key in self.totals else col

    def arrays(self) -> list[mx.array]:
        return list(self.totals.values())

    def finish(self, sequences: int) -> dict[str, mx.array]:
        """Mean over ``sequences`` (the units of :func:`fisher_units`), floored (see
        :data:`FLOOR`), for every key asked for."""
        missing = [k for k in self.keys if k not in self.totals]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[0]}; please report it")
        out = {}
        for key in self.keys:
            v = self.totals[key] / sequences
            out[key] = v + FLOOR * v.mean()
        return out
