"""Where a command may write: nothing a run reads, and nothing a user keeps, is ever written
into, moved or removed, whatever the paths and flags.

Every command that writes (``convert``, ``plan``, ``evaluate``, ``testbed``, the baselines)
checks its paths here, before any work, so that a mistake costs one line and not an hour:

1. **Paths are compared as the file system sees them.** Symlinks are resolved, and paths that
   exist are also compared by file identity (device and inode), so neither a symlink, a
   case-insensitive file system (macOS) nor a bind mount hides an overlap.
2. **An output directory may not be, contain, or lie inside anything the run reads**: the source
   model (its directory and the real path of every file in it: a hub snapshot's files are
   links into a blob store elsewhere), the calibration text, the analysis cache, mint-mlx's
   cache directory (which may hold the output's parent, but may not be replaced). A file the
   run writes (an analysis cache, a plot) may not be, or lie inside, anything else it reads.
3. **``--force`` replaces only an earlier output**: an existing directory that is empty, or that
   holds the command's marker (for models: ``mint_plan.json``, or a ``config.json`` with a
   ``quantization`` entry next to ``.safetensors`` shards; for testbeds: ``testbed.json`` or
   ``manifest.json``) and no subdirectory other than ``.cache`` (the hub client's upload state).
   A file, a 16-bit model, or a directory holding anything else is never replaced.
4. **Publishing is atomic and serialised** (:func:`publish`): the new output is written into a
   temporary sibling and swapped in under a lock on the parent directory with Ctrl-C held back,
   so two runs writing one output leave one complete output, never a mix; the one that finds
   the other's output in place fails with one line unless it was given ``--force``.

Each refusal is a :class:`~mint_mlx.errors.MintError` with one line naming the conflict and the
fix; the CLIs print it and exit with status 2.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mint_mlx.errors import DiskFullError, NotWritableError, OutputExistsError, PathConflictError

#: Name fragments of the temporary (being written) and replaced (being removed) directories.
TMP_MARKER = ".mint-tmp-"
OLD_MARKER = ".mint-old-"
#: The only subdirectory an output may hold and still be replaced: the hub's upload state.
REPLACEABLE_SUBDIRS = frozenset({".cache"})
#: OS errors that mean "this location cannot be written" (not "the disk is full").
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

#: Decides whether an existing directory is an earlier output of a command: a short description
#: of what it is (said when it is replaced), or None when it is not one.
OutputKind = Callable[[Path], str | None]


@dataclass(frozen=True)
class Read:
    """A path a run reads (or keeps), which nothing the run writes may touch.

    ``what`` names it in messages ("the source model"). ``may_hold_outputs`` marks a directory
    an output may lie inside but never be or contain (mint-mlx's cache directory).
    """

    path: Path
    what: str
    may_hold_outputs: bool = False


def real(path: str | Path) -> Path:
    """``path`` with ``~`` expanded and every symlink of its existing part resolved."""
    return Path(path).expanduser().resolve()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestor_ids(path: Path) -> set[tuple[int, int]]:
    """File identities of the existing proper ancestors of ``path``."""
    return {i for i in map(_identity, path.parents) if i is not None}


def relation(written: str | Path, read: str | Path) -> str | None:
    """How a path that is written relates to one that is read: ``"is"``, ``"contains"``,
    ``"lies inside"``, or None when neither touches the other."""
    w, r = real(written), real(read)
    if w == r:
        return "is"
    if w in r.parents:
        return "contains"
    if r in w.parents:
        return "lies inside"
    # the same file under another spelling (case-insensitive file system, bind mount)
    wid, rid = _identity(w), _identity(r)
    if wid is not None and wid == rid:
        return "is"
    if wid is not None and wid in _ancestor_ids(r):
        return "contains"
    if rid is not None and rid in _ancestor_ids(w):
        return "lies inside"
    return None


def source_reads(directory: Path) -> list[Read]:
    """The source model directory and the real path of every file in it (so a hub snapshot's
    blob store, reached through links, is protected too)."""
    reads = [Read(real(directory), "the source model")]
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return reads
    for entry in entries:
        target = real(entry)
        if target.parent != reads[0].path:
            reads.append(Read(target, f"the source file {entry.name}"))
    return reads


def _conflict(flag: str, path: Path, rel: str, read: Read, fix: str) -> PathConflictError:
    return PathConflictError(f"{flag} {path} {rel} {read.what} {read.path}; {fix}")


def check_output_dir(out: Path, reads: Sequence[Read], flag: str = "--mlx-path") -> None:
    """Refuse an output directory that is, contains, or lies inside anything the run reads,
    or that is a file. Creates and changes nothing."""
    fix = f"pick another {flag} outside it (what a run reads is never replaced, even with --force)"
    for read in reads:
        rel = relation(out, read.path)
        if rel is None or (rel == "lies inside" and read.may_hold_outputs):
            continue
        if rel == "lies inside" and read.path.is_file():
            rel = "is under"  # out would be a path below a file: it cannot be created anyway
        raise _conflict(flag, out, rel, read, fix)
    if out.exists() and not out.is_dir():
        raise PathConflictError(f"{flag} {out} is a file; pick a directory path")


def check_output_file(
    path: Path, reads: Sequence[Read], flag: str, directory: bool = False
) -> None:
    """Refuse a file the run writes (cache, plot) that is, or lies inside, something else the
    run reads, or that is a directory (``directory``: a folder the run writes files into)."""
    for read in reads:
        rel = relation(path, read.path)
        if rel in ("is", "lies inside") and not read.may_hold_outputs:
            raise _conflict(flag, path, rel, read, f"pick another {flag} outside it")
    if path.is_dir() and not directory:
        raise PathConflictError(f"{flag} {path} is a directory; pass a file path")


def check_run(
    source_dir: Path | None,
    *,
    out: Path | None = None,
    force: bool = False,
    calibration: str | Path | None = None,
    analysis: Path | None = None,
    written: Sequence[tuple[str, Path]] = (),
    cache: Path | None = None,
) -> list[Read]:
    """Every path rule of a convert or plan run, before any work; returns what the run reads.

    The run reads the source and the calibration text; it writes into mint-mlx's ``cache``
    directory, the ``analysis`` cache file (which it also reads), the ``written`` files
    (``(flag, path)``: plots) and, unless ``out`` is None (a dry run), the output directory,
    which ``force`` may replace only if it is an earlier output.
    """
    reads = source_reads(source_dir) if source_dir is not None else []
    if calibration is not None:
        reads.append(Read(real(calibration), "the calibration file"))
    if cache is not None:
        check_output_file(cache, reads, "MINT_MLX_CACHE", directory=True)
        reads.append(Read(real(cache), "mint-mlx's cache directory", may_hold_outputs=True))
    if analysis is not None:
        check_output_file(analysis, reads, "--analysis")
        check_writable(analysis, "--analysis")
        reads.append(Read(real(analysis), "the analysis cache"))
    for flag, path in written:
        check_output_file(path, reads, flag)
        check_writable(path, flag)
    if out is not None:
        check_output(out, reads, force)
        check_writable(out, "--mlx-path")
    return reads


def model_output_kind(directory: Path) -> str | None:
    """What an existing model output directory is, or None when it is not one: ours
    (``mint_plan.json``) or any quantized model (``config.json`` with a ``quantization`` entry
    next to ``.safetensors`` shards). A 16-bit checkpoint is some run's source: never ours."""
    if (directory / "mint_plan.json").is_file():
        return "a mint-mlx output"
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    quantized = isinstance(config, dict) and (
        "quantization" in config or "quantization_config" in config
    )
    if quantized and any(directory.glob("*.safetensors")):
        return "a quantized model"
    return None


def testbed_output_kind(directory: Path) -> str | None:
    """What an existing testbed directory is, or None: a model (``testbed.json``) or the
    Wikipedia text (``manifest.json``)."""
    if (directory / "testbed.json").is_file():
        return "a testbed model"
    if (directory / "manifest.json").is_file():
        return "a testbed text"
    return None


def replaceable(out: Path, kind: OutputKind) -> tuple[str | None, str]:
    """(description, problem): the description of an existing ``out`` that ``--force`` may
    replace, or None and why not."""
    if not out.is_dir():
        return None, "it is a file"
    entries = sorted(out.iterdir())
    if not entries:
        return "an empty directory", ""
    stray = [e.name for e in entries if e.is_dir() and e.name not in REPLACEABLE_SUBDIRS]
    what = kind(out)
    if what is None:
        return None, f"it is not an earlier output (it holds {entries[0].name})"
    if stray:
        return None, f"it is {what} but also holds the folder {stray[0]}"
    return what, ""


def check_replace(
    out: Path,
    force: bool,
    flag: str = "--mlx-path",
    kind: OutputKind = model_output_kind,
    during: bool = False,
) -> str | None:
    """None if ``out`` does not exist; else what ``--force`` will replace, or a refusal.

    ``during`` words the refusal for an output that appeared while the run was working
    (another run wrote it)."""
    if not out.exists() and not out.is_symlink():
        return None
    what, problem = replaceable(out, kind)
    if what is None:
        raise PathConflictError(
            f"{flag} {out} exists and --force replaces only an earlier output, but {problem}; "
            f"remove it yourself or pick another {flag}"
        )
    if not force:
        if during:
            raise OutputExistsError(
                f"{flag} {out} was written by another run while this one worked; keep it, or "
                "re-run with --force to replace it (the analysis is cached)"
            )
        raise OutputExistsError(
            f"output directory {out} already exists; pass --force to replace it"
        )
    return what


def check_output(
    out: Path,
    reads: Sequence[Read],
    force: bool,
    flag: str = "--mlx-path",
    kind: OutputKind = model_output_kind,
) -> None:
    """The output rules, checked before a run's work and again before its output is staged:
    ``out`` may not overlap what the run reads nor be a file (:func:`check_output_dir`), and
    may exist only if ``force`` may replace it (:func:`check_replace`)."""
    check_output_dir(out, reads, flag)
    check_replace(real(out), force, flag, kind)


def check_writable(path: Path, flag: str) -> None:
    """Refuse up front a location whose nearest existing folder cannot be written (read-only
    file system, no permission), by creating and removing an empty file there: permission
    bits alone do not tell (root, read-only mounts, ``/sys``)."""
    folder = real(path).parent
    while not folder.exists():
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".mint-probe-", dir=folder)
    except OSError as e:
        refused = not_writable(e, flag, path)
        if refused is None:
            raise
        raise refused from e
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable location met while writing ``what`` (``path``) into
    one line."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device of {what} {path}; free space and re-run "
                "(finished work is cached)"
            ) from e
        refused = not_writable(e, what, path)
        if refused is None:
            raise
        raise refused from e


