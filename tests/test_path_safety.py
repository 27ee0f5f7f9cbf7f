"""Issue 21: no path arrangement lets a command write into, move or remove anything it reads,
and ``--force`` replaces only an earlier output.

Every check compares the source tree file by file (sha256 of each file, taken before and after
the run, independently of the code under test), so "refused" also means "nothing touched".
Conversions here use ``--objective nrmse --scales rtn``: the path rules do not depend on the
objective, and these take seconds on the tiny llama.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import mint_mlx.analysis.measure
import mint_mlx.convert
from mint_mlx import generate, path_safety, selftest
from mint_mlx.convert import convert, main
from mint_mlx.errors import MintError, OutputExistsError, PathConflictError
from mint_mlx.output.hub import check_uploadable
from mint_mlx.output.save import staging_dir
from mint_mlx.tools import evaluate, testbed
from mint_mlx.tools.baselines import build_baseline
from mint_mlx.tools.testbeds import build as testbed_build

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # keep ./.hypothesis out of the checkout
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "mint-mlx-hypothesis")

CHEAP = ["--objective", "nrmse", "--scales", "rtn", "--bpw", "4", "--quiet"]


def tree(root: Path) -> dict[str, str]:
    """Every file, folder and link under ``root`` (links not followed): sha256 of each file's
    bytes, a link's target, "dir" for folders."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def run(args: list[str]) -> tuple[int, str, str]:
    """The convert CLI, with its output captured (works inside hypothesis examples too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except KeyboardInterrupt:  # escaping Ctrl-C would end the whole pytest session
            pytest.fail("KeyboardInterrupt escaped the CLI")
    return code, out.getvalue(), err.getvalue()


def one_line(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def leftovers(root: Path) -> list[str]:
    """Temporary or half-replaced directories anywhere under ``root``."""
    return [
        str(p)
        for p in root.rglob("*")
        if path_safety.TMP_MARKER in p.name or path_safety.OLD_MARKER in p.name
    ]


@pytest.fixture(scope="module")
def earlier(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished conversion: what ``--force`` may replace. Tests copy it."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    convert(tiny_llama, out, bpw=4.0, objective="nrmse", scales="rtn")
    return out


@pytest.fixture
def src(tiny_llama: Path, tmp_path: Path) -> Path:
    """A copy of the tiny llama two folders deep: tmp/outer/src."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "outer" / "src"))


# ------------------------------------------------------------------------ the cases


@pytest.mark.parametrize(
    ("target", "force", "relation"),
    [
        ("src", True, "is the source model"),  # replaced the 16-bit model with the quantized one
        ("src", False, "is the source model"),  # used to say "pass --force"
        ("outer", True, "contains the source model"),  # deleted the source inside it
        ("src/q", False, "lies inside the source model"),  # left a model inside the source
        ("link", True, "is the source model"),  # a symlink to the source
        ("link/q", False, "lies inside the source model"),
    ],
)
def test_output_may_not_overlap_the_source(
    src: Path, tmp_path: Path, target: str, force: bool, relation: str
) -> None:
    (tmp_path / "link").symlink_to(src)
    before = tree(tmp_path / "outer")
    out = {"src": src, "outer": src.parent, "src/q": src / "q"}.get(target, tmp_path / target)
    args = ["--hf-path", str(src), "--mlx-path", str(out), *CHEAP]
    code, _, err = run(args + (["--force"] if force else []))
    one_line(code, err, relation, str(src.resolve()), "--mlx-path")
    assert tree(tmp_path / "outer") == before


def test_source_given_through_a_symlink_is_still_protected(src: Path, tmp_path: Path) -> None:
    link = tmp_path / "via"
    link.symlink_to(src)
    before = tree(src)
    code, _, err = run(["--hf-path", str(link), "--mlx-path", str(src), "--force", *CHEAP])
    one_line(code, err, "is the source model")
    assert tree(src) == before


