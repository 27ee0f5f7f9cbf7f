"""What every command line of mint-mlx shares: one-line errors, and its console scripts.

:func:`reported` is the CLIs' error rule: a :class:`~mint_mlx.errors.MintError` prints
``error: <message>`` on one line and gives its exit code; Ctrl-C prints ``error: <what was
kept>`` and gives 2; nothing else is caught (a bug keeps its traceback).

The console scripts (``mint-convert`` ...) load OpenBLAS under MLX's CPU matmul
(:func:`mint_mlx.blas.use_openblas`) before the command's module, and with it ``mlx.core``, is
imported: once MLX is loaded it is too late. This module imports neither MLX nor mlx-lm.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mint_mlx.blas import use_openblas
from mint_mlx.errors import MintError


@dataclass
class Outcome:
    """How the block under :func:`reported` ended: ``exit_code`` is None when it finished."""

    exit_code: int | None = None


@contextlib.contextmanager
def reported(interrupted: str | Callable[[], str]) -> Iterator[Outcome]:
    """Run a command's work as ``with reported("interrupted; ...") as outcome:``.

    A :class:`MintError` from the block is printed as ``error: <message>`` and its exit code
    kept in ``outcome.exit_code``; Ctrl-C prints ``error: <interrupted>`` (a callable is asked
    for the message then, to say what was kept) and keeps 2. Both are swallowed, so the caller
    returns ``outcome.exit_code`` when it is set.
    """
    outcome = Outcome()
    try:
        yield outcome
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        outcome.exit_code = e.exit_code
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        print(f"error: {message}", file=sys.stderr)
        outcome.exit_code = 2


def _run_main(module: str) -> int:
    """OpenBLAS first, then the command's module (which imports MLX), then its ``main()``."""
    use_openblas()
    main: Callable[[], int] = importlib.import_module(module).main
    return main()


def convert() -> int:
    """``mint-convert``: :mod:`mint_mlx.convert`."""
    return _run_main("mint_mlx.convert")


def plan() -> int:
    """``mint-plan``: :mod:`mint_mlx.plan`."""
    return _run_main("mint_mlx.plan")


def upload() -> int:
    """``mint-upload``: :mod:`mint_mlx.output.hub`."""
    return _run_main("mint_mlx.output.hub")


def evaluate() -> int:
    """``mint-evaluate``: :mod:`mint_mlx.tools.evaluate`."""
    return _run_main("mint_mlx.tools.evaluate")


def generate() -> int:
    """``mint-generate``: :mod:`mint_mlx.generate`."""
    return _run_main("mint_mlx.generate")
