"""Error-compensated rounding (GPTQ-style) in plain MLX affine, with our fitted scales.

Round-to-nearest treats every weight alone. A linear layer's output error is ``dW x``, and its
inputs are correlated: the error of one column can be partly cancelled by nudging the columns
not yet rounded. GPTQ (Frantar et al., 2022) does this column by column with the inverse of the
inputs' second moment. Here the quadratic form is the one our analysis already weighs errors
by, made whole:

    H = D^1/2 C D^1/2

with ``D`` the column Fisher (the diagonal the analysis has always used) and ``C`` the
correlation matrix of the layer's inputs over the calibration tokens
(:mod:`mint_mlx.sensitivity.inputs`). Under the Kronecker (K-FAC) view of the Fisher, ``H`` is
the row-averaged Fisher itself, and its diagonal is exactly the column weights, so a row's
error ``dw H dw^T`` equals today's weighted error when errors are uncorrelated, and measures
what compensation gains when they are not.

Each group's (scale, bias) is fitted (:mod:`mint_mlx.quant.scales`) on the weights as updated
when the rounding reaches the group, as GPTQ computes its group scales; the codes are then
chosen column by column with error feedback. Rows are independent given ``H``, so the analysis
runs this on its row sample, every candidate format of a tensor at once (stacked as rows), and
the save on all rows: the same arithmetic, so the allocator sees what gets written. The output
is plain MLX affine: stock mlx-lm loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mint_mlx.quant.scales import ITERATIONS, Rounder, _fit_2d

#: Damping: this share of the mean diagonal is added to ``H`` before inverting. GPTQ uses 0.01
#: with ~100k tokens; our data-free pass has ~2k, and with 0.01 the feedback fitted to them
#: made held-out error worse on SmolLM2's down_proj (1.17-1.23x), where 1.0 gave 0.85x
#: (benchmarks/RESULTS.md, "Error-compensated rounding").
DAMP = 1.0

#: Columns rounded between two matrix updates of the rest (GPTQ's lazy batch); a multiple of
#: every group size it handles.
BLOCK = 128


@dataclass
class Factor:
    """What error feedback needs from one tensor's inputs: ``h`` (the quadratic form errors are
    measured in, undamped) and ``u``, the upper Cholesky factor of the damped ``H``'s inverse."""

    h: np.ndarray  # (n, n) float32
    u: np.ndarray  # (n, n) float32, upper triangular


def correlation(moments: np.ndarray) -> np.ndarray:
    """The correlation matrix of a second-moment matrix (a column that never fired: zero
    off the diagonal, one on it)."""
    d = np.sqrt(np.maximum(np.diag(moments).astype(np.float64), 0.0))
    live = d > 0
    inv = np.where(live, 1.0 / np.where(live, d, 1.0), 0.0)
    c = moments.astype(np.float64) * inv[:, None] * inv[None, :]
    np.fill_diagonal(c, 1.0)
    return c


def factor(moments: np.ndarray, columns: np.ndarray, damp: float = DAMP) -> Factor:
    """The :class:`Factor` for a tensor with column Fisher ``columns`` (n,) whose inputs have
    second moments ``moments`` (n, n)."""
    root = np.sqrt(columns.astype(np.float64))
    h = correlation(moments) * root[:, None] * root[None, :]
    damped = h + np.eye(h.shape[0]) * (damp * float(np.mean(np.diag(h))))
    lower = np.linalg.cholesky(damped)
    eye = np.eye(h.shape[0])
    inv_lower = np.linalg.solve(lower, eye)  # H^-1 = L^-T L^-1
    hinv = inv_lower.T @ inv_lower
    u = np.linalg.cholesky(hinv).T  # H^-1 = U^T U, U upper: GPTQ's form
    return Factor(h.astype(np.float32), np.ascontiguousarray(u, dtype=np.float32))


@dataclass
class Rounded:
    """One format's result on the rows given: codes (rows, n), and per-group scales and
    biases (rows, groups), float32 already rounded to the storage dtype."""

    bits: int
    group_size: int
    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray

    def restored(self) -> np.ndarray:
        """The float32 weights the stored arrays represent."""
        g = self.group_size
        rows, n = self.codes.shape
        q = self.codes.reshape(rows, n // g, g)
        return (q * self.scales[..., None] + self.biases[..., None]).reshape(rows, n)


def compensated(
    w: np.ndarray,
    formats: Sequence[tuple[int, int]],
    columns: np.ndarray,
    f: Factor,
    rnd: Rounder,
    iterations: int = ITERATIONS,
) -> list[Rounded]:
    """Round the rows of ``w`` (rows, n) in each (bits, group size) of ``formats`` with error
    feedback: one pass over the columns for all formats together (each format's copy of the
    rows is a slice of one stacked array)."""
    rows, n = w.shape
    k = len(formats)
    if any(n % g or BLOCK % g for _, g in formats):
        raise ValueError(f"width {n} does not split into the groups of {formats}")
    work = np.tile(w.astype(np.float32), (k, 1))
    codes = np.empty_like(work)
    qmax = np.repeat(np.array([2.0**b - 1 for b, _ in formats], np.float32), rows)
    s_now = np.zeros(k * rows, np.float32)
    b_now = np.zeros(k * rows, np.float32)
    scales = [np.empty((rows, n // g), np.float32) for _, g in formats]
    biases = [np.empty((rows, n // g), np.float32) for _, g in formats]
    cols = columns.astype(np.float32)
    u = f.u
    for start in range(0, n, BLOCK):
        end = min(n, start + BLOCK)
        err = np.empty((k * rows, end - start), np.float32)
        for j in range(start, end):
            for i, (bits, g) in enumerate(formats):
                if j % g == 0:  # this format's group starts: fit it on the updated weights
                    sl = slice(i * rows, (i + 1) * rows)
                    fit = _fit_2d(
                        np.ascontiguousarray(work[sl, j : j + g]),
                        cols[j : j + g],
                        bits,
                        g,
                        rnd,
                        iterations,
                        False,
                    )
                    s_now[sl], b_now[sl] = fit.s[:, 0], fit.b[:, 0]
                    scales[i][:, j // g], biases[i][:, j // g] = fit.s[:, 0], fit.b[:, 0]
            x = work[:, j]
            inv = np.where(s_now != 0, 1.0 / np.where(s_now != 0, s_now, 1.0), 0.0)
            q = np.clip(np.rint((x - b_now) * inv), 0.0, qmax)
            codes[:, j] = q
            e = (x - (q * s_now + b_now)) / u[j, j]
            err[:, j - start] = e
            if j + 1 < end:
                work[:, j + 1 : end] -= np.outer(e, u[j, j + 1 : end])
        if end < n:
            work[:, end:] -= err @ u[start:end, end:]
    return [
        Rounded(bits, g, codes[i * rows : (i + 1) * rows], scales[i], biases[i])
        for i, (bits, g) in enumerate(formats)
    ]


def row_form(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each row's ``d H d^T``: its error in the quadratic form (float64 sums)."""
    return np.einsum("rn,rn->r", (delta @ h).astype(np.float64), delta.astype(np.float64))