def test_hub_snapshot_blobs_are_protected(tiny_llama: Path, tmp_path: Path) -> None:
    """A hub snapshot's files are links into a blob store: the store is the source too."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(tiny_llama.iterdir()):
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (blobs / "mint_plan.json").write_text(
        "{}"
    )  # make it look like an output: only overlap stops it
    before = tree(tmp_path / "hub")
    code, _, err = run(["--hf-path", str(snapshot), "--mlx-path", str(blobs), "--force", *CHEAP])
    one_line(code, err, "contains the source file")
    assert tree(tmp_path / "hub") == before


def test_analysis_cache_may_not_be_written_into_the_source(src: Path, tmp_path: Path) -> None:
    before = tree(src)
    for cache, needle in (
        (src / "a.jsonl", "lies inside the source model"),
        (src / "model.safetensors", "lies inside the source model"),
        (src, "is the source model"),
    ):
        code, _, err = run(
            ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--analysis", str(cache)]
            + CHEAP
        )
        one_line(code, err, "--analysis", needle)
        assert tree(src) == before and not (tmp_path / "o").exists()


def test_cache_folder_may_not_lie_inside_the_source(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default analysis cache, Fisher weights and remembered hashes go to MINT_MLX_CACHE."""
    before = tree(src)
    monkeypatch.setenv("MINT_MLX_CACHE", str(src / "cache"))
    code, _, err = run(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), *CHEAP])
    one_line(code, err, "MINT_MLX_CACHE", "lies inside the source model")
    assert tree(src) == before


