"""Rate-distortion curves: for every quantizable tensor and candidate format, bytes and error.

Distortion is measured, not modelled: each tensor is quantized in every candidate format with
MLX's own routines and compared with the original (sum of squared errors, plus the tensor's
energy so that relative error and SQNR follow). Large tensors are processed in row chunks so
that memory stays bounded by a chunk, not by the tensor.

Results go to an append-only JSON-lines cache, one line per tensor, behind a header line that
fingerprints the source, the candidate set, the output dtype and this module's version. A
second run (another budget, or a run that was interrupted) reads what is there and analyses
only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from .errors import AnalysisCacheError
from .formats import Format
from .paths import cache_root
from .quantize import squared_error
from .source import Source, TensorInfo

#: Bump when the measurement changes meaning, so stale caches are not reused.
ANALYSIS_VERSION = 1

#: Elements per chunk when measuring a large tensor (bounds peak memory to ~100s of MB).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Candidate:
    """One format for one tensor: its exact saved bytes and its squared error."""

    format: str
    nbytes: int
    sse: float


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
        )


def _rows(weight: mx.array) -> mx.array:
    """View any tensor as 2-D rows along its last axis (groups never cross rows)."""
    return weight.reshape(-1, weight.shape[-1])


def measure(
    weight: mx.array, formats: Sequence[Format], dtype: mx.Dtype
) -> tuple[float, list[float], bool]:
    """Energy of ``weight`` and the squared error of each format; also whether it is finite."""
    rows = _rows(weight)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    energy = 0.0
    sse = [0.0] * len(formats)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].astype(mx.float32)
        e = (chunk * chunk).sum()
        mx.eval(e)
        energy += float(e.item())  # type: ignore[arg-type]
        if not math.isfinite(energy):
            return energy, sse, False
        errors = [squared_error(chunk, f, dtype) for f in formats]
        mx.eval(errors)
        for i, err in enumerate(errors):
            sse[i] += float(err.item())  # type: ignore[arg-type]
    return energy, sse, True


def analyze_tensor(
    info: TensorInfo, weight: mx.array, formats: Sequence[Format], dtype: mx.Dtype
) -> RDCurve:
    """The RD curve of one tensor over the formats that can store it."""
    dtype_bytes = dtype.size
    options = (
        [info.fixed] if info.fixed is not None else [f for f in formats if f.supports(info.shape)]
    )
    energy, sse, finite = measure(weight, options, dtype)
    note = ""
    if not finite:
        # NaN/Inf weights cannot be quantized meaningfully: keep them in 16 bits and say so.
        options = [f for f in formats if not f.is_quantized][:1] or [Format("passthrough", 16, 0)]
        sse, energy, note = [0.0], 0.0, "non-finite values: kept in 16-bit"
    candidates = [
        Candidate(f.name, f.nbytes(info.shape, dtype_bytes), float(s))
        for f, s in zip(options, sse, strict=True)
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


def cache_key(source: Source, formats: Sequence[Format], dtype: mx.Dtype) -> str:
    """What an analysis depends on: source identity, candidates, output dtype, version."""
    h = hashlib.sha256()
    h.update(source.fingerprint().encode())
    h.update(",".join(f.name for f in formats).encode())
    h.update(str(dtype).encode())
    h.update(f"v{ANALYSIS_VERSION}".encode())
    return h.hexdigest()[:24]


def default_cache_path(source: Source, formats: Sequence[Format], dtype: mx.Dtype) -> Path:
    return cache_root() / "analysis" / f"{cache_key(source, formats, dtype)}.jsonl"


def read_cache(path: Path, key: str) -> dict[str, RDCurve]:
    """Curves already in the cache file at ``path`` (an empty dict if it does not exist yet).

    A truncated last line (a run killed mid-write) is ignored; a cache made for another source
    or candidate set is refused rather than silently mixed in.
    """
    if not path.exists():
        return {}
    curves: dict[str, RDCurve] = {}
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
        curves[curve.path] = curve
    return curves


def analyze(
    source: Source,
    formats: Sequence[Format],
    dtype: mx.Dtype,
    cache_path: Path | None = None,
    progress: bool = False,
) -> list[RDCurve]:
    """RD curves for every quantizable tensor of ``source``, reusing and extending the cache."""
    key = cache_key(source, formats, dtype)
    path = cache_path or default_cache_path(source, formats, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_cache(path, key)
    todo: Iterable[TensorInfo] = [t for t in source.quantizable if t.path not in done]
    todo = list(todo)
    if todo:
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as f:
            if new_file:
                f.write(json.dumps({"mint_analysis": ANALYSIS_VERSION, "key": key}) + "\n")
            bar = tqdm(todo, desc="analyse", unit="tensor", disable=not progress)
            for info in bar:
                bar.set_postfix_str(info.path[-40:], refresh=False)
                curve = analyze_tensor(info, source.tensor(info.key), formats, dtype)
                source.release(info.key)
                f.write(json.dumps(curve.to_json()) + "\n")
                f.flush()
                done[info.path] = curve
    return [done[t.path] for t in source.quantizable]
