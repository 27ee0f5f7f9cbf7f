"""``python -m mint_mlx.generate``: ``mlx_lm.generate`` for models with extended formats.

It is mlx-lm's own command (same flags, same sampling, same output) with one change: models
load through :func:`mint_mlx.load`, which also reads extended formats. Reusing mlx-lm's
``main`` rather than copying it keeps every flag mlx-lm adds working here too.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from mint_mlx.cli import reported
from mint_mlx.runtime.load import load

PROG = "python -m mint_mlx.generate"


def main(argv: Sequence[str] | None = None) -> int:
    """Run mlx-lm's generate CLI on ``argv`` (default: the process's) with mint-mlx's loader."""
    # the module, not the function: mlx_lm's package attribute ``generate`` is the function
    mlx_generate: Any = importlib.import_module("mlx_lm.generate")

    saved_argv, saved_load = sys.argv, mlx_generate.load
    sys.argv = [PROG, *(sys.argv[1:] if argv is None else argv)]
    mlx_generate.load = load  # main() looks the loader up in its module at call time
    # Ctrl-C: generation writes nothing, there is nothing to clean up
    with reported("interrupted") as outcome:
        try:
            mlx_generate.main()
        finally:
            sys.argv, mlx_generate.load = saved_argv, saved_load
    return 0 if outcome.exit_code is None else outcome.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