def test_analysis_cache_may_not_be_the_calibration_text(src: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox. " * 50)
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    args = ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4", "--quiet"]
    code, _, err = run(args + ["--calibration", str(text), "--analysis", str(text)])
    one_line(code, err, "--analysis", "is the calibration file")
    assert hashlib.sha256(text.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("kept", ["calibration", "analysis"])
def test_force_never_removes_the_calibration_or_analysis_file(
    src: Path, earlier: Path, tmp_path: Path, kept: str
) -> None:
    """An earlier output that now holds a file the run reads is not replaced."""
    out = Path(shutil.copytree(earlier, tmp_path / "out"))
    inside = out / ("calib.txt" if kept == "calibration" else "a.jsonl")
    inside.write_text("The quick brown fox. " * 50 if kept == "calibration" else "")
    before = tree(out)
    flag = ["--calibration", str(inside)] if kept == "calibration" else ["--analysis", str(inside)]
    code, _, err = run(["--hf-path", str(src), "--mlx-path", str(out), "--force", *flag, *CHEAP])
    one_line(code, err, f"contains the {kept}")
    assert tree(out) == before


@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_a_file_is_never_replaced(src: Path, tmp_path: Path, force: bool) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = run(
        ["--hf-path", str(src), "--mlx-path", str(out), *CHEAP] + (["--force"] if force else [])
    )
    one_line(code, err, "is a file")
    assert [p.name for p in tmp_path.iterdir() if p.name != "outer"] == ["notes.txt"]
    assert out.read_text() == "mine"


def test_force_replaces_only_an_earlier_output(src: Path, earlier: Path, tmp_path: Path) -> None:
    """A 16-bit model (some run's source) and an output the user filed things in are refused;
    an earlier output is replaced and the CLI says so."""
    other = Path(shutil.copytree(src, tmp_path / "other-16-bit"))
    sub = Path(shutil.copytree(earlier, tmp_path / "filed"))
    (sub / "notes").mkdir()
    (sub / "notes" / "n.txt").write_text("mine")
    for out, needle in ((other, "holds config.json"), (sub, "also holds the folder notes")):
        before = tree(out)
        code, _, err = run(["--hf-path", str(src), "--mlx-path", str(out), "--force", *CHEAP])
        one_line(code, err, needle, "--force replaces only an earlier output")
        assert tree(out) == before
    out = Path(shutil.copytree(earlier, tmp_path / "prev"))
    (out / ".cache" / "huggingface").mkdir(parents=True)  # upload state: still an output
    code, text, err = run(["--hf-path", str(src), "--mlx-path", str(out), "--force", *CHEAP])
    assert code == 0, err
    assert f"replaced {out} (a mint-mlx output, as --force asked)" in text
    check_uploadable(out)
    assert leftovers(tmp_path) == []


def test_spaces_and_non_ascii_names(src: Path, tmp_path: Path) -> None:
    base = tmp_path / "a folder ü" / "模型 dir"
    moved = Path(shutil.copytree(src, base / "source model é"))
    out = base / "out put ☃"
    code, text, err = run(["--hf-path", str(moved), "--mlx-path", str(out), *CHEAP])
    assert code == 0, err and f"saved {out}" in text
    check_uploadable(out)
    code, _, err = run(["--hf-path", str(moved), "--mlx-path", str(moved / "x y"), *CHEAP])
    one_line(code, err, "lies inside the source model", str(moved))


# ------------------------------------------------------------------------ the property


LAYOUTS = ["same", "parent", "grandparent", "child", "grandchild", "sibling", "earlier", "mine"]
NAMES = ["m", "model dir", "ü-模型"]


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    layout=st.sampled_from(LAYOUTS),
    out_link=st.booleans(),
    src_link=st.booleans(),
    force=st.booleans(),
    name=st.sampled_from(NAMES),
)
@example(layout="same", out_link=False, src_link=False, force=True, name="m")
@example(layout="parent", out_link=False, src_link=False, force=True, name="m")
@example(layout="child", out_link=False, src_link=False, force=False, name="m")
@example(layout="grandparent", out_link=True, src_link=True, force=True, name="model dir")
@example(layout="sibling", out_link=True, src_link=True, force=False, name="ü-模型")
@example(layout="earlier", out_link=False, src_link=True, force=True, name="model dir")
def test_no_path_arrangement_touches_the_source(
    tiny_llama: Path,
    earlier: Path,
    tmp_path_factory: pytest.TempPathFactory,
    layout: str,
    out_link: bool,
    src_link: bool,
    force: bool,
    name: str,
) -> None:
    """Whatever the arrangement of --hf-path and --mlx-path (the same folder, one inside the
    other, siblings, either reached through a symlink), the run exits 0 or 2 and every file of
    the source tree is byte-identical afterwards; so is a folder of the user's files."""
    base = tmp_path_factory.mktemp("arrangement")
    src = Path(shutil.copytree(tiny_llama, base / "outer" / name / "src"))
    mine = src.parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    shutil.copytree(earlier, src.parent / "earlier")
    target = {
        "same": src,
        "parent": src.parent,
        "grandparent": src.parent.parent,
        "child": src / "q",
        "grandchild": src / "q" / "r",
        "sibling": src.parent / "new",
        "earlier": src.parent / "earlier",
        "mine": mine,
    }[layout]
    if out_link:
        (base / "out-link").symlink_to(target)
        target = base / "out-link"
    hf_path = src
    if src_link:
        (base / "src-link").symlink_to(src)
        hf_path = base / "src-link"
    before, mine_before = tree(src), tree(mine)
    code, _, err = run(
        ["--hf-path", str(hf_path), "--mlx-path", str(target), *CHEAP]
        + (["--force"] if force else [])
    )
    assert code in (0, 2), err
    assert tree(src) == before
    assert tree(mine) == mine_before
    assert leftovers(base) == []
    if code == 0:
        assert layout == "sibling" or (layout == "earlier" and force), layout
        check_uploadable(target)
    else:
        one_line(code, err)


# ------------------------------------------------------------------------ two runs at once


def _writer(
    out: Path,
    force: bool,
    who: str,
    barrier: threading.Barrier,
    results: dict[str, BaseException | None],
) -> None:
    """One run writing ``out``: five shards and a plan, each holding ``who``."""
    try:
        with staging_dir(out, force) as tmp:
            for i in range(5):
                (tmp / f"model-{i}.safetensors").write_text(who)
            (tmp / "mint_plan.json").write_text(who)
            barrier.wait()  # both leave the block, and publish, at the same moment
        results[who] = None
    except BaseException as e:  # noqa: BLE001 - recorded for the asserts
        results[who] = e


@pytest.mark.parametrize("force", [False, True])
def test_two_runs_publishing_one_output_at_once(tmp_path: Path, force: bool) -> None:
    """Two writers publish at the same moment: one complete output, never a mix; the loser
    without --force fails with one line; with --force both succeed in turn."""
    for round_ in range(8):
        out = tmp_path / f"out{round_}"
        barrier = threading.Barrier(2)
        results: dict[str, BaseException | None] = {}
        threads = [
            threading.Thread(target=_writer, args=(out, force, who, barrier, results))
            for who in "AB"
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        contents = {f.read_text() for f in out.iterdir()}
        assert len(contents) == 1, contents  # every file from one writer
        assert len(list(out.iterdir())) == 6
        failed = [e for e in results.values() if e is not None]
        if force:
            assert failed == []
        else:
            assert len(failed) == 1 and isinstance(failed[0], OutputExistsError), failed
            assert "another run" in str(failed[0]) and "\n" not in str(failed[0])
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_output_written_by_another_run_meanwhile(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """Run B converts into the same path while run A is saving: A then refuses (or, with
    --force, replaces B's output whole)."""
    out = tmp_path / "o"
    real_verify = mint_mlx.convert.verify_saved
    state = {"nested": False, "b_tree": {}}

    def meanwhile(directory: Path, plan) -> None:
        real_verify(directory, plan)
        if not state["nested"]:
            state["nested"] = True
            convert(src, out, bpw=5.0, objective="nrmse", scales="rtn")  # run B, finished
            state["b_tree"] = tree(out)

    monkeypatch.setattr(mint_mlx.convert, "verify_saved", meanwhile)
    args = ["--hf-path", str(src), "--mlx-path", str(out), *CHEAP]
    code, _, err = run(args + (["--force"] if force else []))
    assert state["nested"]
    if force:
        assert code == 0, err
        assert tree(out) != state["b_tree"]  # A's output, whole (B's bpw differs)
    else:
        one_line(code, err, "another run", "--force")
        assert tree(out) == state["b_tree"]  # B's output, untouched
    check_uploadable(out)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------ Ctrl-C, unwritable


def test_ctrl_c_between_the_two_renames_of_a_replacement(
    src: Path, earlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after the old output was moved aside: the swap still completes (never
    neither output), and the CLI says the output is saved."""
    out = Path(shutil.copytree(earlier, tmp_path / "o"))
    real_replace = os.replace
    calls: list[str] = []

    def replace(a, b) -> None:  # type: ignore[no-untyped-def]
        real_replace(a, b)
        calls.append(Path(a).name)
        if Path(a) == out.resolve():  # the old output moved aside: now Ctrl-C
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run(["--hf-path", str(src), "--mlx-path", str(out), "--force", *CHEAP])
    one_line(code, err, "interrupted", "saved complete")
    assert "o" in calls
    check_uploadable(out)
    assert leftovers(tmp_path) == []


def test_unwritable_output_location_is_refused_before_any_work(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied")

    analyzed: list[str] = []
    monkeypatch.setattr(
        mint_mlx.analysis.measure, "analyze_tensor", lambda *a, **k: analyzed.append("x")
    )
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    code, _, err = run(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), *CHEAP])
    one_line(code, err, "cannot write --mlx-path", "permission denied")
    assert analyzed == [] and not (tmp_path / "o").exists()


def test_read_only_output_found_while_saving_is_one_line(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The up-front probe passed, then the file system turned read-only (a remount)."""

    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, _, err = run(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), *CHEAP])
    one_line(code, err, "cannot write --mlx-path", "read-only file system")


def test_full_disk_while_writing_the_analysis_cache(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", full)
    cache = tmp_path / "a.jsonl"
    code, _, err = run(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--analysis", str(cache)] + CHEAP
    )
    one_line(code, err, "no space left", "analysis cache")


# ------------------------------------------------------------------------ the other commands


def test_plan_writes_neither_plot_nor_cache_into_the_source(src: Path) -> None:
    from mint_mlx.plan import main as plan_main

    before = tree(src)
    for flag, path in (("--png", src / "config.json"), ("--analysis", src / "a.jsonl")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = plan_main(
                ["--hf-path", str(src), flag, str(path), "--objective", "nrmse", "--quiet"]
            )
        one_line(code, err.getvalue(), flag, "lies inside the source model")
        assert tree(src) == before


def test_plan_png_in_a_missing_folder_is_one_line(src: Path, tmp_path: Path) -> None:
    from mint_mlx.plan import main as plan_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = plan_main(
            ["--hf-path", str(src), "--png", str(tmp_path / "no" / "such" / "c.png")]
            + ["--objective", "nrmse", "--quiet", "--budgets", "200KB"]
        )
    one_line(code, err.getvalue(), "cannot write --png", "No such file or directory")


def test_evaluate_cache_dir_that_cannot_be_written(
    earlier: Path, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied")

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = evaluate.main(
            ["--model", str(earlier), "--model", str(earlier), "--reference", str(tiny_llama)]
            + ["--text", str(text), "--cache-dir", str(tmp_path / "cache")]
        )
    one_line(code, err.getvalue(), "cannot write --cache-dir", "permission denied")
    assert not (tmp_path / "cache").exists()


def test_evaluate_cache_dir_may_not_be_inside_a_model(
    earlier: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    q = Path(shutil.copytree(earlier, tmp_path / "q"))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    before = tree(q)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = evaluate.main(
            ["--model", str(q), "--model", str(q), "--reference", str(tiny_llama)]
            + ["--text", str(text), "--tokens", "64", "--seq-len", "32", "--cache-dir", str(q)]
        )
    one_line(code, err.getvalue(), "--cache-dir", "is the model")
    assert tree(q) == before


def test_baseline_never_replaces_its_source(src: Path) -> None:
    before = tree(src)
    with pytest.raises(PathConflictError, match="is the source model"):
        build_baseline(src, src, "affine-4-g64", force=True)
    assert tree(src) == before


def _fake_builder(content: str, fail: bool = False):  # type: ignore[no-untyped-def]
    def build(out: Path) -> None:
        (out / "manifest.json").write_text(content)
        if fail:
            raise MintError("build failed; fix it")

    return lambda name, progress, **kw: build


def _testbed_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = testbed.main(args)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped the CLI")
    return code, err.getvalue()


def test_testbed_out_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--force replaces only an earlier testbed, only once the new one is complete, and never
    the folders a build reads; nothing is downloaded before the paths pass."""
    monkeypatch.setattr(testbed_build, "builder_for", _fake_builder('{"files": {}}'))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, err = _testbed_cli(["wiki-text", "--out", str(mine), "--force"])
    one_line(code, err, "not an earlier output", "notes.txt")
    assert (mine / "notes.txt").read_text() == "mine"
    sources = testbed_build.cache_root() / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    (sources / "wiki.bz2").write_text("downloaded")
    code, err = _testbed_cli(["wiki-text", "--out", str(sources.parent), "--force"])
    one_line(code, err, "contains the downloaded wheels")
    assert (sources / "wiki.bz2").read_text() == "downloaded"
    # an earlier testbed survives a failed rebuild, and is replaced by a finished one
    old = tmp_path / "wiki"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    monkeypatch.setattr(testbed_build, "builder_for", _fake_builder("new", fail=True))
    code, err = _testbed_cli(["wiki-text", "--out", str(old), "--force"])
    one_line(code, err, "build failed")
    assert (old / "manifest.json").read_text() == "old"
    monkeypatch.setattr(testbed_build, "builder_for", _fake_builder('{"files": {}}'))
    code, err = _testbed_cli(["wiki-text", "--out", str(old), "--force"])
    assert code == 0, err
    assert (old / "manifest.json").read_text() == '{"files": {}}'
    assert leftovers(tmp_path) == []


def test_two_processes_building_one_cached_testbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_testbed in two runs at once: the one that finishes second uses the first one's
    testbed instead of failing (the swap refuses to replace it without --force)."""
    calls: list[str] = []

    def build(out: Path) -> None:
        calls.append("build")
        number = len(calls)
        if number == 1:  # the other run builds and publishes while this one works
            testbed_build.ensure_testbed("wiki-text")
        (out / "manifest.json").write_text(f"build {number}")

    # a fresh cache: a testbed an earlier test built there would be reused without a build
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(testbed_build, "builder_for", lambda name, progress, **kw: build)
    path = testbed_build.ensure_testbed("wiki-text")
    assert calls == ["build", "build"]
    assert (path / "manifest.json").read_text() == "build 2"  # the one finished first, kept
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("command", ["evaluate", "generate", "selftest", "testbed"])
def test_ctrl_c_is_one_line_in_every_command(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    text = tmp_path / "t.txt"
    text.write_text("hello")
    if command == "evaluate":
        monkeypatch.setattr(evaluate, "evaluate", interrupted)
        call = lambda: evaluate.main(["--model", "m", "--text", str(text)])  # noqa: E731
    elif command == "generate":
        import importlib

        # the module: the package attribute ``mlx_lm.generate`` is the function
        monkeypatch.setattr(importlib.import_module("mlx_lm.generate"), "main", interrupted)
        call = lambda: generate.main(["--model", "m"])  # noqa: E731
    elif command == "selftest":
        import mint_mlx.tools.emulator.emulate

        monkeypatch.setattr(mint_mlx.tools.emulator.emulate, "find_compiler", lambda: "g++")
        monkeypatch.setattr(selftest, "emulation_cases", interrupted)
        monkeypatch.setattr(selftest, "metal_cases", interrupted)
        call = lambda: selftest.main(["--quick", "--emulate"])  # noqa: E731
    else:
        monkeypatch.setattr(testbed_build, "build_atomically", interrupted)
        call = lambda: testbed.main(["wiki-text", "--out", str(tmp_path / "w")])  # noqa: E731
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = call()
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped the CLI")
    one_line(code, err.getvalue(), "interrupted")


# ------------------------------------------------------------------------ the rule itself


def test_relation_resolves_symlinks(tmp_path: Path) -> None:
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    (tmp_path / "l").symlink_to(a)
    assert path_safety.relation(tmp_path / "l", a) == "is"
    assert path_safety.relation(tmp_path, tmp_path / "l" / "b") == "contains"
    assert path_safety.relation(tmp_path / "l" / "b" / "new", a) == "lies inside"
    assert path_safety.relation(tmp_path / "a2", a) is None  # a prefix is not a parent
    assert path_safety.relation(tmp_path / "a" / ".." / "a", a) == "is"
