"""How much memory there is, how much a conversion may use, and how much it did use."""

from __future__ import annotations

import os
import resource
import sys

from mint_mlx.devices import gpu_memory
from mint_mlx.sizes import parse_size


def physical_memory() -> int:
    """Bytes of RAM (unified memory on Apple Silicon); 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_memory() -> int | None:
    """What a conversion may use unless told: on Apple Silicon the share of unified memory the
    GPU may wire (what ``plan --fit`` models), elsewhere 80% of RAM; None if RAM is unknown."""
    have = physical_memory()
    if not have:
        return None
    return gpu_memory(have) if sys.platform == "darwin" else int(0.8 * have)


def resolve_max_memory(max_memory: str | int | None) -> int | None:
    """``--max-memory`` in bytes (``"12GB"``, ``"1.5GiB"``, an int), or the default."""
    if max_memory is None:
        return default_max_memory()
    return parse_size(max_memory)


#: Each analysis worker's peak resident memory in bytes, by process id, as the workers report
#: it with their results (:func:`note_worker_peak`).
_WORKER_PEAKS: dict[int, int] = {}


def own_peak_rss() -> int:
    """This process's peak resident memory so far, in bytes.

    On Linux the high-water mark of this process's own address space (``VmHWM``), not
    ``ru_maxrss``: a process started by fork and exec (every analysis worker: multiprocessing's
    spawn does that) keeps in ``ru_maxrss`` the resident size its parent had at the fork, so
    each worker would report the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def note_worker_peak(pid: int, peak: int) -> None:
    """Remember an analysis worker's own peak (it reports :func:`own_peak_rss` with each
    result)."""
    _WORKER_PEAKS[pid] = max(peak, _WORKER_PEAKS.get(pid, 0))


def forget_worker_peaks() -> None:
    """Start a conversion's count afresh (earlier conversions in this process had their own
    workers)."""
    _WORKER_PEAKS.clear()


def peak_rss() -> int:
    """Peak resident memory so far, in bytes: this process's, plus each analysis worker's
    (summed: the workers run side by side, so this bounds their joint peak from above).

    Not ``RUSAGE_CHILDREN``: every child process counts there, and on Linux a child started
    by ``fork``/``vfork`` (as C's ``system()`` does; MLX's CPU backend runs ``g++ --version``
    that way) takes the parent's resident size at that moment as its own peak, which doubled
    the figure (SmolLM2 under ``--max-memory 900MB``: 1.80GB reported, 859 MiB in fact).
    """
    return own_peak_rss() + sum(_WORKER_PEAKS.values())
