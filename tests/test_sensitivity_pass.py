"""Choosing and bounding the sensitivity pass: ``--max-memory``, ``--sensitivity-pass``, and a
checkpoint without a tokenizer. The numbers themselves are checked in test_streamed.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mint_mlx.sensitivity.calibrate as calibrate_module
from mint_mlx.convert import convert
from mint_mlx.sensitivity.calibrate import (
    CalibrationConfig,
    choose_pass,
    in_memory_need,
    sensitivity,
)
from mint_mlx.sensitivity.proxy import proxy_sampler_memory
from mint_mlx.sensitivity.streamed import RUNTIME_BYTES, streamed_memory, streamed_sampler_memory
from mint_mlx.source.model import open_source

from test_convert import assert_one_line_error, run_cli
from tiny_models import LLAMA_CONFIG, build_model_dir

#: Wide and deep enough that one block is a small share of the model.
WIDE = dict(
    LLAMA_CONFIG,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=24,
    num_attention_heads=8,
    num_key_value_heads=4,
)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("wide") / "wide-llama", WIDE)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_moe", "tiny_gemma3"])
def test_streamed_and_in_memory_passes_plan_alike(
    model: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = request.getfixturevalue(model)
    plans = {}
    for kind in ("in-memory", "streamed"):
        monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / kind))  # each pass really runs
        result = convert(src, tmp_path / "o", bpw=4.5, dry_run=True, sensitivity_pass=kind)
        plans[kind] = result.plan
    assert plans["in-memory"].formats == plans["streamed"].formats
    assert any("sensitivity pass in memory" in n for n in plans["in-memory"].notes)
    assert any("sensitivity pass streamed (one block" in n for n in plans["streamed"].notes)
    assert plans["streamed"].peak_memory > 0


def test_auto_streams_when_the_whole_model_does_not_fit(
    wide_llama: Path,
) -> None:
    source = open_source(wide_llama)
    config = CalibrationConfig()
    streamed = streamed_memory(source, config.sequences, config.seq_len, False)
    assert streamed < in_memory_need(source)  # the point of streaming
    assert choose_pass(source, config, "auto", None).kind == "in-memory"
    assert choose_pass(source, config, "auto", streamed).kind == "streamed"
    with pytest.raises(calibrate_module.CalibrationMemoryError, match="streamed"):
        choose_pass(source, config, "in-memory", streamed)
    # and the pass convert and plan run: streamed under the limit, with a short text
    short = CalibrationConfig(sequences=2, seq_len=32)
    limit = streamed_memory(source, short.sequences, short.seq_len, False)
    found = sensitivity(source, short, max_memory=limit)
    assert found.choice is not None and found.choice.kind == "streamed"
    assert found.choice.sampler == "streamed"  # the float32 model does not fit either
    assert set(found.columns) == {t.key for t in source.quantizable}


def test_activations_go_to_disk_before_the_pass_is_refused(
    wide_llama: Path, tmp_path: Path
) -> None:
    source = open_source(wide_llama)
    text = tmp_path / "calib.txt"  # a user's text: no sampler to fit beside the pass
    text.write_text("text " * 100)
    config = CalibrationConfig(text_file=str(text))
    on_disk = streamed_memory(source, config.sequences, config.seq_len, True)
    choice = choose_pass(source, config, "auto", on_disk)
    assert choice.kind == "streamed" and choice.activations_on_disk
    with pytest.raises(calibrate_module.CalibrationMemoryError, match="at least"):
        choose_pass(source, config, "auto", on_disk - 1)


def test_max_memory_below_the_minimum_is_one_line(
    wide_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    args = ["--hf-path", str(wide_llama), "--mlx-path", str(out), "--bpw", "4"]
    code, _, err = run_cli([*args, "--max-memory", "100MB"], capsys)
    source = open_source(wide_llama)
    config = CalibrationConfig()
    n, length = config.sequences, config.seq_len
    on_disk = streamed_memory(source, n, length, True)
    samplers = (streamed_sampler_memory(source, n, length), proxy_sampler_memory(source, n, length))
    minimum = min(max(on_disk, sampler) for sampler in samplers)
    assert_one_line_error(code, err, "--max-memory", "raise --max-memory to at least")
    from mint_mlx.sizes import format_size

    assert format_size(minimum, round_up=True) in err
    assert not out.exists()


def test_an_architecture_that_cannot_stream_names_the_explicit_choice(
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never a silent drop to weight error: the user is told to choose it."""
    monkeypatch.setattr(calibrate_module, "STREAMABLE_ARCHITECTURES", frozenset())
    # a fresh cache: a pass cached by an earlier test would (rightly) skip the choice
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4"]
    code, _, err = run_cli([*args, "--max-memory", "1MB"], capsys)
    assert_one_line_error(code, err, "--objective nrmse", "cannot be streamed")
    assert not out.exists()
    code, _, err = run_cli([*args, "--sensitivity-pass", "streamed"], capsys)
    assert_one_line_error(code, err, "does not support llama", "--sensitivity-pass in-memory")


