"""Analysis over several cores (``--jobs``) and several processes or hosts (``mlx.launch``).

Analysing a tensor is independent of every other tensor, and each result is a small JSON
record, so both forms of parallelism only split the list of tensors and collect records:

- ``--jobs N``: a pool of N worker processes on this machine (spawned, not forked: MLX is not
  fork-safe). Each worker opens the source once and measures the tensors it is handed; the
  parent writes each record to the cache as it arrives, so an interrupted run keeps them.
- ``mlx.launch -n N ... python -m mint_mlx.convert ...``: rank r measures the tensors whose
  index is r modulo N, the ranks exchange their records with ``mx.distributed.all_gather``
  (hosts need no shared file system), and every rank ends with all curves. Rank 0 alone writes
  the cache and the output.

Either way a tensor's record is computed by the same function on the same data as in a
single process, so the plan is identical.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.analysis.measure import analyze_stack
from mint_mlx.formats import Format, format_by_name
from mint_mlx.memory import note_worker_peak, own_peak_rss
from mint_mlx.quant import scales as scale_fitting
from mint_mlx.sensitivity.inputs import InputMoments
from mint_mlx.source.model import Source, TensorInfo, open_source

#: Below this many elements to analyze, worker start-up (importing MLX, opening the source)
#: costs more than it saves; the analysis stays in this process.
PARALLEL_MIN_ELEMENTS = 1 << 24

# ----------------------------------------------------------------------------- worker pool

_WORKER_SOURCE: Source | None = None


def _init_worker(source_path: str) -> None:
    global _WORKER_SOURCE
    # Ctrl-C is the parent's to handle: it keeps every finished record and stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_SOURCE = open_source(source_path)
    # the processes already share the cores: threads inside each fit would only contend
    scale_fitting.THREADS = 1


def _analyze_one(
    key: str,
    format_names: Sequence[str],
    dtype_name: str,
    columns: np.ndarray | None,
    scale_method: str,
    per_expert: bool = False,
    sample_elements: int | None = None,
    moments_path: str | None = None,
    column_scale: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], int, int]:
    """The records of one source tensor (one, or one per expert: see analyze_stack), with
    this worker's process id and peak resident memory, which the parent adds to its own."""
    source = _WORKER_SOURCE
    assert source is not None, "worker was not initialised"
    info = next(t for t in source.quantizable if t.key == key)
    formats = [format_by_name(n) for n in format_names]
    cols = None if columns is None else mx.array(columns)
    dtype = getattr(mx, dtype_name)
    moments = None if moments_path is None else InputMoments(Path(moments_path)).get(key)
    curves = analyze_stack(
        info,
        source.tensor(key),
        formats,
        dtype,
        cols,
        scale_method,
        per_expert,
        sample_elements,
        moments,
        column_scale,
    )
    source.release(key)
    return [c.to_json() for c in curves], os.getpid(), own_peak_rss()


#: What one analysis process holds besides its current tensor: MLX and the source's index, and
#: the float32 work of one row chunk or row sample (a generous round figure). The parent holds
#: about as much while the workers run (it only hands out keys and collects records).
WORKER_FIXED_BYTES = 256 * 2**20


def worker_memory(source: Source, scaled: bool = False) -> int:
    """One analysis process's peak: its largest tensor as read, plus :data:`WORKER_FIXED_BYTES`.

    The fit and the row statistics work on float32 pieces of bounded size (row chunks, a row
    sample, :data:`mint_mlx.quant.scales.BLOCK_ELEMENTS`-weight blocks), not on a float32 copy
    of the tensor, so a bfloat16 tensor costs 2 bytes per weight. With equivalent scaling
    (``scaled``) the analysis measures the scaled tensor, a float32 copy: 4 bytes more.
    """
    largest = max(
        (
            info.numel * (getattr(mx, info.source_dtype).size + (4 if scaled else 0))
            for info in source.quantizable
        ),
        default=0,
    )
    return WORKER_FIXED_BYTES + largest


def jobs_within(source: Source, jobs: int, max_memory: int | None, scaled: bool = False) -> int:
    """``jobs``, lowered so that the parent (:data:`WORKER_FIXED_BYTES`) and its workers stay
    under ``max_memory``."""
    if max_memory is None or jobs <= 1:
        return jobs
    per = worker_memory(source, scaled)
    return max(1, min(jobs, (max_memory - WORKER_FIXED_BYTES) // per))


def default_jobs() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def analyze_in_pool(
    source: Source,
    infos: Sequence[TensorInfo],
    formats: Sequence[Format],
    dtype: mx.Dtype,
    columns: dict[str, mx.array] | None,
    scale_method: str,
    jobs: int,
    on_result: Callable[[TensorInfo, list[dict[str, Any]]], None],
    per_expert: bool = False,
    sample_elements: int | None = None,
    moments_path: str | None = None,
    column_scale: Callable[[str], np.ndarray | None] | None = None,
) -> None:
    """Measure ``infos`` in ``jobs`` worker processes; ``on_result`` gets each tensor's records
    as they arrive (in completion order; one record, or one per expert with ``per_expert``).
    At most ``2 * jobs`` tensors are in flight, so memory stays bounded by a few tensors per
    worker."""
    dtype_name = str(dtype).split(".")[-1]
    names = [f.name for f in formats]
    pending = list(infos)[::-1]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(str(source.path),)
    ) as pool:
        running: dict[Future[tuple[list[dict[str, Any]], int, int]], TensorInfo] = {}

        def submit() -> None:
            info = pending.pop()
            cols = None
            if columns is not None:
                cols = np.array(columns[info.key].astype(mx.float32))
            fut = pool.submit(
                _analyze_one,
                info.key,
                names,
                dtype_name,
                cols,
                scale_method,
                per_expert,
                sample_elements,
                moments_path,
                None if column_scale is None else column_scale(info.key),
            )
            running[fut] = info

        try:
            while pending and len(running) < 2 * jobs:
                submit()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    info = running.pop(fut)
                    records, pid, peak = fut.result()
                    note_worker_peak(pid, peak)
                    on_result(info, records)
                    if pending:
                        submit()
        except BaseException:  # Ctrl-C or a failed tensor: start nothing new
            pending.clear()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ----------------------------------------------------------------------------- mlx.launch


def distributed_group() -> Any | None:
    """The MLX process group when started by ``mlx.launch`` with more than one rank."""
    if "MLX_RANK" not in os.environ or not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def rank_share(items: Sequence[Any], group: Any) -> Iterator[Any]:
    """This rank's items: every ``size``-th one, starting at ``rank``."""
    return iter(items[group.rank() :: group.size()])


def all_gather_text(text: str, group: Any) -> list[str]:
    """Every rank's ``text``, in rank order (UTF-8 bytes padded to a common length)."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    length = mx.array([data.size], dtype=mx.int32)
    longest = int(np.array(mx.distributed.all_max(length, group=group))[0])
    padded = np.zeros(longest + 4, dtype=np.uint8)
    padded[:4] = np.frombuffer(np.int32(data.size).tobytes(), dtype=np.uint8)
    padded[4 : 4 + data.size] = data
    gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=group))
    rows = gathered.reshape(group.size(), longest + 4)
    out = []
    for row in rows:
        n = int(np.frombuffer(row[:4].tobytes(), dtype=np.int32)[0])
        out.append(row[4 : 4 + n].tobytes().decode())
    return out
