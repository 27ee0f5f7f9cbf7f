"""Hub upload: retries, resumable large uploads, refusal of broken output (no network needed).

The hub is unreachable here, so most tests stand in for ``HfApi`` with a recording fake that
raises the installed huggingface_hub's real exception classes. The ``local_hub`` tests go one
step further: the real ``HfApi`` talks HTTP to a local server that answers like a failing hub,
so the classification is checked against the errors huggingface_hub itself builds.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest
import requests
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from mint_mlx.convert import convert
from mint_mlx.errors import HubError
from mint_mlx.output import hub

REPO = "me/tiny-mint"


def http_error(
    status: int, cls: type[HfHubHTTPError] = HfHubHTTPError, **headers: str
) -> Exception:
    """The error huggingface_hub raises for an HTTP ``status`` answer."""
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    response = httpx2.Response(status, request=request, headers=headers)
    return cls(
        f"{status} error for url {request.url}\nserver text on a second line", response=response
    )


class FakeApi:
    """Records every hub call; ``failures[method]`` lists exceptions to raise, in order;
    ``remote`` is what the repo holds (``RepoFile`` entries, listed by ``list_repo_tree``)."""

    def __init__(
        self, failures: dict[str, list[Exception]] | None = None, remote: list[Any] | None = None
    ):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.failures = failures or {}
        self.remote = remote or []

    def _call(self, method: str, kw: dict[str, Any]) -> Any:
        self.calls.append((method, kw))
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)
        return f"https://huggingface.co/{kw['repo_id']}" if method == "create_repo" else None

    def create_repo(self, **kw: Any) -> Any:
        return self._call("create_repo", kw)

    def upload_folder(self, **kw: Any) -> Any:
        return self._call("upload_folder", kw)

    def upload_large_folder(self, **kw: Any) -> Any:
        return self._call("upload_large_folder", kw)

    def list_repo_tree(self, **kw: Any) -> Any:
        self._call("list_repo_tree", kw)
        return iter(self.remote)

    def create_commit(self, **kw: Any) -> Any:
        return self._call("create_commit", kw)

    @property
    def methods(self) -> list[str]:
        return [c[0] for c in self.calls]


class NoLargeApi(FakeApi):
    """An ``HfApi`` of huggingface_hub >= 2 (``upload_folder`` resumes by itself)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "upload_large_folder":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """One finished conversion of the tiny llama; tests copy it before breaking anything."""
    base = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINT_MLX_CACHE", str(base / "cache"))
        convert(tiny_llama, base / "model", bpw=4.0, analysis=base / "analysis.json")
    return base / "model"


@pytest.fixture
def model_dir(converted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(converted, out)
    return out


def one_line_hub_error(excinfo: pytest.ExceptionInfo[HubError], *needles: str) -> str:
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 2
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# --- retries -----------------------------------------------------------------------------------

TRANSIENT: dict[str, Callable[[], Exception]] = {
    "http503": lambda: http_error(503),
    "http502": lambda: http_error(502),
    "http429": lambda: http_error(429),
    "http408": lambda: http_error(408),
    "httpx2-connect": lambda: httpx2.ConnectError("connection refused"),
    "httpx2-read-timeout": lambda: httpx2.ReadTimeout("timed out"),
    "requests-connection": lambda: requests.exceptions.ConnectionError("reset"),
    "requests-timeout": lambda: requests.exceptions.ReadTimeout("timed out"),
    "connection-reset": lambda: ConnectionResetError(104, "Connection reset by peer"),
    "timeout": lambda: TimeoutError("timed out"),
    "unreachable": lambda: OSError(101, "Network is unreachable"),
}


@pytest.mark.parametrize("kind", sorted(TRANSIENT))
def test_transient_failure_is_retried_with_growing_backoff(model_dir: Path, kind: str) -> None:
    api = FakeApi({"upload_folder": [TRANSIENT[kind](), TRANSIENT[kind]()]})
    sleeps: list[float] = []
    url = hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    assert url == f"https://huggingface.co/{REPO}"
    assert api.methods == ["create_repo", "list_repo_tree"] + ["upload_folder"] * 3
    assert sleeps == [hub.BACKOFF_S, 2 * hub.BACKOFF_S]


def test_create_repo_is_retried_too(model_dir: Path) -> None:
    api = FakeApi({"create_repo": [http_error(500)]})
    sleeps: list[float] = []
    hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    assert api.methods == ["create_repo", "create_repo", "list_repo_tree", "upload_folder"]
    assert sleeps == [hub.BACKOFF_S]


def test_rate_limit_waits_as_long_as_the_hub_asks(model_dir: Path) -> None:
    api = FakeApi({"upload_folder": [http_error(429, **{"Retry-After": "37"})]})
    sleeps: list[float] = []
    hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    assert sleeps == [37.0]


def test_gives_up_after_max_attempts_with_capped_backoff(model_dir: Path) -> None:
    api = FakeApi({"upload_folder": [http_error(503) for _ in range(10)]})
    sleeps: list[float] = []
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=sleeps.append, attempts=7, max_backoff_s=10.0)
    one_line_hub_error(excinfo, "after 7 attempts", "re-run", "python -m mint_mlx.output.hub", REPO)
    assert api.methods.count("upload_folder") == 7
    assert sleeps == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