def not_writable(e: OSError, flag: str, path: Path) -> NotWritableError | None:
    """The one-line error for a location that cannot be written, or None for other errors."""
    if e.errno not in NOT_WRITABLE_ERRNOS:
        return None
    return NotWritableError(
        f"cannot write {flag} {path} ({os.strerror(e.errno or 0).lower()}); pick a location "
        "you can write to"
    )


@contextlib.contextmanager
def _sigint_held() -> Iterator[list[bool]]:
    """Hold Ctrl-C back for a few system calls that must not be separated (renames); a Ctrl-C
    in that window is raised right after it. Outside the main thread there is no handler to
    swap, and Ctrl-C reaches only the main thread anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield [False]
        return
    caught = [False]

    def hold(signum: int, frame: object) -> None:
        caught[0] = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """An exclusive lock on the directory that holds an output: one swap at a time."""
    import fcntl

    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def publish(
    tmp: Path,
    out: Path,
    force: bool,
    flag: str = "--mlx-path",
    kind: OutputKind = model_output_kind,
    published: Callable[[Path, str | None], None] | None = None,
) -> str | None:
    """Rename the finished ``tmp`` to ``out``; return what it replaced (None if nothing).

    Under a lock on the parent and with Ctrl-C held back: ``out`` is checked again (another
    run may have written it meanwhile), the old output is moved aside, the new one renamed
    into place, and ``published`` told, before the old one is removed. ``tmp`` is removed if
    the swap is refused.
    """
    replaced = None
    old = out.parent / f".{out.name}{OLD_MARKER}{os.getpid()}-{threading.get_ident()}"
    moved = False
    try:
        with _sigint_held(), _parent_locked(out.parent):
            replaced = check_replace(out, force, flag, kind, during=True)
            if replaced is not None:
                os.replace(out, old)
                moved = True
            try:
                os.replace(tmp, out)
            except BaseException:
                if moved:  # put the old output back: never leave neither
                    os.replace(old, out)
                    moved = False
                raise
            if published is not None:
                published(out, replaced)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    return replaced


@contextlib.contextmanager
def staged_output(
    out: Path,
    force: bool,
    reads: Sequence[Read] = (),
    flag: str = "--mlx-path",
    kind: OutputKind = model_output_kind,
    published: Callable[[Path, str | None], None] | None = None,
) -> Iterator[Path]:
    """A temporary directory next to ``out`` that replaces ``out`` only if the block succeeds
    (:func:`publish`); on any exception, Ctrl-C included, it is removed and ``out`` is left as
    it was. The path rules are checked before anything is created."""
    out = real(out)
    check_output(out, reads, force, flag, kind)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    except OSError as e:
        refused = not_writable(e, flag, out)
        if refused is None:
            raise
        raise refused from e
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, force, flag, kind, published)
