"""The config.json marker of an output that needs mint-mlx to load.

An output that uses an extended format says ``"model_type": "mint-mlx/<type>"`` and keeps the
real type under ``"mint_mlx": {"model_type": ..., "format_version": 1}``, so that stock mlx-lm
refuses it by name instead of loading packed weights it would misread. The save step writes the
marker; :mod:`mint_mlx.runtime.load` reads it. It lives here, below both, so that neither
imports the other.
"""

from __future__ import annotations

from typing import Any

#: Version of the on-disk layout of extended outputs (what mint_mlx.load reads).
FORMAT_VERSION = 1

#: Prefix of ``model_type`` in the config of an output that needs mint-mlx.
MODEL_TYPE_PREFIX = "mint-mlx/"


def mark_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the marker of an output that needs mint-mlx (see the module docstring)."""
    original = str(config["model_type"])
    marked = dict(config)
    marked["model_type"] = MODEL_TYPE_PREFIX + original
    marked["mint_mlx"] = {"model_type": original, "format_version": FORMAT_VERSION}
    return marked