def test_streamed_pass_keeps_one_block_resident(wide_llama: Path) -> None:
    """Peak RSS growth of the pass, measured in a child process (the kernel's high-water mark,
    reset just before), stays within the estimate for one block and the activations: far
    below the float32 model the in-memory pass holds."""
    script = """
import json, sys
import mint_mlx
import mlx.core as mx
from mint_mlx.source.model import open_source
from mint_mlx.sensitivity.streamed import streamed_column_fisher

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

source = open_source(sys.argv[1])
sequences = mx.random.randint(0, 384, (2, 64)).astype(mx.int32)
keys = [t.key for t in source.quantizable]
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
streamed_column_fisher(source, sequences, keys)
print(json.dumps({"growth": status("VmHWM") - before}))
"""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", script, str(wide_llama)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    source = open_source(wide_llama)
    estimate = streamed_memory(source, 2, 64, False) - RUNTIME_BYTES
    float32_model = 4 * source.total_parameters
    assert growth < 1.25 * estimate, (growth, estimate)
    assert growth < 0.5 * float32_model, (growth, float32_model)


def _without_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


def test_no_tokenizer_converts_with_self_sampled_text(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _without_tokenizer(tiny_llama, tmp_path / "bare")
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(out), "--bpw", "4.5"], capsys
    )
    assert code == 0, err
    assert "note: bare has no tokenizer files" in stdout
    assert (out / "config.json").exists() and not list(out.glob("tokenizer*"))
    plan = json.loads((out / "mint_plan.json").read_text())
    assert plan["objective"] == "fisher" and plan["peak_memory"] > 0
    card = (out / "README.md").read_text()
    assert "Peak memory of the conversion" in card
    assert "sensitivity from text the source model sampled itself" in card


def test_calibration_file_without_tokenizer_is_one_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _without_tokenizer(tiny_llama, tmp_path / "bare")
    text = tmp_path / "calib.txt"
    text.write_text("some text " * 200)
    out = tmp_path / "o"
    args = ["--hf-path", str(src), "--mlx-path", str(out), "--bpw", "4.5"]
    code, _, err = run_cli([*args, "--calibration", str(text)], capsys)
    assert_one_line_error(code, err, "needs the model's tokenizer", "drop --calibration")
    assert not out.exists()


def test_calibration_sequences_flag_sets_the_sample_size(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """``--calibration-sequences N`` (the demo passes 4) samples N sequences of 256 tokens, has
    its own calibration cache entry and says so in the notes; the default stays 8."""
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))  # no earlier test's entry
    drawn: list[int] = []
    real = calibrate_module.sample_sequences

    def spy(model, start, n, length, seed, progress=False):  # type: ignore[no-untyped-def]
        drawn.append(n)
        return real(model, start, n, length, seed, progress)

    monkeypatch.setattr(calibrate_module, "sample_sequences", spy)
    base = ["--hf-path", str(tiny_llama), "--bpw", "4.5", "--dry-run"]
    code, out, err = run_cli([*base, "--calibration-sequences", "2"], capsys)
    assert code == 0, err
    assert drawn == [2] and "2 x 256 tokens" in out
    source = open_source(tiny_llama)
    assert calibrate_module.calibration_path(source, CalibrationConfig(sequences=2)).exists()
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert drawn == [2, 8] and "8 x 256 tokens" in out
    code, out, err = run_cli([*base, "--calibration-sequences", "0"], capsys)
    assert_one_line_error(code, err, "--calibration-sequences must be at least 1")


def test_calibration_length_flag_sets_the_sequence_length(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """``--calibration-length T`` samples sequences of T tokens (T - 1 decode steps), keyed apart
    in the calibration cache and named in the notes; 1 is refused in one line.
    ``--calibration-seed`` draws another sample under its own cache key."""
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "cache"))
    drawn: list[tuple[int, int, int]] = []
    real = calibrate_module.sample_sequences

    def spy(model, start, n, length, seed, progress=False):  # type: ignore[no-untyped-def]
        drawn.append((n, length, seed))
        out = real(model, start, n, length, seed, progress)
        assert out.shape == (n, length)
        return out

    monkeypatch.setattr(calibrate_module, "sample_sequences", spy)
    base = ["--hf-path", str(tiny_llama), "--bpw", "4.5", "--dry-run"]
    code, out, err = run_cli(
        [*base, "--calibration-sequences", "4", "--calibration-length", "16"], capsys
    )
    assert code == 0, err
    assert drawn == [(4, 16, 0)] and "4 x 16 tokens" in out
    source = open_source(tiny_llama)
    config = CalibrationConfig(sequences=4, seq_len=16)
    assert calibrate_module.calibration_path(source, config).exists()
    assert not calibrate_module.calibration_path(source, CalibrationConfig(sequences=4)).exists()
    code, out, err = run_cli([*base, "--calibration-length", "1"], capsys)
    assert_one_line_error(code, err, "--calibration-length must be at least 2")
    seeded = [
        "--calibration-sequences",
        "4",
        "--calibration-length",
        "16",
        "--calibration-seed",
        "3",
    ]
    code, out, err = run_cli([*base, *seeded], capsys)
    assert code == 0, err
    assert drawn[-1] == (4, 16, 3)  # a new sample, not the seed-0 cache entry
