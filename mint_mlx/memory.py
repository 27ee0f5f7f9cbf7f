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


def peak_rss() -> int:
    """Peak resident memory so far, in bytes: this process's, plus the largest finished child's
    (analysis workers). ``ru_maxrss`` is in KiB on Linux and in bytes on macOS."""
    unit = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) * unit
