"""Planning before converting: sweeps, device fit, and the model card people read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mint_mlx.devices import GIB, fit_budget, kv_cache_bytes, parse_machine
from mint_mlx.errors import BudgetError
from mint_mlx.plan import main, plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sweep_is_monotone_and_spans_the_range(deep_llama: Path, tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    report = plan(deep_llama, sweep=True, png=png)
    points = report.points
    assert len(points) >= 8
    for a, b in zip(points, points[1:], strict=False):
        assert b.bytes > a.bytes  # a sweep lists no point that buys nothing more
        assert b.predicted_kld <= a.predicted_kld  # more bytes, never worse predicted quality
    assert points[-1].predicted_kld == 0.0 and points[-1].mix == "16b 100%"
    assert points[0].bits_per_weight < 4.0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_explicit_budgets_and_json(deep_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--hf-path", str(deep_llama), "--budgets", "700KB,900KB", "--json", "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["budget"] for p in data["points"]] == [700_000, 900_000]
    assert all(p["bytes"] <= p["budget"] for p in data["points"])


def test_fit_leaves_the_stated_headroom(deep_llama: Path) -> None:
    report = plan(deep_llama, fit="16GB", context=32768)
    fit = report.fit
    assert fit is not None and report.fit_point is not None
    assert fit.weight_budget + fit.kv_cache + fit.runtime_reserve <= fit.gpu_memory
    assert fit.gpu_memory + fit.headroom == 16 * 10**9
    assert report.fit_point.bytes <= fit.weight_budget
    assert report.decode_ceiling_tps is None  # a plain size has no bandwidth


def test_named_machine_gives_a_decode_ceiling(
    deep_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--hf-path", str(deep_llama), "--fit", "m4-pro-24gb", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "decode speed ceiling (upper bound" in out
    assert "largest weight budget that fits" in out


def test_machine_parsing() -> None:
    m = parse_machine("m3-max-64gb")
    assert m.memory == 64 * GIB and m.bandwidth_gbs == 400.0
    assert parse_machine("16GB").memory == 16 * 10**9
    with pytest.raises(BudgetError, match="ships with"):
        parse_machine("m3-max-40gb")
    with pytest.raises(BudgetError, match="m3-max-64gb"):
        parse_machine("toaster")


def test_kv_cache_and_tiny_machine() -> None:
    config = {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
    }
    # 2 (k, v) x 32 layers x 8 heads x 128 dims x 8192 tokens x 2 bytes = 1 GiB
    assert kv_cache_bytes(config, 8192) == 2**30
    with pytest.raises(BudgetError, match="shorter --context"):
        fit_budget(parse_machine("1GB"), config, 8192)


def test_model_card_renders(deep_llama: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from mint_mlx.convert import convert

    out = tmp_path / "carded"
    convert(deep_llama, out, bpw=4.5, command=["--bpw", "4.5"])
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "mlx"
    assert card.data.pipeline_tag == "text-generation"
    assert "mint-mlx" in card.data.tags
    assert "python -m mint_mlx.convert --bpw 4.5" in card.text
    assert "from mlx_lm import load, generate" in card.text
    assert "| configuration | tensors |" in card.text
    for name in ("size_quality.png", "layers.png"):
        assert f"]({name})" in card.text
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
