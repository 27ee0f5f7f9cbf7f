"""Upload a converted model directory to the Hugging Face hub (card included).

Three things make an upload of a multi-gigabyte model dependable:

* **Only finished output goes up.** :func:`check_uploadable` re-checks, cheaply (headers and
  sizes, no tensor data), what the post-save check established when the conversion renamed its
  temporary directory into place: ``config.json`` parses, every shard named in the index is there
  with a valid safetensors header holding the tensors the index promises, every module the
  ``quantization`` block calls quantized has its scales, and the shard bytes match
  ``mint_plan.json``. A directory that was truncated, half-copied or edited since is refused
  before any hub call, so a broken model never becomes the public one.
* **Transient failures are retried** with exponential backoff (connection drops, timeouts,
  HTTP 408/429/5xx), while permanent ones (not logged in, no write access, bad repo id) fail at
  once with one line that says what to do: retrying cannot fix them.
* **Large uploads resume.** Above :data:`LARGE_UPLOAD_BYTES` or :data:`LARGE_UPLOAD_FILES` we use
  ``HfApi.upload_large_folder`` where the installed huggingface_hub has it (0.25 to 1.x). It keeps
  its progress in ``DIR/.cache/huggingface/`` so a re-run (or our retry) resumes where it stopped.
  huggingface_hub 2.x removed it because ``upload_folder`` itself now commits large folders in
  batches and resumes on a re-run (with ``hf_xet``, a dependency), so there we call that.

* **A repo that holds another model is never overwritten by accident.** Before uploading, the
  repo's files are listed: if it holds a model (``config.json`` or ``.safetensors``) whose
  ``.safetensors`` and ``.json`` files are not byte-identical to ours (by the hub's own sha256
  for LFS files and git blob id for the rest, compared with hashes of the local files), the
  upload is refused unless ``overwrite`` (``--overwrite-repo``) is given; then the old model's
  files that ours lacks are deleted too, so the repo never holds a mix of two models. An empty
  repo, a re-upload of the same model and the resumption of an interrupted upload (a subset of
  the same files) go ahead.

The resume state directory is harmless to the rest of mint-mlx: huggingface_hub never uploads it
(``.cache/huggingface`` is in its default ignore patterns), mlx-lm and our loaders read only
top-level files, :func:`check_uploadable` ignores it, and ``convert --force`` replaces the whole
output directory, so stale upload state never outlives the files it describes.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import importlib
import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mint_mlx.cli import reported
from mint_mlx.errors import CorruptShardError, HubError, MintError, one_line
from mint_mlx.path_safety import OLD_MARKER, TMP_MARKER
from mint_mlx.safetensors_io import read_header

#: Above this many bytes in the folder, use the resumable large-folder upload.
LARGE_UPLOAD_BYTES = 5 * 10**9
#: ... or above this many files (one commit with hundreds of files tends to time out).
LARGE_UPLOAD_FILES = 100
#: Tries per hub call (the first one included) before a transient error is given up on.
MAX_ATTEMPTS = 5
#: First backoff delay in seconds; it doubles after each failure, up to :data:`MAX_BACKOFF_S`.
BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0
#: Longest ``Retry-After`` a rate-limited (429/503) response may make us wait, in seconds.
MAX_RETRY_AFTER_S = 300.0
#: Where ``upload_large_folder`` keeps its resume state, inside the uploaded folder.
UPLOAD_STATE_DIR = ".cache/huggingface"
#: Name fragments of :func:`mint_mlx.path_safety.staged_output`'s temporary and replaced
#: directories.
STAGING_MARKERS = (TMP_MARKER, OLD_MARKER)
#: Socket errors worth another try (unreachable network, reset, refused, DNS "try again").
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
    }
)
#: Transport exception classes of the HTTP clients huggingface_hub has used (requests before
#: 1.0, httpx in 1.x, httpx2 in 2.x), looked up only when an error happens.
_TRANSPORT_ERRORS = (
    ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError")),
    ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
    ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
)
INDEX_FILE = "model.safetensors.index.json"
PLAN_FILE = "mint_plan.json"
#: Remote files that must be identical to ours for an upload to go ahead without overwrite.
MODEL_SUFFIXES = (".safetensors", ".json")
#: The hub creates it in every repo; it is never deleted.
GITATTRIBUTES = ".gitattributes"


def _refuse(directory: Path, problem: str) -> HubError:
    """The error for a directory that is not fit to upload (names from a damaged file may hold
    line breaks: they are escaped, so the message stays one line)."""
    problem = problem.replace("\r", "\\r").replace("\n", "\\n")
    return HubError(f"refusing to upload {directory}: {problem}; re-run the conversion")


# --- what may be uploaded --------------------------------------------------------------------


def _read_json(directory: Path, name: str) -> Any:
    path = directory / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(directory, f"{name} is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise _refuse(directory, f"{name} is not valid JSON ({one_line(e)})") from e


def _shard_names(directory: Path) -> tuple[list[str], dict[str, str]]:
    """Shards the directory must hold (those the index names, else every ``*.safetensors``) and
    the index's tensor -> shard map (empty without an index)."""
    on_disk = sorted(p.name for p in directory.glob("*.safetensors"))
    if not (directory / INDEX_FILE).exists():
        if not on_disk:
            raise _refuse(directory, "it holds no .safetensors weights")
        return on_disk, {}
    index = _read_json(directory, INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise _refuse(directory, f"{INDEX_FILE} has no valid weight_map")
    listed = sorted(set(weight_map.values()))
    for name in listed:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise _refuse(directory, f"{INDEX_FILE} names {name!r}, which is not a shard file")
        if not (directory / name).is_file():
            raise _refuse(directory, f"shard {name} listed in {INDEX_FILE} is missing")
    stray = sorted(set(on_disk) - set(listed))
    if stray:  # mlx-lm loads every model*.safetensors, listed or not
        raise _refuse(directory, f"{stray[0]} is not listed in {INDEX_FILE}")
    return listed, weight_map


def check_uploadable(directory: str | Path) -> None:
    """Raise :class:`HubError` unless ``directory`` is a complete model directory.

    The conversion's own post-save check loads the model through mlx-lm before the directory
    gets its final name; this re-checks the parts that can break afterwards, or that an
    interrupted copy leaves behind, for the price of reading JSON and shard headers only.
    Plain (non-mint) model directories pass too, minus the checks against ``mint_plan.json``.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise HubError(f"{directory} is not a directory; pass the output directory of a conversion")
    resolved = directory.resolve()
    if any(m in resolved.name for m in STAGING_MARKERS):
        raise _refuse(directory, "it is a conversion's temporary directory (it never finished)")
    pending = sorted(resolved.parent.glob(f".{resolved.name}{STAGING_MARKERS[0]}*"))
    if pending:
        raise HubError(
            f"a conversion into {directory} is running or was killed ({pending[0].name} exists); "
            "wait for it to finish, or delete that directory and re-run the conversion"
        )

    config = _read_json(directory, "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _refuse(directory, "config.json is not a model config (no model_type)")
    quant = config.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise _refuse(directory, "config.json has a malformed quantization entry")

    shard_names, weight_map = _shard_names(directory)
    tensors: set[str] = set()
    sizes = 0
    for name in shard_names:
        shard = directory / name
        try:
            header = read_header(shard)
        except CorruptShardError as e:
            reason = one_line(e.__cause__ or e)
            raise _refuse(directory, f"{name} is not a valid safetensors file ({reason})") from e
        tensors.update(k for k in header if k != "__metadata__")
        sizes += shard.stat().st_size
    for tensor, shard_name in sorted(weight_map.items()):
        if tensor not in tensors:
            raise _refuse(
                directory, f"tensor {tensor} listed in {INDEX_FILE} is not in {shard_name}"
            )
    for module, entry in (quant or {}).items():
        if isinstance(entry, dict) and f"{module}.scales" not in tensors:
            raise _refuse(directory, f"{module} is quantized in config.json but has no scales")
        if entry is False and f"{module}.scales" in tensors:
            raise _refuse(directory, f"{module} is 16-bit in config.json but has scales")

    if (directory / PLAN_FILE).exists():
        plan = _read_json(directory, PLAN_FILE)
        expected = plan.get("total_bytes") if isinstance(plan, dict) else None
        if isinstance(expected, int) and expected > 0 and expected != sizes:
            raise _refuse(
                directory, f"its shards hold {sizes} bytes but {PLAN_FILE} says {expected}"
            )
        if not (directory / "README.md").is_file():
            raise _refuse(directory, "the model card README.md is missing")


def folder_size(directory: Path) -> tuple[int, int]:
    """(bytes, files) that would be uploaded: everything but VCS and upload-state folders."""
    total = files = 0
    state = tuple(Path(UPLOAD_STATE_DIR).parts)
    for p in directory.rglob("*"):
        parts = p.relative_to(directory).parts
        if parts[: len(state)] == state or ".git" in parts or not p.is_file():
            continue
        total += p.stat().st_size
        files += 1
    return total, files


# --- what the repo already holds ---------------------------------------------------------------


def _file_hash(path: Path, h: Any, prefix: bytes = b"") -> str:
    h.update(prefix)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return str(h.hexdigest())


def same_content(local: Path, remote: Any) -> bool:
    """Whether the local file holds exactly the remote one (an ``huggingface_hub.RepoFile``):
    size, then the sha256 the hub keeps for LFS files or the git blob id of the others."""
    if not local.is_file() or local.stat().st_size != remote.size:
        return False
    sha256 = getattr(getattr(remote, "lfs", None), "sha256", None)
    if sha256:
        return _file_hash(local, hashlib.sha256()) == sha256
    blob = f"blob {remote.size}\0".encode()  # git's object header
    return _file_hash(local, hashlib.sha1(), blob) == remote.blob_id


def stale_remote_files(
    directory: Path, remote: Sequence[Any], repo_id: str, overwrite: bool, rerun: str
) -> list[str]:
    """Refuse a repo that holds a different model unless ``overwrite``; return the remote files
    to delete with the upload (those of a different model that ours lacks).

    ``remote`` lists the repo's files (``RepoFile``: path, size, blob id, LFS sha256). It holds a
    model if any is ``config.json`` or ``.safetensors``; that model is ours if every remote
    ``.safetensors`` and ``.json`` file is byte-identical to the local file of that name (a
    finished or interrupted upload of the same folder).
    """
    if not any(f.path == "config.json" or f.path.endswith(".safetensors") for f in remote):
        return []
    differs = next(
        (
            f.path
            for f in sorted(remote, key=lambda f: str(f.path))
            if f.path.endswith(MODEL_SUFFIXES) and not same_content(directory / f.path, f)
        ),
        None,
    )
    if differs is None:
        return []
    if not overwrite:
        where = "differs from ours" if (directory / differs).is_file() else "is not in ours"
        raise HubError(
            f"refusing to upload {directory} to {repo_id}: the repo already holds a different "
            f"model (its {differs} {where}); pick another repo, or replace that model with "
            f"`{rerun} --overwrite-repo`"
        )
    return sorted(
        f.path for f in remote if f.path != GITATTRIBUTES and not (directory / f.path).is_file()
    )


def _list_files(api: Any, repo_id: str) -> list[Any]:
    """The repo's files (folders left out)."""
    entries = api.list_repo_tree(repo_id=repo_id, recursive=True, repo_type="model")
    return [e for e in entries if hasattr(e, "blob_id")]


# --- which failures are worth a retry ----------------------------------------------------------


def _status(e: BaseException) -> int | None:
    """HTTP status of a hub error (HfHubHTTPError and requests/httpx errors carry a response)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in _TRANSPORT_ERRORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        classes.extend(getattr(module, n) for n in names if hasattr(module, n))
    return tuple(classes)


def _is_offline_mode(e: BaseException) -> bool:
    return type(e).__name__ == "OfflineModeIsEnabled"  # a ConnectionError, yet never transient


def is_transient(e: BaseException) -> bool:
    """True for failures another try may fix: the network, timeouts, HTTP 408, 429 and 5xx."""
    if _is_offline_mode(e):
        return False
    status = _status(e)
    if status is not None:
        return status in (408, 429) or status >= 500
    if isinstance(e, _transport_errors()):
        return True
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def _retry_after(e: BaseException) -> float | None:
    """Seconds a rate-limited response asked us to wait (``Retry-After`` in seconds)."""
    headers = getattr(getattr(e, "response", None), "headers", None)
    try:
        value = headers.get("retry-after") if headers is not None else None
        return min(float(value), MAX_RETRY_AFTER_S) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def _permanent_error(e: BaseException, repo_id: str, rerun: str) -> HubError:
    """One line naming the problem of a failure that retrying cannot fix, and its fix."""
    status = _status(e)
    name = type(e).__name__
    if name == "LocalTokenNotFoundError" or status == 401:
        problem = "the hub did not accept your login"
        fix = "run `hf auth login` (or set HF_TOKEN) with a write token"
    elif status == 403:
        problem = "your token may not write to this repo"
        fix = "log in with a write token (`hf auth login`) or pick a namespace you own"
    elif name in ("RepositoryNotFoundError", "GatedRepoError") or status == 404:
        problem = "the repo was not found or is not yours"
        fix = "check the repo id (ORG/NAME) and your login (`hf auth login`)"
    elif _is_offline_mode(e):
        problem = "HF_HUB_OFFLINE is set"
        fix = "unset it"
    elif isinstance(e, ValueError) and status is None:
        problem = f"{repo_id!r} was rejected ({one_line(e)})"
        fix = "use a repo id of the form ORG/NAME"
    else:
        problem = f"{name}: {one_line(e)}"
        fix = "fix the cause"
    return HubError(f"upload to {repo_id} failed ({problem}); {fix}, then re-run `{rerun}`")


def _with_retries(
    call: Callable[[], Any],
    repo_id: str,
    rerun: str,
    attempts: int,
    backoff_s: float,
    max_backoff_s: float,
    sleep: Callable[[float], None],
) -> Any:
    """Run ``call``; on a transient error wait ``backoff_s * 2**k`` (capped) and try again."""
    for attempt in range(max(attempts, 1)):
        try:
            return call()
        except MintError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below; nothing escapes unexplained
            if not is_transient(e):
                raise _permanent_error(e, repo_id, rerun) from e
            if attempt + 1 >= attempts:
                raise HubError(
                    f"upload to {repo_id} failed after {attempts} attempts "
                    f"({type(e).__name__}: {one_line(e)}); check your network, then re-run "
                    f"`{rerun}` (it resumes where it stopped)"
                ) from e
            delay = min(backoff_s * 2**attempt, max_backoff_s)
            sleep(max(delay, _retry_after(e) or 0.0))
    raise AssertionError("unreachable")


# --- the upload ------------------------------------------------------------------------------


def upload(
    directory: str | Path,
    repo_id: str,
    private: bool = False,
    api: Any = None,
    *,
    large_bytes: int = LARGE_UPLOAD_BYTES,
    large_files: int = LARGE_UPLOAD_FILES,
    attempts: int = MAX_ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
    progress: bool = False,
    overwrite: bool = False,
) -> str:
    """Check ``directory``, create ``repo_id`` (if needed), upload it; return the repo URL.

    A repo that already holds a different model is refused unless ``overwrite``, which then
    replaces that model entirely (:func:`stale_remote_files`).

    ``api`` is an ``huggingface_hub.HfApi`` (injectable so tests can stand in for the hub), as
    is ``sleep`` (the backoff waits). Folders above ``large_bytes`` or ``large_files`` go through
    the resumable large-folder path. ``progress`` lets huggingface_hub print its periodic
    report for large uploads (the CLI turns it on; library calls stay quiet).
    Raises :class:`HubError` with one line naming the problem and the fix.
    """
    directory = Path(directory).expanduser()
    check_uploadable(directory)
    rerun = f"python -m mint_mlx.output.hub {shlex.quote(str(directory))} --repo {repo_id}"
    rerun += (" --private" if private else "") + (" --overwrite-repo" if overwrite else "")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()

    def retried(call: Callable[[], Any]) -> Any:
        return _with_retries(call, repo_id, rerun, attempts, backoff_s, max_backoff_s, sleep)

    url = retried(
        lambda: api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    )
    remote = retried(lambda: _list_files(api, repo_id))
    stale = stale_remote_files(directory, remote, repo_id, overwrite, rerun)
    nbytes, nfiles = folder_size(directory)
    if (nbytes > large_bytes or nfiles > large_files) and hasattr(api, "upload_large_folder"):
        retried(
            lambda: api.upload_large_folder(
                repo_id=repo_id,
                folder_path=str(directory),
                repo_type="model",
                private=private,
                print_report=progress,
            )
        )
        if stale:
            retried(lambda: _delete(api, repo_id, stale))
    else:
        extra = {"delete_patterns": [glob.escape(p) for p in stale]} if stale else {}
        retried(
            lambda: api.upload_folder(
                folder_path=str(directory),
                repo_id=repo_id,
                repo_type="model",
                commit_message="Upload mint-mlx quantized model",
                **extra,
            )
        )
    return str(url)


def _delete(api: Any, repo_id: str, paths: Sequence[str]) -> Any:
    """One commit deleting ``paths`` (the replaced model's files that ours lacks)."""
    from huggingface_hub import CommitOperationDelete

    return api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=[CommitOperationDelete(path_in_repo=p) for p in paths],
        commit_message="Remove files of the model replaced by mint-mlx's upload",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mint_mlx.output.hub",
        description="Upload a converted model directory to the Hugging Face hub (re-run to resume).",
    )
    p.add_argument("directory", help="output directory of python -m mint_mlx.convert")
    p.add_argument("--repo", required=True, help="hub repo to create or update: ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--quiet", action="store_true", help="no progress report for large uploads")
    p.add_argument(
        "--overwrite-repo",
        action="store_true",
        help="replace a different model the repo already holds (its other files are deleted)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reported("interrupted; re-run the same command to resume the upload") as outcome:
        url = upload(
            args.directory,
            args.repo,
            private=args.private,
            progress=not args.quiet,
            overwrite=args.overwrite_repo,
        )
    if outcome.exit_code is not None:
        return outcome.exit_code
    print(f"uploaded {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