PERMANENT: dict[str, tuple[Callable[[], Exception], str]] = {
    "401": (lambda: http_error(401), "hf auth login"),
    "403": (lambda: http_error(403), "write token"),
    "404": (lambda: http_error(404), "check the repo id"),
    "repo-not-found": (lambda: http_error(401, RepositoryNotFoundError), "hf auth login"),
    "no-token": (lambda: LocalTokenNotFoundError("no token"), "hf auth login"),
    "bad-repo-id": (lambda: HFValidationError("Repo id must be in the form"), "ORG/NAME"),
    "offline": (lambda: OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
    "http400": (lambda: http_error(400), "HfHubHTTPError"),
}


@pytest.mark.parametrize("kind", sorted(PERMANENT))
def test_permanent_failure_fails_at_once(model_dir: Path, kind: str) -> None:
    make, fix = PERMANENT[kind]
    api = FakeApi({"create_repo": [make()]})
    sleeps: list[float] = []
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    one_line_hub_error(excinfo, fix, REPO, "re-run")
    assert api.methods == ["create_repo"]  # no retry, and nothing uploaded
    assert sleeps == []


# --- large folders -----------------------------------------------------------------------------


def test_small_folder_uses_upload_folder(model_dir: Path) -> None:
    api = FakeApi()
    hub.upload(model_dir, REPO, private=True, api=api, sleep=lambda s: None)
    assert api.methods == ["create_repo", "list_repo_tree", "upload_folder"]
    create, _, up = (c[1] for c in api.calls)
    assert create == {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True}
    assert up["folder_path"] == str(model_dir) and up["repo_type"] == "model"


@pytest.mark.parametrize("limit", ["bytes", "files"])
def test_large_folder_uses_resumable_upload(model_dir: Path, limit: str) -> None:
    nbytes, nfiles = hub.folder_size(model_dir)
    caps = {"large_bytes": nbytes - 1} if limit == "bytes" else {"large_files": nfiles - 1}
    api = FakeApi({"upload_large_folder": [httpx2.RemoteProtocolError("peer closed")]})
    sleeps: list[float] = []
    hub.upload(model_dir, REPO, private=True, api=api, sleep=sleeps.append, **caps)  # type: ignore[arg-type]
    assert api.methods == [
        "create_repo",
        "list_repo_tree",
        "upload_large_folder",
        "upload_large_folder",
    ]
    kw = api.calls[-1][1]
    assert kw["folder_path"] == str(model_dir) and kw["repo_id"] == REPO
    assert kw["repo_type"] == "model" and kw["private"] is True
    assert sleeps == [hub.BACKOFF_S]  # a dropped large upload is re-run: it resumes


def test_large_folder_on_hub_client_without_upload_large_folder(model_dir: Path) -> None:
    api = NoLargeApi()
    hub.upload(model_dir, REPO, api=api, large_bytes=0, sleep=lambda s: None)
    assert api.methods == ["create_repo", "list_repo_tree", "upload_folder"]


def test_upload_state_dir_is_neither_counted_nor_refused(model_dir: Path) -> None:
    before = hub.folder_size(model_dir)
    state = model_dir / hub.UPLOAD_STATE_DIR / "upload"
    state.mkdir(parents=True)
    (state / "model.safetensors.metadata").write_text("x" * 10_000)
    (state / "model.safetensors.lock").write_text("")
    assert hub.folder_size(model_dir) == before
    hub.check_uploadable(model_dir)


# --- refusing broken output --------------------------------------------------------------------


def _truncate_shard(d: Path) -> str:
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return "model.safetensors"


def _missing_shard(d: Path) -> str:
    (d / "model.safetensors").unlink()
    return "model.safetensors"


def _missing_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "config.json"


def _garbled_config(d: Path) -> str:
    (d / "config.json").write_text('{"model_type": "llama", ')
    return "config.json"


def _corrupt_header(d: Path) -> str:
    shard = d / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    return "model.safetensors"


def _grown_shard(d: Path) -> str:
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    return "model.safetensors"


def _plan_disagrees(d: Path) -> str:
    plan = json.loads((d / "mint_plan.json").read_text())
    plan["total_bytes"] += 8  # e.g. a shard swapped for one from another conversion
    (d / "mint_plan.json").write_text(json.dumps(plan))
    return "mint_plan.json"


def _stray_shard(d: Path) -> str:
    shutil.copy(d / "model.safetensors", d / "model-00002-of-00002.safetensors")
    return "model-00002-of-00002.safetensors"


def _index_lists_unknown_tensor(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.9.mlp.up_proj.weight"


def _quantized_without_scales(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    module = (
        "model.layers.0.input_layernorm"  # a norm: mlx-lm would look for scales that are not there
    )
    config["quantization"][module] = {"group_size": 64, "bits": 4, "mode": "affine"}
    (d / "config.json").write_text(json.dumps(config))
    return module


def _scales_but_16_bit(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    module = next(k for k, v in config["quantization"].items() if isinstance(v, dict))
    config["quantization"][module] = False
    (d / "config.json").write_text(json.dumps(config))
    return module


def _missing_card(d: Path) -> str:
    (d / "README.md").unlink()
    return "README.md"


BREAKAGES: dict[str, Callable[[Path], str]] = {
    "truncated-shard": _truncate_shard,
    "missing-shard": _missing_shard,
    "missing-config": _missing_config,
    "garbled-config": _garbled_config,
    "corrupt-header": _corrupt_header,
    "grown-shard": _grown_shard,
    "plan-disagrees": _plan_disagrees,
    "stray-shard": _stray_shard,
    "index-lists-unknown-tensor": _index_lists_unknown_tensor,
    "quantized-without-scales": _quantized_without_scales,
    "scales-but-16-bit": _scales_but_16_bit,
    "missing-card": _missing_card,
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_output_is_refused_before_any_hub_call(model_dir: Path, breakage: str) -> None:
    hub.check_uploadable(model_dir)  # intact first: the breakage below is what gets refused
    culprit = BREAKAGES[breakage](model_dir)
    api = FakeApi()
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=lambda s: None)
    one_line_hub_error(excinfo, culprit, "re-run the conversion")
    assert api.calls == []


def test_staging_directories_are_refused(model_dir: Path) -> None:
    tmp = model_dir.parent / f".{model_dir.name}.mint-tmp-abc123"
    shutil.copytree(model_dir, tmp)
    with pytest.raises(HubError) as excinfo:
        hub.check_uploadable(tmp)
    one_line_hub_error(excinfo, "temporary directory", "re-run the conversion")
    # ... and while one sits next to the output, a conversion into it is running or was killed
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=FakeApi(), sleep=lambda s: None)
    one_line_hub_error(excinfo, tmp.name)


def test_plain_model_directory_is_uploadable(tiny_llama: Path) -> None:
    hub.check_uploadable(tiny_llama)  # no quantization, no plan, no index: still a model


# --- a repo that already holds a model (issue 21) ----------------------------------------------


def git_blob_id(path: Path) -> str:
    """The git object id the hub lists for a non-LFS file, computed by git itself."""
    return subprocess.run(
        ["git", "hash-object", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def tree_entry(name: str, data_path: Path) -> dict[str, Any]:
    """One file as the hub's tree API lists it: ``.safetensors`` through LFS (sha256)."""
    size = data_path.stat().st_size
    entry: dict[str, Any] = {"type": "file", "path": name, "size": size}
    entry["oid"] = git_blob_id(data_path)
    if name.endswith(".safetensors"):
        sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
        entry["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
    return entry


def remote_copy(directory: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The tree of a repo holding ``names`` of ``directory`` (default: all), byte for byte."""
    names = names or sorted(p.name for p in directory.iterdir() if p.is_file())
    return [tree_entry(n, directory / n) for n in names]


def repo_files(tree: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub.hf_api import RepoFile

    return [RepoFile(**{k: v for k, v in e.items() if k != "type"}) for e in tree]


def _other_config(d: Path, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    other = tmp / "config.json"
    other.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    tree = [e for e in remote_copy(d) if e["path"] != "config.json"]
    return [*tree, tree_entry("config.json", other)], "config.json"


def _other_shard_same_size(d: Path, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    shard = sorted(d.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    (tmp / shard.name).write_bytes(bytes(data))
    tree = [e for e in remote_copy(d) if e["path"] != shard.name]
    return [*tree, tree_entry(shard.name, tmp / shard.name)], shard.name


def _extra_shard(d: Path, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    extra = tmp / "model-00002-of-00002.safetensors"
    shutil.copy(sorted(d.glob("*.safetensors"))[0], extra)
    return [*remote_copy(d), tree_entry(extra.name, extra)], extra.name


def _sixteen_bit_model(d: Path, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    return remote_copy(tmp / "tiny16"), "config.json"  # the tiny llama's own files


OTHER_MODELS = {
    "other-config": _other_config,
    "other-shard-same-size": _other_shard_same_size,
    "extra-shard": _extra_shard,
    "sixteen-bit-model": _sixteen_bit_model,
}


@pytest.mark.parametrize("case", sorted(OTHER_MODELS))
def test_repo_holding_another_model_is_refused_without_overwrite(
    model_dir: Path, tiny_llama: Path, tmp_path: Path, case: str
) -> None:
    shutil.copytree(tiny_llama, tmp_path / "tiny16")
    tree, culprit = OTHER_MODELS[case](model_dir, tmp_path)
    api = FakeApi(
        remote=repo_files(
            [{"type": "file", "path": ".gitattributes", "size": 1, "oid": "0" * 40}, *tree]
        )
    )
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=lambda s: None)
    one_line_hub_error(excinfo, "already holds a different model", culprit, "--overwrite-repo")
    assert "upload_folder" not in api.methods and "create_commit" not in api.methods


@pytest.mark.parametrize("held", ["nothing", "the same model", "part of it (interrupted)"])
def test_same_model_or_an_interrupted_upload_goes_ahead(model_dir: Path, held: str) -> None:
    tree = [{"type": "file", "path": ".gitattributes", "size": 1, "oid": "0" * 40}]
    if held == "the same model":
        tree += remote_copy(model_dir)
    elif held == "part of it (interrupted)":
        tree += remote_copy(
            model_dir, ["config.json", sorted(model_dir.glob("*.safetensors"))[0].name]
        )
    api = FakeApi(remote=repo_files(tree))
    hub.upload(model_dir, REPO, api=api, sleep=lambda s: None)
    assert api.methods == ["create_repo", "list_repo_tree", "upload_folder"]
    assert "delete_patterns" not in api.calls[-1][1]


def test_overwrite_replaces_the_other_model_entirely(model_dir: Path, tmp_path: Path) -> None:
    """With --overwrite-repo the old model's files that ours lacks go in the same commit: the
    repo never holds a mix. .gitattributes stays."""
    from huggingface_hub.utils import filter_repo_objects

    tree, _ = _extra_shard(model_dir, tmp_path)
    extra = tmp_path / "old figure [1].png"
    extra.write_bytes(b"png")
    tree += [tree_entry(extra.name, extra)]
    tree += [{"type": "file", "path": ".gitattributes", "size": 1, "oid": "0" * 40}]
    api = FakeApi(remote=repo_files(tree))
    hub.upload(model_dir, REPO, api=api, sleep=lambda s: None, overwrite=True)
    assert api.methods == ["create_repo", "list_repo_tree", "upload_folder"]
    patterns = api.calls[-1][1]["delete_patterns"]
    # what huggingface_hub itself deletes with these patterns: exactly the stale files
    deleted = set(filter_repo_objects([e["path"] for e in tree], allow_patterns=patterns))
    assert deleted == {"model-00002-of-00002.safetensors", "old figure [1].png"}


def test_overwrite_on_the_large_folder_path_deletes_stale_files(
    model_dir: Path, tmp_path: Path
) -> None:
    tree, extra = _extra_shard(model_dir, tmp_path)
    api = FakeApi(remote=repo_files(tree))
    hub.upload(model_dir, REPO, api=api, sleep=lambda s: None, overwrite=True, large_bytes=0)
    assert api.methods == ["create_repo", "list_repo_tree", "upload_large_folder", "create_commit"]
    ops = api.calls[-1][1]["operations"]
    assert [op.path_in_repo for op in ops] == [extra]


def test_cli_overwrite_repo_flag(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub

    tree, _ = _other_config(model_dir, tmp_path)
    api = FakeApi(remote=repo_files(tree))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    assert hub.main([str(model_dir), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite-repo" in err
    assert hub.main([str(model_dir), "--repo", REPO, "--overwrite-repo"]) == 0
    assert api.methods[-1] == "upload_folder"


def test_rerun_command_quotes_a_path_with_spaces(converted: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(converted, tmp_path / "my model ü"))
    api = FakeApi({"create_repo": [http_error(401)]})
    with pytest.raises(HubError) as excinfo:
        hub.upload(d, REPO, api=api, sleep=lambda s: None)
    one_line_hub_error(
        excinfo, f"python -m mint_mlx.output.hub {shlex.quote(str(d))} --repo {REPO}"
    )


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_uploads_and_prints_url(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeApi()
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    code = hub.main([str(model_dir), "--repo", REPO, "--private"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"uploaded https://huggingface.co/{REPO}"
    assert api.methods == ["create_repo", "list_repo_tree", "upload_folder"]
    assert api.calls[0][1]["private"]


def test_cli_error_is_one_line_exit_2(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeApi({"create_repo": [http_error(401)]})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    code = hub.main([str(model_dir), "--repo", REPO])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "hf auth login" in err
    _missing_shard(model_dir)
    assert hub.main([str(model_dir), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err


# --- the real HfApi against a local server that answers like a failing hub ---------------------


class LocalHub:
    """A tiny HTTP server: each POST gets the next status from ``statuses`` (then 200)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.requests: list[str] = []
        self.gets: list[str] = []
        self.tree: list[dict[str, Any]] = []  # the repo's files, as the hub's tree API lists them
        hub_state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("content-length", 0)))
                hub_state.requests.append(self.path)
                status = hub_state.statuses.pop(0) if hub_state.statuses else 200
                body = {"url": f"{hub_state.endpoint}/{REPO}"} if status == 200 else {"error": "x"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the repo tree listing
                if "/tree/" not in self.path:
                    self.send_error(501)  # what the server answered before it listed trees
                    return
                hub_state.gets.append(self.path)
                data = json.dumps(hub_state.tree).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def api(self) -> Any:
        from huggingface_hub import HfApi

        class UploadRecorder(HfApi):  # real create_repo over HTTP; uploads only recorded
            uploads: list[dict[str, Any]] = []

            def upload_folder(self, **kw: Any) -> Any:
                self.uploads.append(kw)

        return UploadRecorder(endpoint=self.endpoint, token="hf_not_a_real_token")


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    from huggingface_hub import constants

    # CI may run with HF_HUB_OFFLINE=1; the local server is not the hub, so let requests out.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    server = LocalHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_real_hfapi_5xx_then_success(model_dir: Path, local_hub: LocalHub) -> None:
    local_hub.statuses = [503, 502]
    api = local_hub.api()
    sleeps: list[float] = []
    url = hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    assert url == f"{local_hub.endpoint}/{REPO}"
    assert local_hub.requests == ["/api/repos/create"] * 3
    assert sleeps == [hub.BACKOFF_S, 2 * hub.BACKOFF_S]
    assert len(api.uploads) == 1


def test_real_hfapi_401_is_not_retried(model_dir: Path, local_hub: LocalHub) -> None:
    local_hub.statuses = [401]
    api = local_hub.api()
    sleeps: list[float] = []
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=sleeps.append)
    one_line_hub_error(excinfo, "hf auth login")
    assert local_hub.requests == ["/api/repos/create"] and sleeps == [] and api.uploads == []


def test_real_hfapi_lists_the_repo_and_refuses_another_model(
    model_dir: Path, local_hub: LocalHub, tmp_path: Path
) -> None:
    """The real client's listing (RepoFile from the hub's JSON: LFS sha256, git blob ids)."""
    api = local_hub.api()
    local_hub.tree, _ = _other_shard_same_size(model_dir, tmp_path)
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=lambda s: None)
    one_line_hub_error(excinfo, "already holds a different model")
    assert api.uploads == [] and len(local_hub.gets) == 1 and "/tree/" in local_hub.gets[0]
    local_hub.tree = remote_copy(model_dir)
    hub.upload(model_dir, REPO, api=api, sleep=lambda s: None)
    assert len(api.uploads) == 1


def test_real_hfapi_unreachable_hub_is_retried_then_explained(
    model_dir: Path, local_hub: LocalHub
) -> None:
    api = local_hub.api()
    local_hub.server.shutdown()
    local_hub.server.server_close()  # nothing listens on the port any more: connection refused
    sleeps: list[float] = []
    with pytest.raises(HubError) as excinfo:
        hub.upload(model_dir, REPO, api=api, sleep=sleeps.append, attempts=3)
    one_line_hub_error(excinfo, "after 3 attempts", "ConnectError", "network")
    assert sleeps == [hub.BACKOFF_S, 2 * hub.BACKOFF_S]
