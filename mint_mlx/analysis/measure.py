"""Rate-distortion curves of single tensors: for each candidate format, bytes and error.

Distortion is measured, not modelled: each tensor is quantized in every candidate format with
MLX's own routines and compared with the original (sum of squared errors, plus the tensor's
energy so that relative error and SQNR follow). Large tensors are processed in row chunks so
that memory stays bounded by a chunk, not by the tensor; by default the errors are estimated
from a row sample (:mod:`mint_mlx.analysis.row_sample`).

With ``per_expert=True`` every MoE expert stack of E > 1 experts is measured as E curves, one per
expert (path ``module#e``, see :mod:`mint_mlx.quant.experts`), so the allocator can give each expert its
own format. The stack is walked expert by expert either way, so this costs nothing extra.

This is the work of one tensor, the same in every process: :mod:`mint_mlx.analysis.analyze` runs
it over a model (with its cache), here or in :mod:`mint_mlx.analysis.workers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.analysis.row_sample import draw, row_stats, sample_rows, seed_for
from mint_mlx.formats import Format
from mint_mlx.quant.experts import expert_infos, splits_per_expert
from mint_mlx.quant.gptq import Factor, compensated, factor, row_form
from mint_mlx.quant.quantize import compensates, dequantize_weight, quantize_weight, row_errors
from mint_mlx.quant.scales import storage_rounder
from mint_mlx.source.model import TensorInfo

#: Elements per chunk when measuring a large tensor (16 MB of float32 per chunk).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Candidate:
    """One format for one tensor: its exact saved bytes and its squared error."""

    format: str
    nbytes: int
    sse: float
    wsse: float | None = None  # squared error weighted by output sensitivity (Fisher columns)
    #: For a format whose scales were fitted: the errors with MLX's own round-to-nearest
    #: scales, i.e. of what ``mlx_lm convert`` would write (see :mod:`mint_mlx.allocation.stock`).
    rtn_sse: float | None = None
    rtn_wsse: float | None = None

    def as_stock(self) -> Candidate:
        """This format as stock mlx-lm would store it (its errors with MLX's own scales)."""
        if self.rtn_sse is None:
            return self
        return Candidate(self.format, self.nbytes, self.rtn_sse, self.rtn_wsse)


@dataclass
class RDCurve:
    """All measured candidates of one tensor, plus what the allocator needs to weigh them."""

    path: str
    shape: tuple[int, ...]
    role: str
    layer: int | None
    energy: float
    candidates: list[Candidate]
    fixed: bool = False
    note: str = ""
    digest: str = ""  # content hash of the tensor measured (mint_mlx.source.digests)
    sampled_rows: int = 0  # rows the errors were estimated from (0: every row, exact)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nrmse(self, c: Candidate) -> float:
        """Relative RMS error: sqrt(sum of squared errors / sum of squared weights)."""
        if self.energy <= 0.0:
            return 0.0
        return math.sqrt(max(c.sse, 0.0) / self.energy)

    def sqnr_db(self, c: Candidate) -> float:
        """Signal-to-quantization-noise ratio in dB (infinite when the error is zero)."""
        e = self.nrmse(c)
        return math.inf if e == 0.0 else -20.0 * math.log10(e)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> RDCurve:
        return RDCurve(
            path=d["path"],
            shape=tuple(d["shape"]),
            role=d["role"],
            layer=d["layer"],
            energy=float(d["energy"]),
            candidates=[Candidate(**c) for c in d["candidates"]],
            fixed=bool(d.get("fixed", False)),
            note=d.get("note", ""),
            digest=str(d.get("digest", "")),
            sampled_rows=int(d.get("sampled_rows", 0)),
        )


def _chunks(rows: mx.array) -> Iterator[mx.array]:
    """Row blocks of a 2-D ``rows`` array (groups never cross rows)."""
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step]


@dataclass
class Measured:
    """What :func:`measure` finds: exact energy, each format's (estimated) squared errors, and
    how many rows were measured (0: all of them)."""

    energy: float
    sse: list[float]
    wsse: list[float] | None
    finite: bool
    sampled_rows: int = 0
    #: Per format: the errors with MLX's own scales where the scales were fitted, else None.
    rtn_sse: list[float | None] | None = None
    rtn_wsse: list[float | None] | None = None


