"""Parallel analysis: worker processes (--jobs) and mlx.launch ranks give the single-process
plan, and the cache ends up with every tensor exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mint_mlx.analysis.workers
from mint_mlx.allocation.allocate import Plan
from mint_mlx.convert import convert
from mint_mlx.output.save import PLAN_FILE


def cache_records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()[1:]
    records = [json.loads(line) for line in lines]
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "a tensor was analyzed twice"
    return {r["path"]: r for r in records}


def test_worker_processes_give_the_same_analysis(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = convert(tiny_moe, tmp_path / "o", bpw=4.0, analysis=tmp_path / "1.jsonl", dry_run=True)
    monkeypatch.setattr(mint_mlx.analysis.workers, "PARALLEL_MIN_ELEMENTS", 0)
    calls = {"n": 0}
    real = mint_mlx.analysis.workers.analyze_in_pool

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mint_mlx.analysis.workers, "analyze_in_pool", counted)
    pooled = convert(
        tiny_moe, tmp_path / "o", bpw=4.0, analysis=tmp_path / "2.jsonl", dry_run=True, jobs=2
    )
    assert calls["n"] == 1  # the pool really ran
    # the reported peak adds the workers' own (each imports MLX and opens the source: tens of MB)
    from mint_mlx.memory import own_peak_rss

    assert pooled.plan.peak_memory > own_peak_rss() + 2 * 30 * 2**20
    assert cache_records(tmp_path / "2.jsonl") == cache_records(tmp_path / "1.jsonl")
    assert pooled.plan.formats == serial.plan.formats


def test_mlx_launch_ranks_split_the_analysis(tiny_llama: Path, tmp_path: Path) -> None:
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed next to this Python")
    single = convert(tiny_llama, tmp_path / "single", bpw=4.0, analysis=tmp_path / "1.jsonl")
    env = dict(os.environ, MINT_MLX_CACHE=str(tmp_path / "cache"))
    cmd = [
        str(launcher),
        "-n",
        "2",
        "--",
        sys.executable,
        "-m",
        "mint_mlx.convert",
        "--hf-path",
        str(tiny_llama),
        "--mlx-path",
        str(tmp_path / "dist"),
        "--bpw",
        "4",
        "--analysis",
        str(tmp_path / "2.jsonl"),
        "--jobs",
        "1",
        "--quiet",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("saved ") == 1  # rank 0 alone reports and saves
    assert cache_records(tmp_path / "2.jsonl") == cache_records(tmp_path / "1.jsonl")
    dist = Plan.load(tmp_path / "dist" / PLAN_FILE)
    assert dist.formats == single.plan.formats
    assert dist.total_bytes == single.plan.total_bytes


def test_ctrl_c_during_pooled_analysis_keeps_finished_records(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mint_mlx.analysis.measure

    monkeypatch.setattr(mint_mlx.analysis.workers, "PARALLEL_MIN_ELEMENTS", 0)
    cache = tmp_path / "a.jsonl"
    real_from_json = mint_mlx.analysis.measure.RDCurve.from_json
    seen = {"n": 0}

    def interrupt_after_three(d):
        seen["n"] += 1
        if seen["n"] == 4:
            raise KeyboardInterrupt
        return real_from_json(d)

    monkeypatch.setattr(
        mint_mlx.analysis.measure.RDCurve, "from_json", staticmethod(interrupt_after_three)
    )
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_moe, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True, jobs=2)
    assert len(cache_records(cache)) == 3  # the finished ones, each whole
    monkeypatch.setattr(
        mint_mlx.analysis.measure.RDCurve, "from_json", staticmethod(real_from_json)
    )
    plan = convert(tiny_moe, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True, jobs=2).plan
    assert len(cache_records(cache)) == len(plan.assignments)


def test_max_memory_lowers_the_worker_count(tiny_llama: Path, tmp_path: Path) -> None:
    """--max-memory bounds the analysis too: fewer workers when they would not fit."""
    from mint_mlx.analysis.workers import WORKER_FIXED_BYTES
    from mint_mlx.source.model import open_source

    source = open_source(tiny_llama)
    # a worker holds its largest tensor as read (bounded float32 pieces are in the fixed part)
    largest = max(source.tensor(t.key).nbytes for t in source.quantizable)
    per_worker = WORKER_FIXED_BYTES + largest
    roomy = convert(
        tiny_llama,
        tmp_path / "o",
        bpw=4.0,
        dry_run=True,
        jobs=2,
        max_memory=WORKER_FIXED_BYTES + 2 * per_worker,  # the parent and two workers
    )
    assert not any("instead of --jobs" in n for n in roomy.plan.notes)
    tight = convert(
        tiny_llama,
        tmp_path / "o",
        bpw=4.0,
        dry_run=True,
        jobs=2,
        max_memory=WORKER_FIXED_BYTES + 2 * per_worker - 1,
    )
    assert any("analysis ran in 1 process instead of --jobs 2" in n for n in tight.plan.notes)
    assert tight.plan.formats == roomy.plan.formats
