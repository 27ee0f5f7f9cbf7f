"""The Fisher sensitivity estimate: shapes, caching, and that it predicts the KL divergence."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mint_mlx.convert import convert
from mint_mlx.sensitivity.calibrate import CalibrationConfig, calibrate, load_float32_model
from mint_mlx.sensitivity.sampling import sample_sequences
from mint_mlx.source.model import open_source


def test_column_weights_cover_every_tensor(
    tiny_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mint_mlx.sensitivity.calibrate as cal

    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))  # empty: this call computes
    source = open_source(tiny_moe)
    weights = calibrate(source, CalibrationConfig(sequences=2, seq_len=32))
    for t in source.quantizable:
        w = weights[t.key]
        assert tuple(w.shape) == t.shape[:-2] + t.shape[-1:]  # one weight per input column
        assert mx.all(w > 0).item()  # the floor: nothing is free to destroy
    # cached: the one file written holds these weights ...
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    saved = mx.load(str(entry))
    assert isinstance(saved, dict) and saved.keys() == weights.keys()
    assert all(mx.array_equal(weights[k], saved[k]).item() for k in weights)
    # ... and a second call reads it instead of recomputing: with the sampling and the Fisher
    # passes disabled it returns what the file now holds (doubled), not the weights computed
    mx.save_safetensors(str(entry), {k: 2 * v for k, v in saved.items()})

    def recompute(*args, **kwargs):
        raise AssertionError("the calibration should come from the cache")

    for name in ("calibration_tokens", "column_fisher", "streamed_column_fisher"):
        monkeypatch.setattr(cal, name, recompute)
    again = calibrate(source, CalibrationConfig(sequences=2, seq_len=32))
    assert again.keys() == weights.keys()
    assert all(mx.array_equal(2 * weights[k], again[k]).item() for k in weights)


def test_sampling_is_seeded(tiny_llama: Path) -> None:
    model = load_float32_model(open_source(tiny_llama))
    a = sample_sequences(model, 0, 2, 16, seed=3)
    b = sample_sequences(model, 0, 2, 16, seed=3)
    c = sample_sequences(model, 0, 2, 16, seed=4)
    assert mx.array_equal(a, b).item() and not mx.array_equal(a, c).item()


def test_calibration_file_is_used(tiny_llama: Path, tmp_path: Path) -> None:
    from tiny_models import CORPUS

    text = tmp_path / "calib.txt"
    text.write_text(CORPUS)
    source = open_source(tiny_llama)
    own = calibrate(source, CalibrationConfig(sequences=2, seq_len=32))
    user = calibrate(source, CalibrationConfig(sequences=2, seq_len=32, text_file=str(text)))
    key = source.quantizable[1].key
    assert not mx.allclose(own[key], user[key]).item()


def test_predicted_kld_tracks_measured(tiny_llama: Path, tmp_path: Path) -> None:
    """The fisher objective's total is a second-order KLD prediction: check it on real output."""
    from mint_mlx.tools.evaluation import evaluate

    from tiny_models import CORPUS

    text = tmp_path / "eval.txt"
    text.write_text(CORPUS)
    for bpw in (5.0, 6.5):
        out = tmp_path / f"q{bpw}"
        plan = convert(tiny_llama, out, bpw=bpw).plan
        measured = evaluate(out, tiny_llama, text, seq_len=64).kld_mean
        assert measured is not None and measured > 0
        assert plan.distortion / 3 < measured < plan.distortion * 3, (
            bpw,
            plan.distortion,
            measured,
        )


def test_fisher_beats_weight_error_objective(deep_llama: Path, tmp_path: Path) -> None:
    """At the same bytes the output-aware allocation must not be worse than the nrmse one."""
    from mint_mlx.tools.evaluation import evaluate

    from tiny_models import CORPUS

    text = tmp_path / "eval.txt"
    text.write_text(CORPUS)
    kld = {}
    for objective in ("fisher", "nrmse"):
        out = tmp_path / objective
        convert(deep_llama, out, bpw=4.0, objective=objective)
        kld[objective] = evaluate(out, deep_llama, text, seq_len=64).kld_mean
    assert kld["fisher"] <= kld["nrmse"] * 1.05, kld


@pytest.mark.parametrize("bad", ["missing.txt"])
def test_missing_calibration_file(tiny_llama: Path, tmp_path: Path, bad: str) -> None:
    from mint_mlx.errors import MintError

    with pytest.raises(MintError, match="calibration file"):
        convert(tiny_llama, tmp_path / "o", bpw=4, calibration=tmp_path / bad)
