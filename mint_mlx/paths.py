"""Where mint-mlx keeps things between runs (downloaded wheels, testbeds, analysis caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(create: bool = True) -> Path:
    """The cache directory: ``$MINT_MLX_CACHE`` or ``~/.cache/mint_mlx``.

    One place so that tests, CI and the README's commands share downloads and testbeds.
    ``create=False`` only names it: the path checks must not make a folder where they are
    about to refuse to write (inside a source model).
    """
    root = os.environ.get("MINT_MLX_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "mint_mlx"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
