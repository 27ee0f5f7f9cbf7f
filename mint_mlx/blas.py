"""Put OpenBLAS under MLX's CPU float32 matmul on Linux.

The ``mlx[cpu]`` wheel bundles the *reference* BLAS: float32 matmul runs at 4-6 GFLOP/s on a
2-core x86 machine. Debian's OpenBLAS exports the same ``cblas_*`` symbols; loaded into the
process's global symbol scope *before* ``mlx.core`` is imported, the dynamic linker binds MLX to it
instead (measured 5.4 -> 194 GFLOP/s on a 1024^3 fp32 matmul). This is what makes the float32
evaluation backend practical on a CPU. bf16/fp16 matmuls do not go through BLAS and stay slow.

Order matters: once ``mlx.core`` is imported its BLAS symbols are bound for good, and loading
OpenBLAS afterwards changes nothing (measured: still 6.8 GFLOP/s). Call :func:`use_openblas` at the
very top of an entry point, or set ``LD_PRELOAD`` to the library path.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

#: Debian/Ubuntu paths of a BLAS-interface OpenBLAS (package ``libopenblas0-pthread`` first).
OPENBLAS_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-serial/libblas.so.3",
)

#: Set to a library path to override the search (or to an empty string to disable).
ENV_VAR = "MINT_MLX_OPENBLAS"

_state: dict[str, bool | str | None] = {"active": None, "path": None}


def find_openblas() -> Path | None:
    """The first OpenBLAS found: ``$MINT_MLX_OPENBLAS`` if set, else the Debian locations."""
    override = os.environ.get(ENV_VAR)
    if override is not None:
        return Path(override) if override and Path(override).is_file() else None
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def _preloaded() -> bool:
    """Whether OpenBLAS came in through ``LD_PRELOAD`` (then it was there before MLX too)."""
    return "openblas" in os.environ.get("LD_PRELOAD", "").lower()


def use_openblas() -> bool:
    """Load OpenBLAS globally so that MLX's CPU float32 matmul uses it; return whether it does.

    Returns ``True`` when OpenBLAS is (now) in the global scope ahead of MLX: loaded by an earlier
    call before ``mlx.core`` was imported, loaded by this call, or preloaded with ``LD_PRELOAD``.
    Returns ``False`` on macOS (MLX uses Accelerate there), when no OpenBLAS is installed, or when
    ``mlx.core`` was already imported by someone else (too late: its symbols are bound).
    Idempotent and cheap; never raises.
    """
    if _state["active"] is not None:
        return bool(_state["active"])
    if sys.platform != "linux":
        return False
    if _preloaded():
        _state["active"] = True
        return True
    if "mlx.core" in sys.modules:
        # Too late: the dynamic linker already bound MLX to its bundled reference BLAS.
        # Do not cache: a later LD_PRELOAD'ed process is a different process anyway.
        return False
    path = find_openblas()
    if path is None:
        _state["active"] = False
        return False
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        _state["active"] = False
        return False
    _state["active"] = True
    _state["path"] = str(path)
    return True


def openblas_active() -> bool:
    """Whether :func:`use_openblas` succeeded in this process (without trying to load it)."""
    return bool(_state["active"]) or (sys.platform == "linux" and _preloaded())