def _sum_parts(parts: Sequence[list[float | None] | None]) -> list[float | None] | None:
    """Element-wise sums over experts of optional per-format lists (None stays None)."""
    if any(p is None for p in parts):
        return None
    out: list[float | None] = []
    for values in zip(*parts, strict=True):  # type: ignore[misc]
        out.append(None if any(v is None for v in values) else sum(values))
    return out


def measure(
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scale_method: str = "rtn",
    sample_elements: int | None = None,
    seed: int = 0,
    moments: np.ndarray | None = None,
    column_scale: np.ndarray | None = None,
) -> Measured:
    """Energy of ``weight`` (exact) and each format's squared error, plain and column-weighted:
    exact, or estimated from a stratified sample of rows of about ``sample_elements`` weights
    (:mod:`mint_mlx.analysis.row_sample`; the same rows for every format).

    A 3-D expert stack is measured expert by expert (each has its own columns), the sample
    shared out so that every expert is represented.

    With ``scale_method="gptq"`` and the ``moments`` of a 2-D weight's inputs, the native
    affine formats are rounded with error feedback (:mod:`mint_mlx.quant.gptq`), and every
    format's weighted error is its quadratic form under the full ``H`` (whose diagonal is the
    column weights): the measure that sees what feedback gains.

    With a ``column_scale`` ``s`` (equivalent scaling, :mod:`mint_mlx.quant.equalize`) of a 2-D
    weight, the formats store ``weight * s``: they are measured on it with columns ``/ s^2``
    (and moments ``/ s s^T``), so the weighted errors stay in the original units, while the
    energy and plain errors are those of the stored tensor (its relative error). Stock's
    errors (MLX's own scales on the unscaled weight: stock has no scaling) are measured apart
    and carried as the round-to-nearest errors, the plain ones in the stored tensor's units.
    """
    if column_scale is not None and weight.ndim == 2:
        return _measure_scaled(
            weight,
            formats,
            dtype,
            columns,
            scale_method,
            sample_elements,
            seed,
            moments,
            column_scale,
        )
    if weight.ndim == 3:
        experts = weight.shape[0]
        share = None if sample_elements is None else max(1, sample_elements // experts)
        parts = [
            measure(
                weight[e],
                formats,
                dtype,
                None if columns is None else columns[e],
                scale_method,
                share,
                seed + e,
            )
            for e in range(experts)
        ]
        return Measured(
            energy=sum(p.energy for p in parts),
            sse=[sum(v) for v in zip(*(p.sse for p in parts), strict=True)],
            wsse=None
            if columns is None
            else [sum(v) for v in zip(*(p.wsse or [] for p in parts), strict=True)],
            finite=all(p.finite for p in parts),
            sampled_rows=sum(p.sampled_rows for p in parts),
            rtn_sse=_sum_parts([p.rtn_sse for p in parts]),
            rtn_wsse=None if columns is None else _sum_parts([p.rtn_wsse for p in parts]),
        )
    rows = weight.reshape(-1, weight.shape[-1])
    stats = row_stats(rows, columns)
    energy = float(stats.energy.sum())
    sse = [0.0] * len(formats)
    wsse = None if columns is None else [0.0] * len(formats)
    rtn = _Totals(len(formats), columns is not None)
    if not stats.finite or not math.isfinite(energy):
        return Measured(energy, sse, wsse, False)
    n = sample_rows(rows.shape[0], rows.shape[1], sample_elements)
    feedback = None
    if moments is not None and columns is not None and scale_method == "gptq":
        feedback = factor(moments, np.array(columns.astype(mx.float32)))
    if n is None:
        for chunk in _chunks(rows):
            if feedback is not None:
                _add_compensated(chunk, formats, dtype, columns, feedback, sse, wsse, rtn)
            else:
                _add_errors(chunk, formats, dtype, columns, scale_method, sse, wsse, rtn=rtn)
        return Measured(energy, sse, wsse, True, 0, rtn.plain, rtn.weighted)
    sample = draw(stats, n, seed)
    picked = rows[mx.array(sample.rows)]
    factors = (
        mx.array(sample.plain_factor, mx.float32),
        mx.array(sample.weighted_factor, mx.float32),
    )
    if feedback is not None:
        _add_compensated(picked, formats, dtype, columns, feedback, sse, wsse, rtn, factors)
    else:
        _add_errors(picked, formats, dtype, columns, scale_method, sse, wsse, factors, rtn)
    return Measured(energy, sse, wsse, True, n, rtn.plain, rtn.weighted)


def _measure_scaled(
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None,
    scale_method: str,
    sample_elements: int | None,
    seed: int,
    moments: np.ndarray | None,
    column_scale: np.ndarray,
) -> Measured:
    """:func:`measure` with a column scale (see there)."""
    s = mx.array(column_scale.astype(np.float32))
    scaled = measure(
        weight.astype(mx.float32) * s,
        formats,
        dtype,
        None if columns is None else columns.astype(mx.float32) / (s * s),
        scale_method,
        sample_elements,
        seed,
        None if moments is None else moments / np.outer(column_scale, column_scale),
    )
    stock = measure(weight, formats, dtype, columns, "rtn", sample_elements, seed)
    if not (scaled.finite and stock.finite):
        return scaled
    # stock's plain errors relative to its own energy, expressed against the stored one
    ratio = scaled.energy / stock.energy if stock.energy > 0 else 1.0
    rtn_sse: list[float | None] = [v * ratio for v in stock.sse]
    rtn_wsse: list[float | None] | None = None if stock.wsse is None else list(stock.wsse)
    return Measured(
        scaled.energy, scaled.sse, scaled.wsse, True, scaled.sampled_rows, rtn_sse, rtn_wsse
    )


class _Totals:
    """Running per-format sums of the round-to-nearest errors that came with a fit."""

    def __init__(self, formats: int, weighted: bool) -> None:
        self.plain: list[float | None] = [None] * formats
        self.weighted: list[float | None] | None = [None] * formats if weighted else None

    def add(self, i: int, plain: float, weighted: float | None) -> None:
        self.plain[i] = (self.plain[i] or 0.0) + plain
        if self.weighted is not None and weighted is not None:
            self.weighted[i] = (self.weighted[i] or 0.0) + weighted


def _add_errors(
    rows: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None,
    scale_method: str,
    sse: list[float],
    wsse: list[float] | None,
    factors: tuple[mx.array, mx.array] | None = None,
    rtn: _Totals | None = None,
) -> None:
    """Add each format's error over ``rows`` (each row times its factor, if given) to the
    running totals, and to ``rtn`` the round-to-nearest errors that came with a fit."""
    rows = rows.astype(mx.float32)

    def total(a: mx.array | None, factor: int) -> mx.array | None:
        return None if a is None else (a if factors is None else a * factors[factor]).sum()

    for i, f in enumerate(formats):
        # one format at a time: evaluating all at once would keep every candidate's
        # dequantized rows alive together (measured 2.7 GB peak on a 135M model)
        e = row_errors(rows, f, dtype, columns, scale_method)
        sums = [total(e.plain, 0), total(e.weighted, 1), total(e.rtn_plain, 0)]
        sums.append(total(e.rtn_weighted, 1))
        mx.eval([t for t in sums if t is not None])
        plain, weighted, rtn_plain, rtn_weighted = (
            None if t is None else float(t.item())  # type: ignore[arg-type]
            for t in sums
        )
        assert plain is not None
        sse[i] += plain
        if wsse is not None and weighted is not None:
            wsse[i] += weighted
        if rtn is not None and rtn_plain is not None:
            rtn.add(i, rtn_plain, rtn_weighted)


#: Weights rounded together in one error-feedback pass (candidates stacked as rows): bounds
#: the pass's float32 working copy at 64 MiB.
FEEDBACK_ELEMENTS = 1 << 24


def _add_compensated(
    rows: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None,
    feedback: Factor,
    sse: list[float],
    wsse: list[float] | None,
    rtn: _Totals,
    factors: tuple[mx.array, mx.array] | None = None,
) -> None:
    """:func:`_add_errors` for ``scales="gptq"``: native affine formats rounded with error
    feedback (all of them in one pass), every format's weighted error in ``feedback.h``, and
    MLX's own round-to-nearest error beside each compensated format (stock's price)."""
    assert columns is not None and wsse is not None
    w = np.array(rows.astype(mx.float32))
    cols = np.array(columns.astype(mx.float32))
    fp = np.ones(w.shape[0]) if factors is None else np.array(factors[0], np.float64)
    fw = np.ones(w.shape[0]) if factors is None else np.array(factors[1], np.float64)

    def add(delta: np.ndarray) -> tuple[float, float]:
        plain = np.einsum("rn,rn->r", delta, delta, dtype=np.float64)
        return float(plain @ fp), float(row_form(delta, feedback.h) @ fw)

    fed = [i for i, f in enumerate(formats) if compensates(f, "gptq")]
    batch = max(1, FEEDBACK_ELEMENTS // max(1, w.size))
    rnd = storage_rounder(dtype)
    for start in range(0, len(fed), batch):
        part = fed[start : start + batch]
        specs = [(formats[i].bits, formats[i].group_size) for i in part]
        for i, r in zip(part, compensated(w, specs, cols, feedback, rnd), strict=True):
            plain, weighted = add(w - r.restored())
            sse[i] += plain
            wsse[i] += weighted
            stock = quantize_weight(rows, formats[i], dtype, "rtn")
            rtn.add(i, *add(w - np.array(dequantize_weight(stock, formats[i]))))
    for i, f in enumerate(formats):
        if i in fed:
            continue
        stored = quantize_weight(rows, f, dtype, "gptq", columns)
        plain, weighted = add(w - np.array(dequantize_weight(stored, f)))
        sse[i] += plain
        wsse[i] += weighted


def analyze_tensor(
    info: TensorInfo,
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scale_method: str = "rtn",
    sample_elements: int | None = None,
    moments: np.ndarray | None = None,
    column_scale: np.ndarray | None = None,
) -> RDCurve:
    """The RD curve of one tensor over the formats that can store it (errors estimated from a
    sample of about ``sample_elements`` weights, or exact with ``None``)."""
    dtype_bytes = dtype.size
    options = (
        [info.fixed] if info.fixed is not None else [f for f in formats if f.supports(info.shape)]
    )
    seed = seed_for(info.path)
    m = measure(
        weight, options, dtype, columns, scale_method, sample_elements, seed, moments, column_scale
    )
    energy, sse, wsse = m.energy, m.sse, m.wsse
    rtn_sse = m.rtn_sse or [None] * len(sse)
    rtn_wsse = m.rtn_wsse or [None] * len(sse)
    note = ""
    if not m.finite:
        # NaN/Inf weights cannot be quantized meaningfully: keep them in 16 bits and say so.
        options = [f for f in formats if not f.is_quantized][:1] or [Format("passthrough", 16, 0)]
        sse, energy, note = [0.0], 0.0, "non-finite values: kept in 16-bit"
        wsse = None if wsse is None else [0.0]
        rtn_sse, rtn_wsse = [None], [None]
    elif energy == 0.0:
        # every format stores zeros exactly: the allocator takes the cheapest, and says so
        note = "all zeros: stored exactly in the smallest format"
    weighted = wsse if wsse is not None else [None] * len(sse)
    candidates = [
        Candidate(f.name, f.nbytes(info.shape, dtype_bytes), float(s), w, rs, rw)
        for f, s, w, rs, rw in zip(options, sse, weighted, rtn_sse, rtn_wsse, strict=True)
    ]
    return RDCurve(
        path=info.path,
        shape=info.shape,
        role=info.role,
        layer=info.layer,
        energy=float(energy),
        candidates=candidates,
        fixed=info.fixed is not None,
        note=note,
        sampled_rows=m.sampled_rows if m.finite else 0,
    )


def analyze_stack(
    info: TensorInfo,
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scale_method: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = None,
    moments: np.ndarray | None = None,
    column_scale: np.ndarray | None = None,
) -> list[RDCurve]:
    """The RD curves of one source tensor: one curve, or with ``per_expert`` one per expert of
    an expert stack (each with its own Fisher columns, ``columns[e]``). ``moments``: the
    second moments of a linear layer's inputs, for ``scales="gptq"``; ``column_scale``: its
    equivalent scale (``--equalize``)."""
    if not (per_expert and splits_per_expert(info)):
        return [
            analyze_tensor(
                info,
                weight,
                formats,
                dtype,
                columns,
                scale_method,
                sample_elements,
                moments,
                column_scale,
            )
        ]
    return [
        analyze_tensor(
            sub,
            weight[e],
            formats,
            dtype,
            None if columns is None else columns[e],
            scale_method,
            sample_elements,
        )
        for e, sub in enumerate(expert_infos(info))
    ]


def curve_paths(info: TensorInfo, per_expert: bool = False) -> list[str]:
    """The paths of the curves :func:`analyze_stack` gives for ``info``, in order."""
    if per_expert and splits_per_expert(info):
        return [sub.path for sub in expert_infos(info)]
    return [info.path]
