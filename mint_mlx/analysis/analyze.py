"""Rate-distortion curves: for every quantizable tensor and candidate format, bytes and error.

Distortion is measured, not modelled: each tensor is quantized in every candidate format with
MLX's own routines and compared with the original (sum of squared errors, plus the tensor's
energy so that relative error and SQNR follow). Large tensors are processed in row chunks so
that memory stays bounded by a chunk, not by the tensor.

Results go to an append-only JSON-lines cache, one line per tensor, behind a header line that
fingerprints the model's config, the candidate set, the output dtype, the calibration and this
module's version. Each line carries the content hash of the tensor it measured
(:mod:`mint_mlx.source.digests`): a second run (another budget, or a run that was interrupted) reuses
every line whose tensor is unchanged and analyses the rest, and a tensor whose data changed is
measured again rather than taken from the cache.

With ``per_expert=True`` every MoE expert stack of E > 1 experts is measured as E curves, one per
expert (path ``module#e``, see :mod:`mint_mlx.quant.experts`), so the allocator can give each expert its
own format. The stack is walked expert by expert either way, so this costs nothing extra.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from mint_mlx.analysis.row_sample import SAMPLE_ELEMENTS, draw, row_stats, sample_rows, seed_for
from mint_mlx.errors import AnalysisCacheError
from mint_mlx.formats import Format
from mint_mlx.path_safety import writing
from mint_mlx.paths import cache_root
from mint_mlx.quant.experts import expert_infos, splits_per_expert
from mint_mlx.quant.quantize import row_errors
from mint_mlx.source.model import Source, TensorInfo

#: Bump when the measurement changes meaning, so stale caches are not reused.
#: 2: scale fit re-rounds MLX's (scale, bias); 3: content hashes; 4: sampled; 5: with each fitted
#: format, the error of MLX's own scales (what stock mlx-lm writes: the stock comparison)
ANALYSIS_VERSION = 5

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
    scales: str = "rtn",
    sample_elements: int | None = None,
    seed: int = 0,
) -> Measured:
    """Energy of ``weight`` (exact) and each format's squared error, plain and column-weighted:
    exact, or estimated from a stratified sample of rows of about ``sample_elements`` weights
    (:mod:`mint_mlx.analysis.row_sample`; the same rows for every format).

    A 3-D expert stack is measured expert by expert (each has its own columns), the sample
    shared out so that every expert is represented.
    """
    if weight.ndim == 3:
        experts = weight.shape[0]
        share = None if sample_elements is None else max(1, sample_elements // experts)
        parts = [
            measure(
                weight[e],
                formats,
                dtype,
                None if columns is None else columns[e],
                scales,
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
    if n is None:
        for chunk in _chunks(rows):
            _add_errors(chunk, formats, dtype, columns, scales, sse, wsse, rtn=rtn)
        return Measured(energy, sse, wsse, True, 0, rtn.plain, rtn.weighted)
    sample = draw(stats, n, seed)
    picked = rows[mx.array(sample.rows)]
    factors = (
        mx.array(sample.plain_factor, mx.float32),
        mx.array(sample.weighted_factor, mx.float32),
    )
    _add_errors(picked, formats, dtype, columns, scales, sse, wsse, factors, rtn)
    return Measured(energy, sse, wsse, True, n, rtn.plain, rtn.weighted)


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
    scales: str,
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
        e = row_errors(rows, f, dtype, columns, scales)
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


def analyze_tensor(
    info: TensorInfo,
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scales: str = "rtn",
    sample_elements: int | None = None,
) -> RDCurve:
    """The RD curve of one tensor over the formats that can store it (errors estimated from a
    sample of about ``sample_elements`` weights, or exact with ``None``)."""
    dtype_bytes = dtype.size
    options = (
        [info.fixed] if info.fixed is not None else [f for f in formats if f.supports(info.shape)]
    )
    m = measure(weight, options, dtype, columns, scales, sample_elements, seed_for(info.path))
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
    scales: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = None,
) -> list[RDCurve]:
    """The RD curves of one source tensor: one curve, or with ``per_expert`` one per expert of
    an expert stack (each with its own Fisher columns, ``columns[e]``)."""
    if not (per_expert and splits_per_expert(info)):
        return [analyze_tensor(info, weight, formats, dtype, columns, scales, sample_elements)]
    return [
        analyze_tensor(
            sub,
            weight[e],
            formats,
            dtype,
            None if columns is None else columns[e],
            scales,
            sample_elements,
        )
        for e, sub in enumerate(expert_infos(info))
    ]


def curve_paths(info: TensorInfo, per_expert: bool = False) -> list[str]:
    """The paths of the curves :func:`analyze_stack` gives for ``info``, in order."""
    if per_expert and splits_per_expert(info):
        return [sub.path for sub in expert_infos(info)]
    return [info.path]


def cache_key(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    calibration: str = "",
    scales: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
) -> str:
    """What an analysis file depends on besides the tensors themselves (which each line
    identifies by content hash): the model's config, candidates, output dtype, calibration (the
    key of the Fisher weights, empty without), scale method, per-expert curves and version.
    (Without ``per_expert`` the key is what it was before that option existed, so existing
    caches stay valid.) ``sample_elements`` is the row sample's size, ``None`` for exact
    errors."""
    h = hashlib.sha256()
    h.update(json.dumps(source.config, sort_keys=True).encode())
    h.update(calibration.encode())
    h.update(scales.encode())
    h.update(",".join(f.name for f in formats).encode())
    h.update(str(dtype).encode())
    h.update(f"v{ANALYSIS_VERSION}".encode())
    if per_expert:
        h.update(b"per-expert")
    h.update(f"sample={sample_elements or 'all'}".encode())
    return h.hexdigest()[:24]


def default_cache_path(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    calibration: str = "",
    scales: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
) -> Path:
    key = cache_key(source, formats, dtype, calibration, scales, per_expert, sample_elements)
    return cache_root() / "analysis" / f"{key}.jsonl"


def read_cache(path: Path, key: str) -> dict[tuple[str, str], RDCurve]:
    """Curves already in the cache file at ``path``, by (module path, content hash); an empty
    dict if the file does not exist yet.

    A truncated last line (a run killed mid-write) is ignored; a cache made for another model
    config or candidate set is refused rather than silently mixed in.
    """
    if not path.exists():
        return {}
    curves: dict[tuple[str, str], RDCurve] = {}
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])
    except ValueError as e:
        raise AnalysisCacheError(f"analysis cache {path} is corrupt; delete it") from e
    if head.get("mint_analysis") != ANALYSIS_VERSION or head.get("key") != key:
        raise AnalysisCacheError(
            f"analysis cache {path} belongs to another model, format set or version; "
            "delete it or pass another --analysis file"
        )
    for line in lines[1:]:
        try:
            curve = RDCurve.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # partial line from an interrupted run: re-analyse that tensor
        curves[(curve.path, curve.digest)] = curve
    return curves


def analyze(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    cache_path: Path | None = None,
    progress: bool = False,
    columns: dict[str, mx.array] | None = None,
    calibration: str = "",
    scales: str = "rtn",
    jobs: int = 1,
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
) -> list[RDCurve]:
    """RD curves for every quantizable tensor of ``source``, reusing and extending the cache.

    ``columns`` are per-tensor Fisher column weights (keyed by weight name) and ``calibration``
    their cache key; with them every candidate also gets a weighted error. ``jobs`` worker
    processes share the work; under ``mlx.launch`` the ranks split the tensors between them
    (:mod:`mint_mlx.analysis.workers`). The result is the same either way. ``per_expert`` measures each
    expert of an expert stack as its own curve (``module#e``), in the stack's place in the list.
    Errors are estimated from a row sample of about ``sample_elements`` weights per tensor
    (:mod:`mint_mlx.analysis.row_sample`), or measured on every weight with ``None``.
    """
    from mint_mlx.analysis.workers import (
        PARALLEL_MIN_ELEMENTS,
        all_gather_text,
        analyse_in_pool,
        distributed_group,
        rank_share,
    )

    key = cache_key(source, formats, dtype, calibration, scales, per_expert, sample_elements)
    path = cache_path or default_cache_path(
        source, formats, dtype, calibration, scales, per_expert, sample_elements
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    group = distributed_group()
    writer = group is None or group.rank() == 0  # one process writes the cache file
    done = read_cache(path, key)
    infos = list(source.quantizable)
    mine = infos if group is None else list(rank_share(infos, group))
    curves: dict[str, RDCurve] = {}

    new_file = not path.exists() or path.stat().st_size == 0
    with (
        writing("the analysis cache", path),
        open(path, "a") if writer else open(os.devnull, "w") as f,
    ):
        if new_file and writer:
            f.write(json.dumps({"mint_analysis": ANALYSIS_VERSION, "key": key}) + "\n")

        def record(curve: RDCurve, digest: str) -> None:
            curve.digest = digest
            f.write(json.dumps(curve.to_json()) + "\n")
            f.flush()
            curves[curve.path] = curve

        def cached(info: TensorInfo) -> tuple[str, bool]:
            """The tensor's hash (reading it only if the hash is not known) and whether its
            curves came from the cache (all of them: a stack cut short is measured again)."""
            digest = source.digest(info.key)
            hits = [done.get((p, digest)) for p in curve_paths(info, per_expert)]
            found = [h for h in hits if h is not None]
            if len(found) < len(hits):
                return digest, False
            for hit in found:
                curves[hit.path] = hit
            return digest, True

        def measure_here(info: TensorInfo, digest: str) -> None:
            cols = None if columns is None else columns[info.key].astype(mx.float32)
            weight = source.tensor(info.key)  # still loaded if it was just hashed
            for curve in analyze_stack(
                info, weight, formats, dtype, cols, scales, per_expert, sample_elements
            ):
                record(curve, digest)
            source.release(info.key)

        if jobs > 1 and sum(info.numel for info in mine) >= PARALLEL_MIN_ELEMENTS:
            # workers read their own tensors: hash everything first to know what to hand out
            todo: dict[TensorInfo, str] = {}
            for info in mine:
                digest, hit = cached(info)
                if not hit:
                    todo[info] = digest
                source.release(info.key)
            bar = tqdm(total=len(todo), desc="analyse", unit="tensor", disable=not progress)
            todo_elements = sum(info.numel for info in todo)
            if len(todo) > 1 and todo_elements >= PARALLEL_MIN_ELEMENTS:

                def pooled(info: TensorInfo, records: list[dict[str, Any]]) -> None:
                    for d in records:
                        record(RDCurve.from_json(d), todo[info])
                    bar.set_postfix_str(info.path[-40:], refresh=False)
                    bar.update(1)

                analyse_in_pool(
                    source,
                    list(todo),
                    formats,
                    dtype,
                    columns,
                    scales,
                    min(jobs, len(todo)),
                    pooled,
                    per_expert,
                    sample_elements,
                )
            else:
                for info, digest in todo.items():
                    measure_here(info, digest)
                    bar.update(1)
        else:
            # one read per tensor: hash it, and measure it while it is loaded if not cached
            bar = tqdm(mine, desc="analyse", unit="tensor", disable=not progress)
            for info in bar:
                digest, hit = cached(info)
                if hit:
                    source.release(info.key)
                    continue
                bar.set_postfix_str(info.path[-40:], refresh=False)
                measure_here(info, digest)
        bar.close()

        if group is not None:  # every rank gets every curve; rank 0 caches the new ones
            mine_text = "\n".join(
                json.dumps(curves[p].to_json()) for i in mine for p in curve_paths(i, per_expert)
            )
            for text in all_gather_text(mine_text, group):
                for line in filter(None, text.split("\n")):
                    curve = RDCurve.from_json(json.loads(line))
                    if curve.path not in curves:
                        curves[curve.path] = curve
                        if (curve.path, curve.digest) not in done:
                            f.write(line + "\n")
            f.flush()
    source.digest_memo.save()
    return [curves[p] for t in infos for p in curve_paths(t, per_expert)]
