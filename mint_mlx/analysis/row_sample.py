"""Which rows of a tensor the analysis quantizes, and how much each measured row stands for.

The allocator needs every candidate's error to a few percent, not exactly. Quantization groups
never cross rows, so a tensor's squared error is a sum over rows, and a sample of rows estimates
it. The sample is built so that the estimate is precise with few rows:

- **A proxy for every row, from one cheap pass.** Affine error grows with the square of each
  group's range, so ``proxy[r] = sum over 32-wide groups of range**2`` (each group's range
  weighted by its mean Fisher column weight when the error is weighted) follows the row's error
  in any format closely. Computing it reads every weight once, with no quantization.
- **Stratified by the proxy.** The rows with the largest proxy (outlier rows, whose error
  dominates) are all measured; the rest are sorted by proxy into equal strata and the same
  number of rows is drawn from each.
- **A ratio estimator per stratum.** A stratum's error is its measured rows' error times its
  total proxy over their proxy, so the estimate is exact whenever error is proportional to the
  proxy within a stratum, and only the departure from that proportion is sampled.
- **Paired.** Every candidate format of a tensor is measured on the same rows, so differences
  between candidates (what the allocator compares) are much more precise than each estimate.

The draw is seeded by the tensor's path, so a tensor gets the same rows in any process, with
any ``--jobs``: the plan does not depend on how the work was split.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

#: Weights measured per tensor (per expert of an expert stack): fixed, so the analysis costs
#: follow the number of tensors rather than their size. Chosen by measurement
#: (benchmarks/sampled_distortion.py, RESULTS.md "Sampled distortion").
SAMPLE_ELEMENTS = 1 << 17

#: A tensor with fewer rows than this many times the sample is measured whole: sampling would
#: save little there and every row is then exact.
WHOLE_BELOW = 2

#: Fraction of the sampled rows given to the largest-proxy rows, which are measured as they are.
TOP_SHARE = 0.125

#: Proxy strata the other rows are split into (fewer when the sample is small).
STRATA = 8

#: Group width of the proxy: the smallest native group size, which divides every quantizable
#: width.
PROXY_GROUP = 32

#: Rows read at a time when computing the proxy (bounded memory on any tensor).
PROXY_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RowStats:
    """Per-row facts from one pass over a 2-D weight: energy (exact, summed later) and the
    error proxies that stratify the sample."""

    energy: np.ndarray  # float64 (rows,): sum of squared weights per row
    proxy: np.ndarray  # float64 (rows,): sum of squared group ranges
    weighted_proxy: np.ndarray | None  # the same, each group weighted by its mean column weight
    finite: bool


@dataclass
class RowSample:
    """The rows to measure and, per measured row, how many rows' error it stands for under
    the plain and the column-weighted error."""

    rows: np.ndarray  # int64 (n,), sorted
    plain_factor: np.ndarray  # float64 (n,)
    weighted_factor: np.ndarray  # float64 (n,)


def row_stats(rows: mx.array, columns: mx.array | None) -> RowStats:
    """Energy and proxies of every row of a 2-D ``rows`` array, chunk by chunk."""
    n, width = rows.shape
    group = PROXY_GROUP if width % PROXY_GROUP == 0 else width
    col_w = None
    if columns is not None:
        col_w = np.asarray(columns.astype(mx.float32)).reshape(width // group, group).mean(axis=1)
    step = max(1, PROXY_CHUNK_ELEMENTS // width)
    energy = np.empty(n, dtype=np.float64)
    proxy = np.empty(n, dtype=np.float64)
    weighted = None if col_w is None else np.empty(n, dtype=np.float64)
    for start in range(0, n, step):
        chunk = rows[start : start + step].astype(mx.float32)
        # the groups' ranges in MLX, whose max/min over a short last axis is vectorized
        # (numpy's runs a scalar loop per group: 2.3x slower here); the energy in numpy,
        # which sums in float64
        grouped = chunk.reshape(chunk.shape[0], width // group, group)
        ranges = grouped.max(axis=2) - grouped.min(axis=2)
        mx.eval(chunk, ranges)
        x = np.asarray(chunk)
        stop = start + x.shape[0]
        energy[start:stop] = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        r = np.asarray(ranges)
        r2 = r * r
        proxy[start:stop] = r2.sum(axis=1, dtype=np.float64)
        if weighted is not None and col_w is not None:
            weighted[start:stop] = r2 @ col_w.astype(np.float64)
    finite = bool(np.isfinite(energy).all())
    return RowStats(energy, proxy, weighted, finite)


def sample_rows(rows: int, width: int, sample_elements: int | None) -> int | None:
    """How many rows to measure of a ``rows x width`` tensor, or ``None`` for all of them."""
    if sample_elements is None:
        return None
    n = max(STRATA * 4, -(-sample_elements // width))
    return None if rows < WHOLE_BELOW * n else n


def draw(stats: RowStats, n: int, seed: int) -> RowSample:
    """A stratified sample of ``n`` rows with ratio-estimator factors (see the module doc)."""
    key = stats.weighted_proxy if stats.weighted_proxy is not None else stats.proxy
    order = np.argsort(-key, kind="stable")
    top = max(1, int(n * TOP_SHARE))
    rng = np.random.default_rng(seed)
    chosen = [order[:top]]
    plain_f = [np.ones(top)]
    weighted_f = [np.ones(top)]
    rest = order[top:]
    strata = max(1, min(STRATA, (n - top) // 4))
    for h, stratum in enumerate(np.array_split(rest, strata)):
        take = (n - top) // strata + (1 if h < (n - top) % strata else 0)
        picked = rng.choice(stratum, size=min(take, stratum.size), replace=False)
        chosen.append(picked)
        plain_f.append(_ratio(stats.proxy, stratum, picked))
        weighted_f.append(_ratio(key, stratum, picked))
    rows = np.concatenate(chosen)
    sort = np.argsort(rows)
    return RowSample(
        rows=rows[sort].astype(np.int64),
        plain_factor=np.concatenate(plain_f)[sort],
        weighted_factor=np.concatenate(weighted_f)[sort],
    )


def _ratio(proxy: np.ndarray, stratum: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Each picked row's factor: the stratum's total proxy over the picked rows' proxy (a
    ratio estimator), or its row count over the picked count where the proxy is all zero."""
    measured = float(proxy[picked].sum())
    whole = float(proxy[stratum].sum())
    factor = whole / measured if measured > 0.0 else stratum.size / picked.size
    return np.full(picked.size, factor)


def seed_for(path: str) -> int:
    """The draw's seed: from the tensor's path, the same in every process."""
    return zlib.crc32(path.encode())
