"""Errors that reach the user.

Every failure the user can fix raises a :class:`MintError` subclass whose message says what went
wrong *and* what to do. The CLIs print that one line and exit with status 2; library callers get a
normal exception they can catch.
"""

from __future__ import annotations


class MintError(Exception):
    """Base class: a problem with the user's input or environment, with a fix in the message."""

    exit_code = 2


class SourceError(MintError):
    """The source model cannot be found, read or understood."""


class UnsupportedModelError(SourceError):
    """mlx-lm has no implementation of this architecture."""


class CorruptShardError(SourceError):
    """A safetensors shard is truncated, corrupt or missing."""


class BudgetError(MintError):
    """The memory budget cannot be met (or was not understood)."""


class OutputExistsError(MintError):
    """The output directory exists and ``force`` was not given."""


class AnalysisCacheError(MintError):
    """The analysis cache file cannot be used."""


class SaveCheckError(MintError):
    """The saved model does not load the way the plan says it should."""


class DiskFullError(MintError):
    """The output's file system has no room for the model."""


class HubError(MintError):
    """Downloading from or uploading to the Hugging Face hub failed."""


class PathConflictError(MintError):
    """An output would write into, replace or remove something the run reads or the user keeps
    (see :mod:`mint_mlx.path_safety`)."""


class NotWritableError(MintError):
    """An output location cannot be written (permission denied, read-only file system)."""


class SourceChangedError(SourceError):
    """The source changed while it was being converted: its content no longer matches what was
    analyzed, so the output would not be the model the plan describes."""


def one_line(text: object, limit: int = 200, typed: bool = False) -> str:
    """The first line of ``text`` (an exception's message, a server's reply), whitespace
    collapsed and cut at ``limit`` characters, for messages that must stay on one line (errors
    from MLX, mlx-lm's model classes and the hub span many). ``typed`` puts the exception's type
    in front: ``Type: first line``."""
    lines = str(text).strip().splitlines()
    line = " ".join(lines[0].split()) if lines else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    if not typed:
        return line
    return f"{type(text).__name__}: {line}" if line else type(text).__name__
