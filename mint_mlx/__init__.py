"""mint-mlx: quantize LLMs for Apple Silicon under a memory budget.

Every weight tensor gets its own (bits, group size, format), chosen by a rate-distortion allocator
over exact byte costs. Default output loads in stock mlx-lm; output with extended formats
(``--formats extended``) loads with :func:`mint_mlx.load`, a drop-in for ``mlx_lm.load``.

The package reads as its data flow (see ARCHITECTURE.md): :mod:`mint_mlx.source` ->
:mod:`mint_mlx.sensitivity` -> :mod:`mint_mlx.analysis` -> :mod:`mint_mlx.allocation` ->
:mod:`mint_mlx.output`, with :mod:`mint_mlx.quant` (the numerics of each format) and
:mod:`mint_mlx.runtime` (loading and running extended formats) beside it, and
:mod:`mint_mlx.tools` (evaluation, testbeds, baselines, the kernel emulator) off the path.

Importing the package changes nothing in the caller's process: it loads no BLAS, no MLX and no
runtime layers. The CLIs that need OpenBLAS under MLX's CPU matmul load it explicitly
(:func:`mint_mlx.blas.use_openblas`).
"""

from __future__ import annotations

from typing import Any

from mint_mlx.errors import MintError

__version__ = "0.1.0"

__all__ = ["MintError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy so that ``import mint_mlx`` stays free of MLX and mlx-lm (start-up time, no side
    # effects); ``mint_mlx.load`` is the function, the module is ``mint_mlx.runtime.load``.
    if name == "load":
        from mint_mlx.runtime.load import load

        return load
    raise AttributeError(f"module 'mint_mlx' has no attribute {name!r}")
