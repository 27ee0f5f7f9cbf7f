"""End-to-end conversion of tiny real mlx-lm models: budgets, stock loading, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mint_mlx.analysis.measure
import mint_mlx.safetensors_io
from mint_mlx.allocation.allocate import Plan
from mint_mlx.convert import convert, main
from mint_mlx.errors import BudgetError
from mint_mlx.formats import format_by_name
from mint_mlx.sizes import parse_size

STOCK_LOAD = r"""
import sys, json
import mlx.core as mx
from mlx_lm import load, generate
model, tok = load(sys.argv[1])
logits = model(mx.array([tok.encode("The quick brown fox")]))
mx.eval(logits)
text = generate(model, tok, prompt="The history of", max_tokens=6)
print(json.dumps({
    "shape": list(logits.shape),
    "finite": bool(mx.all(mx.isfinite(logits)).item()),
    "text": text,
    "mint_imported": any(m.startswith("mint_mlx") for m in sys.modules),
}))
"""


def stock_load(path: Path) -> dict:
    """Load and run ``path`` in a fresh process that never imports mint_mlx."""
    out = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_moe"])
def test_convert_loads_in_stock_mlx_lm(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src = request.getfixturevalue(model)
    out = tmp_path / "out"
    result = convert(src, out, bpw=4.5)
    assert weight_bytes(out) == result.plan.total_bytes <= result.plan.budget
    info = stock_load(out)
    assert not info["mint_imported"]
    assert info["finite"]
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert info["shape"][0] == 1 and info["shape"][2] == vocab
    assert isinstance(info["text"], str) and info["text"]
    config = json.loads((out / "config.json").read_text())
    plan = Plan.load(out / "mint_plan.json")
    # every planned module has an explicit per-layer entry that matches the plan
    for a in plan.assignments:
        assert config["quantization"][a.path] == format_by_name(a.format).quantization_entry()
    assert config["quantization_config"] == config["quantization"]
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()


def test_moe_router_stays_high_precision(tiny_moe: Path, tmp_path: Path) -> None:
    plan = convert(tiny_moe, tmp_path / "o", bpw=3.5, dry_run=True).plan
    routers = [a for a in plan.assignments if a.role == "router"]
    assert routers and all(a.format == "affine-8-g64" and a.fixed for a in routers)
    experts = [a for a in plan.assignments if "switch_mlp" in a.path]
    assert experts and all(len(a.shape) == 3 for a in experts)


def test_budget_sweep_fits_and_distortion_is_monotone(deep_llama: Path, tmp_path: Path) -> None:
    tiny_llama = deep_llama
    cache = tmp_path / "analysis.jsonl"
    low = None
    try:
        convert(tiny_llama, tmp_path / "x", budget=1000, analysis=cache, dry_run=True)
    except BudgetError as e:
        low = int(str(e).split("(")[1].split(" bytes")[0])
    assert low is not None
    full = convert(tiny_llama, tmp_path / "x", budget="1GB", analysis=cache, dry_run=True).plan
    high = full.total_bytes
    previous = float("inf")
    budgets = [low + (high - low) * k // 12 for k in range(13)]
    for k, budget in enumerate(budgets):
        plan = convert(tiny_llama, tmp_path / "x", budget=budget, analysis=cache, dry_run=True).plan
        assert plan.total_bytes <= budget
        if 0 < k < 12:
            # Within 0.5% across the quantized range. Above ~8.5 bits per weight the only upgrades
            # left are 8-bit -> 16-bit of whole tensors, each ~1.5% of this tiny model's budget.
            fill = 0.995 if plan.bits_per_weight <= 8.5 else 0.99
            assert plan.total_bytes >= fill * budget, (budget, plan.total_bytes)
        assert plan.distortion <= previous + 1e-12
        previous = plan.distortion
    # the sweep's plans are real: save two of them and check the bytes on disk
    for budget in (budgets[3], budgets[8]):
        out = tmp_path / f"o{budget}"
        result = convert(tiny_llama, out, budget=budget, analysis=cache)
        assert weight_bytes(out) == result.plan.total_bytes <= budget


def test_analysis_cache_is_reused(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "a.jsonl"
    first = convert(tiny_llama, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True).plan
    assert not (tmp_path / "o").exists()  # dry run writes nothing but the cache
    assert cache.exists()

    def boom(*args, **kwargs):
        raise AssertionError("analysis should come from the cache")

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", boom)
    second = convert(tiny_llama, tmp_path / "o", bpw=5.0, analysis=cache, dry_run=True).plan
    assert second.total_bytes > first.total_bytes
    assert second.distortion < first.distortion


def test_interrupted_analysis_resumes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "a.jsonl"
    real = mint_mlx.analysis.measure.analyze_tensor
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True)
    assert len(cache.read_text().splitlines()) == 1 + 5
    calls["n"] = 100
    plan = convert(tiny_llama, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True).plan
    assert calls["n"] == 100 + len(plan.assignments) - 5


def test_dry_run_prints_plan(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        [
            "--hf-path",
            str(tiny_llama),
            "--mlx-path",
            str(tmp_path / "o"),
            "--bpw",
            "4.5",
            "--dry-run",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| configuration | tensors | % tensors | % parameters | bytes |" in out
    assert "of budget" in out and "bits per weight" in out and "predicted distortion" in out
    assert not (tmp_path / "o").exists()
    # each phase's wall time, and their total (a dry run stops after planning)
    times = re.search(
        r"^time: sensitivity ([\d.]+) s, analysis ([\d.]+) s, plan ([\d.]+) s "
        r"\(total ([\d.]+) s\)$",
        out,
        re.M,
    )
    assert times is not None, out
    parts = [float(x) for x in times.groups()]
    assert abs(sum(parts[:3]) - parts[3]) <= 0.15


def test_budget_above_16_bit_keeps_everything(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--budget", "1GB"], capsys
    )
    assert code == 0, err
    assert "every tensor stays in 16-bit" in out
    plan = Plan.load(tmp_path / "o" / "mint_plan.json")
    assert {a.format for a in plan.assignments} == {"fp16"}
    assert stock_load(tmp_path / "o")["finite"]


# ---- bad input: one line on stderr, exit code 2, no output directory ----


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"],
        capsys,
    )
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_offline_hub_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(
        ["--hf-path", "no-such-org/no-such-model", "--mlx-path", str(tmp_path / "o"), "--bpw", "4"],
        capsys,
    )
    assert_one_line_error(code, err, "no-such-org/no-such-model", "local HF-format directory")


def test_unsupported_architecture(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "weird"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "transmogrifier"
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "transmogrifier", "not supported")


def test_budget_too_small_states_minimum(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--budget", "10KB"],
        capsys,
    )
    assert_one_line_error(code, err, "smallest feasible size")
    minimum = err.split("smallest feasible size ")[1].split(" ")[0]
    err_bytes = err
    assert not (tmp_path / "o").exists()
    # the stated minimum really is enough
    code, _, err = run_cli(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--budget", minimum],
        capsys,
    )
    assert code == 0, err
    assert weight_bytes(tmp_path / "o") <= parse_size(minimum)
    # and the exact minimum in bytes is exact: it converts, one byte less does not
    exact = int(err_bytes.split("(")[1].split(" bytes")[0])
    dry = convert(tiny_llama, tmp_path / "x", budget=exact, dry_run=True).plan
    assert dry.total_bytes == exact
    with pytest.raises(BudgetError):
        convert(tiny_llama, tmp_path / "x", budget=exact - 1, dry_run=True)


def test_output_exists_without_force(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing output needs --force, and --force replaces only an earlier output: a
    directory of the user's files is refused with or without it (issue 21)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cheap = ["--objective", "nrmse", "--scales", "rtn"]
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4", *cheap]
    for force in ([], ["--force"]):
        code, _, err = run_cli([*args, *force], capsys)
        assert_one_line_error(code, err, "keep.txt", "not an earlier output", "--mlx-path")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, out_text, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    code, out_text, err = run_cli([*args, "--force"], capsys)  # an empty folder holds nothing
    assert code == 0, err
    assert f"replaced {out} (an empty directory, as --force asked)" in out_text
    code, _, err = run_cli(args, capsys)  # now an earlier output: needs --force
    assert_one_line_error(code, err, "already exists", "--force")
    code, out_text, err = run_cli([*args, "--force"], capsys)
    assert code == 0, err
    assert f"replaced {out} (a mint-mlx output, as --force asked)" in out_text
    assert (out / "config.json").exists() and (out / "mint_plan.json").exists()


def test_truncated_shard(
    tiny_moe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "broken"
    shutil.copytree(tiny_moe, src)
    shard = sorted(src.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, shard.name, "re-download")
    assert not (tmp_path / "o").exists()


def test_missing_shard(tiny_moe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "broken"
    shutil.copytree(tiny_moe, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    shard.unlink()
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, shard.name, "missing")


def test_interrupted_save_leaves_no_output(
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = mint_mlx.safetensors_io.ShardWriter.write
    calls = {"n": 0}

    def interrupted(self, name, array):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, name, array)

    monkeypatch.setattr(mint_mlx.safetensors_io.ShardWriter, "write", interrupted)
    out = tmp_path / "o"
    code, _, err = run_cli(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "interrupted")
    assert calls["n"] == 7
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind either


def test_upload_calls_hub(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))
            return f"https://huggingface.co/{kw['repo_id']}"

        def list_repo_tree(self, **kw):
            calls.append(("list_repo_tree", kw))
            return []  # a new, empty repo

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            assert (Path(kw["folder_path"]) / "README.md").exists()
            assert (Path(kw["folder_path"]) / "config.json").exists()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = convert(tiny_llama, tmp_path / "o", bpw=4.0, upload_repo="me/tiny-mint")
    assert [c[0] for c in calls] == ["create_repo", "list_repo_tree", "upload_folder"]
    assert calls[0][1]["repo_id"] == "me/tiny-mint" and calls[0][1]["exist_ok"]
    assert calls[2][1]["folder_path"] == str(tmp_path / "o")
    assert result.url == "https://huggingface.co/me/tiny-mint"


def test_paper_mode_uses_only_the_papers_configurations(deep_llama: Path, tmp_path: Path) -> None:
    from mint_mlx.formats import paper_formats

    allowed = {f.name for f in paper_formats()}
    plan = convert(deep_llama, tmp_path / "o", bpw=4.25, objective="paper", dry_run=True).plan
    assert {a.format for a in plan.assignments} <= allowed
    assert plan.total_bytes <= plan.budget
    # the output head is protected by its prior: not at the lowest configuration
    head = next(a for a in plan.assignments if a.path == "model.embed_tokens")
    assert head.format != "affine-2-g32"
