"""mint-mlx: quantize LLMs for Apple Silicon under a memory budget.

Every weight tensor gets its own (bits, group size, format), chosen by a rate-distortion allocator
over exact byte costs. Default output loads in stock mlx-lm; output with extended formats
(``--formats extended``) loads with :func:`mint_mlx.load`, a drop-in for ``mlx_lm.load``.

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


# After use_openblas (it must precede mlx.core). Binding the function here also keeps the name
# ``mint_mlx.load`` the function: the submodule of the same name is imported by this line, so no
# later ``import mint_mlx.load`` rebinds the package attribute to the module.
from .load import load  # noqa: E402

__all__ = ["MintError", "__version__", "load"]
