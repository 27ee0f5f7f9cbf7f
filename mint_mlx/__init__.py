"""mint-mlx: quantize LLMs for Apple Silicon under a memory budget.

Every weight tensor gets its own (bits, group size, format), chosen by a rate-distortion allocator
over exact byte costs. Default output loads in stock mlx-lm.
"""

from __future__ import annotations

from .errors import MintError

__version__ = "0.1.0"

__all__ = ["MintError", "__version__"]
