"""Sampled distortion (issue 17): the row sample's estimates against the full measurement.

Expected values come from measuring every row (the analysis's exact path) or from plain
numpy, never from the sampling code itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mint_mlx.allocation.prepare
from mint_mlx.analysis.analyze import analyze, cache_key
from mint_mlx.analysis.measure import measure
from mint_mlx.analysis.row_sample import draw, row_stats, sample_rows
from mint_mlx.convert import convert
from mint_mlx.formats import format_by_name
from mint_mlx.source.model import open_source

FORMATS = [format_by_name(n) for n in ("affine-2-g64", "affine-3-g32", "affine-4-g64")]


def heavy_rows(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Weights whose rows differ in scale by orders of magnitude (log-normal row scales), with
    a few outlier rows and outlier columns: what makes a naive sample of rows miss."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, width)).astype(np.float32)
    w *= rng.lognormal(0.0, 0.8, size=(rows, 1)).astype(np.float32)
    w[rng.choice(rows, 4, replace=False)] *= 30.0
    w[:, rng.choice(width, 3, replace=False)] *= 8.0
    return w


def test_proxy_and_energy_follow_their_definitions() -> None:
    w = heavy_rows(300, 96)
    cols = np.random.default_rng(1).gamma(0.5, 1.0, 96).astype(np.float32)
    stats = row_stats(mx.array(w), mx.array(cols))
    energy = np.array([sum(float(v) ** 2 for v in row) for row in w])
    proxy = np.array(
        [sum((max(row[g : g + 32]) - min(row[g : g + 32])) ** 2 for g in (0, 32, 64)) for row in w]
    )
    group_w = [cols[g : g + 32].mean() for g in (0, 32, 64)]
    weighted = np.array(
        [
            sum(
                (max(row[g : g + 32]) - min(row[g : g + 32])) ** 2 * group_w[i]
                for i, g in enumerate((0, 32, 64))
            )
            for row in w
        ]
    )
    np.testing.assert_allclose(stats.energy, energy, rtol=1e-5)
    np.testing.assert_allclose(stats.proxy, proxy, rtol=1e-5)
    assert stats.weighted_proxy is not None
    np.testing.assert_allclose(stats.weighted_proxy, weighted, rtol=1e-5)
    assert stats.finite


def test_the_estimator_is_exact_for_the_proxy_and_keeps_the_largest_rows() -> None:
    w = heavy_rows(5000, 64)
    stats = row_stats(mx.array(w), None)
    sample = draw(stats, 200, seed=3)
    assert sample.rows.size == 200 and np.unique(sample.rows).size == 200
    # a ratio estimator reproduces its auxiliary variable's total exactly
    estimate = float((stats.proxy[sample.rows] * sample.plain_factor).sum())
    assert estimate == pytest.approx(float(stats.proxy.sum()), rel=1e-9)
    # the outlier rows (30x) are measured as they are, standing for themselves alone
    outliers = np.argsort(-stats.proxy)[:4]
    at = np.searchsorted(sample.rows, outliers)
    assert np.array_equal(sample.rows[at], outliers)
    assert np.all(sample.plain_factor[at] == 1.0)
    # the same seed draws the same rows; another seed other rows
    assert np.array_equal(draw(stats, 200, seed=3).rows, sample.rows)
    assert not np.array_equal(draw(stats, 200, seed=4).rows, sample.rows)


@pytest.mark.parametrize("weighted", [False, True])
def test_sampled_errors_are_within_a_few_percent_of_every_row(weighted: bool) -> None:
    w = mx.array(heavy_rows(4096, 256)).astype(mx.bfloat16)
    rng = np.random.default_rng(5)
    cols = mx.array(rng.gamma(0.5, 1.0, 256).astype(np.float32)) if weighted else None
    exact = measure(w, FORMATS, mx.bfloat16, cols, "optimized", None)
    sampled = measure(w, FORMATS, mx.bfloat16, cols, "optimized", 1 << 15, seed=11)
    assert exact.sampled_rows == 0 and sampled.sampled_rows == 128  # 3% of the rows
    assert sampled.energy == pytest.approx(exact.energy, rel=1e-6)  # energy stays exact
    got = sampled.wsse if weighted else sampled.sse
    want = exact.wsse if weighted else exact.sse
    assert got is not None and want is not None
    for g, e in zip(got, want, strict=True):
        assert g == pytest.approx(e, rel=0.05)
    # paired: the ratio between two candidates is more precise than either estimate
    assert got[0] / got[2] == pytest.approx(want[0] / want[2], rel=0.03)


def test_every_expert_of_a_stack_is_measured() -> None:
    stack = np.stack([heavy_rows(512, 128, seed=e) for e in range(4)])
    stack[3] *= 10.0  # one expert dominates the error: missing it would show at once
    w = mx.array(stack).astype(mx.bfloat16)
    exact = measure(w, FORMATS, mx.bfloat16, None, "optimized", None)
    sampled = measure(w, FORMATS, mx.bfloat16, None, "optimized", 1 << 14, seed=2)
    per_expert = sample_rows(512, 128, (1 << 14) // 4)
    assert per_expert is not None and sampled.sampled_rows == 4 * per_expert
    for g, e in zip(sampled.sse, exact.sse, strict=True):
        assert g == pytest.approx(e, rel=0.05)


def test_small_tensors_are_measured_whole() -> None:
    assert sample_rows(100, 128, 1 << 17) is None  # fewer rows than twice the sample
    assert sample_rows(10**6, 128, None) is None  # sampling off
    assert sample_rows(10**6, 128, 1 << 17) == 1024


def test_sampled_analysis_is_the_same_in_worker_processes(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The draw is seeded by the tensor's path: workers pick the same rows as one process."""
    import mint_mlx.analysis.workers

    source = open_source(tiny_moe)
    serial = analyze(source, FORMATS, mx.bfloat16, tmp_path / "1.jsonl", sample_elements=2048)
    assert any(c.sampled_rows for c in serial)  # the small sample really samples here
    monkeypatch.setattr(mint_mlx.analysis.workers, "PARALLEL_MIN_ELEMENTS", 0)
    pooled = analyze(
        source, FORMATS, mx.bfloat16, tmp_path / "2.jsonl", jobs=2, sample_elements=2048
    )
    assert [c.to_json() for c in pooled] == [c.to_json() for c in serial]
    assert cache_key(source, FORMATS, mx.bfloat16, sample_elements=2048) != cache_key(
        source, FORMATS, mx.bfloat16, sample_elements=None
    )


def test_exact_analysis_measures_every_weight_and_says_so(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mint_mlx.allocation.prepare, "SAMPLE_ELEMENTS", 2048)
    sampled = convert(tiny_llama, tmp_path / "a", bpw=4.0, analysis=tmp_path / "s.jsonl")
    notes = " ".join(sampled.plan.notes)
    assert "stratified sample of about 2,048 weights" in notes
    exact = convert(
        tiny_llama, tmp_path / "b", bpw=4.0, analysis=tmp_path / "e.jsonl", exact_analysis=True
    )
    assert "stratified sample" not in " ".join(exact.plan.notes)
    lines = (tmp_path / "e.jsonl").read_text().splitlines()[1:]
    assert all(json.loads(line).get("sampled_rows", 0) == 0 for line in lines)
    lines = (tmp_path / "s.jsonl").read_text().splitlines()[1:]
    assert any(json.loads(line)["sampled_rows"] > 0 for line in lines)
