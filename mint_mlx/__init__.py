"""mint-mlx: quantize LLMs for Apple Silicon under a memory budget.

Every weight tensor gets its own (bits, group size, format), chosen by a rate-distortion allocator
over exact byte costs. Default output loads in stock mlx-lm.

Public functions live in their modules, each the library form of a CLI with the same parameters:
``mint_mlx.convert.convert``, ``mint_mlx.evaluate.evaluate``, ``mint_mlx.testbed.ensure_testbed``.

Importing the package puts OpenBLAS under MLX's CPU matmul where it is installed (Linux): MLX's
bundled reference BLAS is ~30x slower, and the choice must be made before ``mlx.core`` loads.
It changes speed only, never results beyond float rounding.
"""

from __future__ import annotations

from .blas import use_openblas
from .errors import MintError

use_openblas()

__version__ = "0.1.0"

__all__ = ["MintError", "__version__"]
