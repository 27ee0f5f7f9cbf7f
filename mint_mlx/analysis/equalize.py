"""Choosing the equivalent scales (``--equalize``): one exponent per layer group, measured.

For each group of linear layers that read one input (:func:`mint_mlx.quant.equalize.fold_groups`)
the scale of input column ``j`` is ``r_j ** a``, where ``r`` is the group's column Fisher
(each consumer's normalized to mean 1, summed): the columns whose rounding costs the most
output get the finest steps. AWQ searches the same kind of exponent over activation
magnitudes, measuring the layer's output error; here the exponent is the one, of
:data:`EXPONENTS`, that gives the group the lowest Fisher-weighted error in the reference
format (:data:`REFERENCE`, MLX's default 4-bit g64, with fitted scales), measured on a row
sample. ``a = 0`` (no scaling) is among them, so no group is made worse there.

The exponent is chosen once per group, not per candidate format: the group's layers share one
scale (it is folded into one norm or one layer), while the allocator may give each a different
format. The best exponent varies little with the format (measured on SmolLM2: 0.1-0.15 at 3-bit
g64, 4-bit g64 and 4-bit g32 alike). The analysis then measures every candidate of every layer
with the chosen scales, so the allocator's curves are what save writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mint_mlx.analysis.measure import measure
from mint_mlx.analysis.row_sample import seed_for
from mint_mlx.formats import format_by_name
from mint_mlx.path_safety import writing
from mint_mlx.paths import cache_root
from mint_mlx.quant.equalize import (
    EQUALIZE_VERSION,
    FoldGroup,
    Scaling,
    exact_norm_scale,
    fold_groups,
)
from mint_mlx.source.model import Source

#: The exponents tried per group (0: unscaled).
EXPONENTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
#: The format the exponent is chosen in.
REFERENCE = "affine-4-g64"
#: Weights per consumer the search measures (a row sample, the same rows for every exponent,
#: so the comparison between exponents is paired): a quarter of the analysis's sample, since
#: only the order of the exponents matters here.
SEARCH_ELEMENTS = 1 << 15


def scaling_key(calibration: str, dtype: mx.Dtype) -> str:
    """What a scaling depends on: the Fisher weights (whose key fingerprints the source's
    content and the calibration text), the output dtype (the norms' rounding), the search and
    this module's version."""
    h = hashlib.sha256()
    h.update(calibration.encode())
    h.update(str(dtype).encode())
    h.update(f"{EXPONENTS}:{REFERENCE}:{SEARCH_ELEMENTS}:v{EQUALIZE_VERSION}".encode())
    return h.hexdigest()[:24]


def _group_error(
    group: FoldGroup,
    weights: dict[str, mx.array],
    columns: dict[str, mx.array],
    col: np.ndarray,
    dtype: mx.Dtype,
) -> float:
    """The group's summed Fisher-weighted error in :data:`REFERENCE` with column scale ``col``."""
    ref = format_by_name(REFERENCE)
    total = 0.0
    for c in group.consumers:
        m = measure(
            weights[c],
            [ref],
            dtype,
            columns[c],
            "optimized",
            SEARCH_ELEMENTS,
            seed_for(c),
            column_scale=col,
        )
        assert m.wsse is not None
        total += m.wsse[0]
    return total


def _relevance(group: FoldGroup, columns: dict[str, mx.array]) -> np.ndarray | None:
    """The group's column Fisher on the target's rows or channels, or None if it is all 0."""
    parts = []
    for c in group.consumers:
        d = np.array(columns[c].astype(mx.float32), dtype=np.float64)
        mean = d.mean()
        if not np.isfinite(mean) or mean <= 0:
            return None
        parts.append(d / mean)
    r = group.tied(np.sum(parts, axis=0))
    return np.maximum(r, 1e-6 * r.mean())


def choose_group(
    source: Source,
    group: FoldGroup,
    columns: dict[str, mx.array],
    dtype: mx.Dtype,
    scaling: Scaling,
) -> None:
    """Measure every exponent for ``group`` and add the best to ``scaling``."""
    r = _relevance(group, columns)
    if r is None:
        scaling.add(group, np.ones(1, np.float32), 0.0)
        return
    weights = {c: source.tensor(c) for c in group.consumers}
    gamma = None
    if group.kind == "norm":
        gamma = np.array(source.tensor(group.target).astype(mx.float32))
    best: tuple[float, float, np.ndarray, np.ndarray | None] | None = None
    for a in EXPONENTS:
        s = r**a
        s = s / np.sqrt(s.max() * s.min())
        norm = None
        if gamma is not None:
            norm, s = exact_norm_scale(gamma, s, group.offset, dtype)
        err = _group_error(group, weights, columns, group.consumer_scale(s), dtype)
        if best is None or err < best[0]:
            best = (err, a, s, norm)
    assert best is not None
    scaling.add(group, best[2], best[1], best[3])
    for key in (*group.consumers, group.target):
        source.release(key)


def choose_scaling(
    source: Source,
    columns: dict[str, mx.array],
    dtype: mx.Dtype,
    calibration: str,
    progress: bool = False,
    cache: Path | None = None,
) -> Scaling:
    """The scales of every group :func:`fold_groups` finds, read from the cache when it has
    them (keyed by :func:`scaling_key`), else measured and cached."""
    key = scaling_key(calibration, dtype)
    path = cache or cache_root() / "equalize" / f"{key}.safetensors"
    if path.exists():
        cached = Scaling.load(path)
        if cached is not None:
            return cached
    groups = fold_groups(
        source.model_type,
        source.config,
        source.shapes,
        {t.key for t in source.quantizable},
    )
    scaling = Scaling()
    for group in tqdm(groups, desc="equalize", unit="group", disable=not progress):
        choose_group(source, group, columns, dtype, scaling)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with writing("the equalization cache", partial):
        scaling.save(partial)
    partial.replace(path)
    return scaling
