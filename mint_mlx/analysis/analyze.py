"""Rate-distortion curves for every quantizable tensor of a model, cached on disk.

Each tensor is measured by :mod:`mint_mlx.analysis.measure`: here, tensor by tensor; in a pool
of worker processes (``--jobs``); or split between the ranks of ``mlx.launch``
(:mod:`mint_mlx.analysis.workers`). The curves are the same either way.

Results go to an append-only JSON-lines cache, one line per tensor, behind a header line that
fingerprints the model's config, the candidate set, the output dtype, the calibration and this
module's version. Each line carries the content hash of the tensor it measured
(:mod:`mint_mlx.source.digests`): a second run (another budget, or a run that was interrupted) reuses
every line whose tensor is unchanged and analyses the rest, and a tensor whose data changed is
measured again rather than taken from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mint_mlx.analysis import workers
from mint_mlx.analysis.measure import RDCurve, analyze_stack, curve_paths
from mint_mlx.analysis.row_sample import SAMPLE_ELEMENTS
from mint_mlx.errors import AnalysisCacheError
from mint_mlx.formats import Format
from mint_mlx.path_safety import writing
from mint_mlx.paths import cache_root
from mint_mlx.quant.equalize import Scaling
from mint_mlx.quant.gptq import DAMP
from mint_mlx.sensitivity.inputs import InputMoments
from mint_mlx.source.model import Source, TensorInfo

#: Bump when the measurement changes meaning, so stale caches are not reused.
#: 2: scale fit re-rounds MLX's (scale, bias); 3: content hashes; 4: sampled; 5: with each fitted
#: format, the error of MLX's own scales (what stock mlx-lm writes: the stock comparison)
ANALYSIS_VERSION = 5


def cache_key(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    calibration: str = "",
    scale_method: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
    scaling: str = "",
) -> str:
    """What an analysis file depends on besides the tensors themselves (which each line
    identifies by content hash): the model's config, candidates, output dtype, calibration (the
    key of the Fisher weights, empty without), scale method, per-expert curves and version.
    (Without ``per_expert`` the key is what it was before that option existed, so existing
    caches stay valid.) ``sample_elements`` is the row sample's size, ``None`` for exact
    errors. ``scaling`` is the digest of the equivalent scales (``--equalize``), empty
    without."""
    h = hashlib.sha256()
    h.update(json.dumps(source.config, sort_keys=True).encode())
    h.update(calibration.encode())
    h.update(scale_method.encode())
    if scale_method == "gptq":  # the damping changes every compensated error
        h.update(f"damp{DAMP}".encode())
    h.update(",".join(f.name for f in formats).encode())
    h.update(str(dtype).encode())
    h.update(f"v{ANALYSIS_VERSION}".encode())
    if per_expert:
        h.update(b"per-expert")
    h.update(f"sample={sample_elements or 'all'}".encode())
    if scaling:
        h.update(f"equalize={scaling}".encode())
    return h.hexdigest()[:24]


def default_cache_path(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    calibration: str = "",
    scale_method: str = "rtn",
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
    scaling: str = "",
) -> Path:
    key = cache_key(
        source, formats, dtype, calibration, scale_method, per_expert, sample_elements, scaling
    )
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
            continue  # partial line from an interrupted run: re-analyze that tensor
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
    scale_method: str = "rtn",
    jobs: int = 1,
    per_expert: bool = False,
    sample_elements: int | None = SAMPLE_ELEMENTS,
    moments: InputMoments | None = None,
    scaling: Scaling | None = None,
) -> list[RDCurve]:
    """RD curves for every quantizable tensor of ``source``, reusing and extending the cache.

    ``columns`` are per-tensor Fisher column weights (keyed by weight name) and ``calibration``
    their cache key; with them every candidate also gets a weighted error. ``jobs`` worker
    processes share the work; under ``mlx.launch`` the ranks split the tensors between them
    (:mod:`mint_mlx.analysis.workers`). The result is the same either way. ``per_expert`` measures each
    expert of an expert stack as its own curve (``module#e``), in the stack's place in the list.
    Errors are estimated from a row sample of about ``sample_elements`` weights per tensor
    (:mod:`mint_mlx.analysis.row_sample`), or measured on every weight with ``None``.
    ``moments`` (the calibration text's input second moments, keyed like ``columns``) are
    what ``scale_method="gptq"`` rounds with. ``scaling`` (``--equalize``) scales the input
    columns of the layers it names (:mod:`mint_mlx.quant.equalize`).
    """
    digest = "" if scaling is None else scaling.digest()
    key = cache_key(
        source, formats, dtype, calibration, scale_method, per_expert, sample_elements, digest
    )
    path = cache_path or default_cache_path(
        source, formats, dtype, calibration, scale_method, per_expert, sample_elements, digest
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    group = workers.distributed_group()
    writer = group is None or group.rank() == 0  # one process writes the cache file
    done = read_cache(path, key)
    infos = list(source.quantizable)
    mine = infos if group is None else list(workers.rank_share(infos, group))

    new_file = not path.exists() or path.stat().st_size == 0
    with (
        writing("the analysis cache", path),
        open(path, "a") if writer else open(os.devnull, "w") as f,
    ):
        if new_file and writer:
            f.write(json.dumps({"mint_analysis": ANALYSIS_VERSION, "key": key}) + "\n")
        run = _Run(
            source,
            formats,
            dtype,
            columns,
            scale_method,
            per_expert,
            sample_elements,
            done,
            f,
            moments=moments,
            scaling=scaling,
        )
        if jobs > 1 and sum(info.numel for info in mine) >= workers.PARALLEL_MIN_ELEMENTS:
            _analyze_in_workers(run, mine, jobs, progress)
        else:
            _analyze_here(run, mine, progress)
        if group is not None:
            _exchange_between_ranks(run, mine, group)
    source.digest_memo.save()
    return [run.curves[p] for t in infos for p in curve_paths(t, per_expert)]


@dataclass
class _Run:
    """One analysis: what to measure, the cache read before it (by (path, content hash)), the
    cache file it appends to, and the curves found so far (by path)."""

    source: Source
    formats: Sequence[Format]
    dtype: mx.Dtype
    columns: dict[str, mx.array] | None
    scales: str
    per_expert: bool
    sample_elements: int | None
    done: dict[tuple[str, str], RDCurve]
    file: TextIO
    curves: dict[str, RDCurve] = field(default_factory=dict)
    moments: InputMoments | None = None
    scaling: Scaling | None = None

    def column_scale(self, key: str) -> np.ndarray | None:
        return None if self.scaling is None else self.scaling.columns.get(key)

    def record(self, curve: RDCurve, digest: str) -> None:
        """Keep a newly measured curve, and append it to the cache at once."""
        curve.digest = digest
        self.file.write(json.dumps(curve.to_json()) + "\n")
        self.file.flush()
        self.curves[curve.path] = curve

    def cached(self, info: TensorInfo) -> tuple[str, bool]:
        """The tensor's hash (reading it only if the hash is not known) and whether its
        curves came from the cache (all of them: a stack cut short is measured again)."""
        digest = self.source.digest(info.key)
        hits = [self.done.get((p, digest)) for p in curve_paths(info, self.per_expert)]
        found = [h for h in hits if h is not None]
        if len(found) < len(hits):
            return digest, False
        for hit in found:
            self.curves[hit.path] = hit
        return digest, True

    def measure_here(self, info: TensorInfo, digest: str) -> None:
        """Measure one tensor in this process and record its curves."""
        cols = None if self.columns is None else self.columns[info.key].astype(mx.float32)
        weight = self.source.tensor(info.key)  # still loaded if it was just hashed
        for curve in analyze_stack(
            info,
            weight,
            self.formats,
            self.dtype,
            cols,
            self.scales,
            self.per_expert,
            self.sample_elements,
            None if self.moments is None else self.moments.get(info.key),
            self.column_scale(info.key),
        ):
            self.record(curve, digest)
        self.source.release(info.key)


def _analyze_here(run: _Run, infos: Sequence[TensorInfo], progress: bool) -> None:
    """In this process, one read per tensor: hash it, and measure it while it is loaded if
    it is not cached."""
    bar = tqdm(infos, desc="analyze", unit="tensor", disable=not progress)
    for info in bar:
        digest, hit = run.cached(info)
        if hit:
            run.source.release(info.key)
            continue
        bar.set_postfix_str(info.path[-40:], refresh=False)
        run.measure_here(info, digest)
    bar.close()


def _analyze_in_workers(run: _Run, infos: Sequence[TensorInfo], jobs: int, progress: bool) -> None:
    """In a pool of ``jobs`` worker processes, which read their own tensors: everything is
    hashed first to know what to hand out. Too little left to measure stays in this process."""
    todo: dict[TensorInfo, str] = {}
    for info in infos:
        digest, hit = run.cached(info)
        if not hit:
            todo[info] = digest
        run.source.release(info.key)
    bar = tqdm(total=len(todo), desc="analyze", unit="tensor", disable=not progress)
    todo_elements = sum(info.numel for info in todo)
    if len(todo) > 1 and todo_elements >= workers.PARALLEL_MIN_ELEMENTS:

        def pooled(info: TensorInfo, records: list[dict[str, Any]]) -> None:
            for d in records:
                run.record(RDCurve.from_json(d), todo[info])
            bar.set_postfix_str(info.path[-40:], refresh=False)
            bar.update(1)

        workers.analyze_in_pool(
            run.source,
            list(todo),
            run.formats,
            run.dtype,
            run.columns,
            run.scales,
            min(jobs, len(todo)),
            pooled,
            run.per_expert,
            run.sample_elements,
            None if run.moments is None else str(run.moments.path),
            run.column_scale,
        )
    else:
        for info, digest in todo.items():
            run.measure_here(info, digest)
            bar.update(1)
    bar.close()


def _exchange_between_ranks(run: _Run, mine: Sequence[TensorInfo], group: Any) -> None:
    """Under ``mlx.launch``: every rank gets every curve; rank 0 caches the new ones (the
    other ranks' file is ``os.devnull``)."""
    mine_text = "\n".join(
        json.dumps(run.curves[p].to_json()) for i in mine for p in curve_paths(i, run.per_expert)
    )
    for text in workers.all_gather_text(mine_text, group):
        for line in filter(None, text.split("\n")):
            curve = RDCurve.from_json(json.loads(line))
            if curve.path not in run.curves:
                run.curves[curve.path] = curve
                if (curve.path, curve.digest) not in run.done:
                    run.file.write(line + "\n")
    run.file.flush()
