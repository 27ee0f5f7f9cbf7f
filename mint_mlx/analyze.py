"""Rate-distortion curves: for every quantizable tensor and candidate format, bytes and error.

Distortion is measured, not modelled: each tensor is quantized in every candidate format with
MLX's own routines and compared with the original (sum of squared errors, plus the tensor's
energy so that relative error and SQNR follow). Large tensors are processed in row chunks so
that memory stays bounded by a chunk, not by the tensor.

Results go to an append-only JSON-lines cache, one line per tensor, behind a header line that
fingerprints the model's config, the candidate set, the output dtype, the calibration and this
module's version. Each line carries the content hash of the tensor it measured
(:mod:`mint_mlx.digests`): a second run (another budget, or a run that was interrupted) reuses
every line whose tensor is unchanged and analyses the rest, and a tensor whose data changed is
measured again rather than taken from the cache.

With ``per_expert=True`` every MoE expert stack of E > 1 experts is measured as E curves, one per
expert (path ``module#e``, see :mod:`mint_mlx.experts`), so the allocator can give each expert its
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

from .errors import AnalysisCacheError
from .experts import expert_infos, splits_per_expert
from .formats import Format
from .path_safety import writing
from .paths import cache_root
from .quantize import squared_error
from .source import Source, TensorInfo

#: Bump when the measurement changes meaning, so stale caches are not reused.
ANALYSIS_VERSION = 3  # 2: scale fit also re-rounds MLX's own (scale, bias); 3: content hashes

#: Elements per chunk when measuring a large tensor (16 MB of float32 per chunk).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Candidate:
    """One format for one tensor: its exact saved bytes and its squared error."""

    format: str
    nbytes: int
    sse: float
    wsse: float | None = None  # squared error weighted by output sensitivity (Fisher columns)


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
    digest: str = ""  # content hash of the tensor measured (mint_mlx.digests)

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
        )


def _chunks(
    weight: mx.array, columns: mx.array | None
) -> Iterator[tuple[mx.array, mx.array | None]]:
    """Row blocks of ``weight`` (groups never cross rows) with their column weights.

    A 3-D expert stack is walked expert by expert, since each expert has its own columns.
    """
    if weight.ndim == 3:
        for e in range(weight.shape[0]):
            yield from _chunks(weight[e], None if columns is None else columns[e])
        return
    rows = weight.reshape(-1, weight.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step], columns


def measure(
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scales: str = "rtn",
) -> tuple[float, list[float], list[float] | None, bool]:
    """Energy of ``weight``, each format's squared error (plain and column-weighted), and
    whether the tensor is finite."""
    energy = 0.0
    sse = [0.0] * len(formats)
    wsse = None if columns is None else [0.0] * len(formats)
    for chunk, cols in _chunks(weight, columns):
        chunk = chunk.astype(mx.float32)
        e = (chunk * chunk).sum()
        mx.eval(e)
        energy += float(e.item())  # type: ignore[arg-type]
        if not math.isfinite(energy):
            return energy, sse, wsse, False
        for i, f in enumerate(formats):
            # one format at a time: evaluating all at once would keep every candidate's
            # dequantized chunk alive together (measured 2.7 GB peak on a 135M model)
            plain, weighted = squared_error(chunk, f, dtype, cols, scales)
            mx.eval(plain, weighted) if weighted is not None else mx.eval(plain)
            sse[i] += float(plain.item())  # type: ignore[arg-type]
            if wsse is not None and weighted is not None:
                wsse[i] += float(weighted.item())  # type: ignore[arg-type]
    return energy, sse, wsse, True


def analyze_tensor(
    info: TensorInfo,
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scales: str = "rtn",
) -> RDCurve:
    """The RD curve of one tensor over the formats that can store it."""
    dtype_bytes = dtype.size
    options = (
        [info.fixed] if info.fixed is not None else [f for f in formats if f.supports(info.shape)]
    )
    energy, sse, wsse, finite = measure(weight, options, dtype, columns, scales)
    note = ""
    if not finite:
        # NaN/Inf weights cannot be quantized meaningfully: keep them in 16 bits and say so.
        options = [f for f in formats if not f.is_quantized][:1] or [Format("passthrough", 16, 0)]
        sse, energy, note = [0.0], 0.0, "non-finite values: kept in 16-bit"
        wsse = None if wsse is None else [0.0]
    elif energy == 0.0:
        # every format stores zeros exactly: the allocator takes the cheapest, and says so
        note = "all zeros: stored exactly in the smallest format"
    weighted = wsse if wsse is not None else [None] * len(sse)
    candidates = [
        Candidate(f.name, f.nbytes(info.shape, dtype_bytes), float(s), w)
        for f, s, w in zip(options, sse, weighted, strict=True)
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
    )


def analyze_stack(
    info: TensorInfo,
    weight: mx.array,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: mx.array | None = None,
    scales: str = "rtn",
    per_expert: bool = False,
) -> list[RDCurve]:
    """The RD curves of one source tensor: one curve, or with ``per_expert`` one per expert of
    an expert stack (each with its own Fisher columns, ``columns[e]``)."""
    if not (per_expert and splits_per_expert(info)):
        return [analyze_tensor(info, weight, formats, dtype, columns, scales)]
    return [
        analyze_tensor(
            sub, weight[e], formats, dtype, None if columns is None else columns[e], scales
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
) -> str:
    """What an analysis file depends on besides the tensors themselves (which each line
    identifies by content hash): the model's config, candidates, output dtype, calibration (the
    key of the Fisher weights, empty without), scale method, per-expert curves and version.
    (Without ``per_expert`` the key is what it was before that option existed, so existing
    caches stay valid.)"""
    h = hashlib.sha256()
    h.update(json.dumps(source.config, sort_keys=True).encode())
    h.update(calibration.encode())
    h.update(scales.encode())
    h.update(",".join(f.name for f in formats).encode())
    h.update(str(dtype).encode())
    h.update(f"v{ANALYSIS_VERSION}".encode())
    if per_expert:
        h.update(b"per-expert")
    return h.hexdigest()[:24]


def default_cache_path(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    calibration: str = "",
    scales: str = "rtn",
    per_expert: bool = False,
) -> Path:
    key = cache_key(source, formats, dtype, calibration, scales, per_expert)
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
) -> list[RDCurve]:
    """RD curves for every quantizable tensor of ``source``, reusing and extending the cache.

    ``columns`` are per-tensor Fisher column weights (keyed by weight name) and ``calibration``
    their cache key; with them every candidate also gets a weighted error. ``jobs`` worker
    processes share the work; under ``mlx.launch`` the ranks split the tensors between them
    (:mod:`mint_mlx.parallel`). The result is the same either way. ``per_expert`` measures each
    expert of an expert stack as its own curve (``module#e``), in the stack's place in the list.
    """
    from .parallel import (
        PARALLEL_MIN_ELEMENTS,
        all_gather_text,
        analyse_in_pool,
        distributed_group,
        rank_share,
    )

    key = cache_key(source, formats, dtype, calibration, scales, per_expert)
    path = cache_path or default_cache_path(source, formats, dtype, calibration, scales, per_expert)
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
            for curve in analyze_stack(info, weight, formats, dtype, cols, scales, per_expert):
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
