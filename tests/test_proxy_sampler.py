"""The 4-bit proxy sampler: what it builds, what it costs in memory, when it is chosen, and that
its text is named and cached apart from the full-precision model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_sensitivity_pass import WIDE

import mint_mlx.sensitivity.calibrate as calibrate_module
from mint_mlx.convert import convert
from mint_mlx.sensitivity.calibrate import (
    CalibrationConfig,
    calibration_path,
    choose_pass,
    in_memory_need,
    sampler_need,
    sensitivity,
)
from mint_mlx.sensitivity.proxy import (
    PROXY_NAME,
    build_proxy,
    proxy_model_bytes,
    proxy_sample,
    proxy_sampler_memory,
)
from mint_mlx.sensitivity.sampling import sample_sequences, start_token
from mint_mlx.sensitivity.streamed import RUNTIME_BYTES, streamed_memory, streamed_sampler_memory
from mint_mlx.source.model import cast_to_float32, open_source

from test_convert import run_cli
from tiny_models import build_model_dir

MODELS = ["tiny_llama", "tiny_gemma3", "tiny_moe"]
SHORT = CalibrationConfig(sequences=2, seq_len=32)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("wide") / "wide-llama", WIDE)


@pytest.mark.parametrize("model", MODELS)
def test_proxy_is_what_mlx_lm_convert_q_makes(model: str, request: pytest.FixtureRequest) -> None:
    """Built group by group from the shards, the proxy samples the same tokens as the whole
    model quantized by mlx-lm's own ``quantize_model`` (4-bit g64, the architecture's
    predicate: qwen3_moe's routers at 8 bits), run in float32; and it holds what its
    estimate says."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model

    path = request.getfixturevalue(model)
    source = open_source(path)
    proxy = build_proxy(source)
    held = sum(v.nbytes for _, v in tree_flatten(proxy.parameters()))
    assert held == proxy_model_bytes(source)
    assert held < 0.2 * 4 * source.total_parameters  # 5 bits per weight, not 32
    reference, _ = load_model(path, lazy=True)
    quantize_model(reference, source.config, 64, 4)
    cast_to_float32(reference)
    start = start_token(source)
    ours = sample_sequences(proxy, start, 3, 24, seed=5)
    theirs = sample_sequences(reference, start, 3, 24, seed=5)
    assert mx.array_equal(ours, theirs)


@pytest.mark.parametrize("model", MODELS)
def test_proxy_tokens_are_valid_reproducible_and_not_the_full_models(
    model: str, request: pytest.FixtureRequest
) -> None:
    source = open_source(request.getfixturevalue(model))
    vocab = source.config["vocab_size"]
    start = start_token(source)
    tokens = proxy_sample(source, start, 4, 40, seed=3)
    assert tokens.shape == (4, 40) and tokens.dtype == mx.int32
    ids = np.array(tokens)
    assert (ids[:, 0] == start).all() and ids.min() >= 0 and ids.max() < vocab
    assert mx.array_equal(tokens, proxy_sample(source, start, 4, 40, seed=3))
    assert not mx.array_equal(tokens, proxy_sample(source, start, 4, 40, seed=4))
    full = calibrate_module.calibration_tokens(
        source, CalibrationConfig(sequences=4, seq_len=40, seed=3), "in-memory"
    )[0]
    assert not mx.array_equal(tokens, full)  # another model's text: hence its own cache key


def test_proxy_build_keeps_the_16_bit_model_out_of_memory(wide: Path) -> None:
    """Peak RSS growth of building the proxy and sampling from it, in a child process (the
    kernel's high-water mark, reset just before), stays within the estimate: the 4-bit model
    plus one block, below the 16-bit model that loading everything first would hold."""
    script = """
import json, sys
import mint_mlx
from mint_mlx.sensitivity.proxy import proxy_sample
from mint_mlx.source.model import open_source

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

source = open_source(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
proxy_sample(source, 0, 2, 32, 0)
print(json.dumps({"growth": status("VmHWM") - before}))
"""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", script, str(wide)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    source = open_source(wide)
    estimate = proxy_sampler_memory(source, 2, 32) - RUNTIME_BYTES
    model16 = 2 * source.total_parameters
    assert estimate < 0.75 * model16  # else the test could not tell the two apart
    assert growth < 1.1 * estimate, (growth, estimate)  # measured 77 MiB against 81 MiB
    assert growth < 0.75 * model16, (growth, model16)
    assert growth > 0.5 * proxy_model_bytes(source), (growth, estimate)  # it measured the build


def test_auto_picks_the_full_model_in_memory_then_streamed_and_the_copy_only_when_forced(
    wide: Path,
) -> None:
    source = open_source(wide)
    n, length = SHORT.sequences, SHORT.seq_len
    full = sampler_need(source)
    proxy = proxy_sampler_memory(source, n, length)
    streamed = streamed_sampler_memory(source, n, length)
    pass_ = streamed_memory(source, n, length, False)
    assert max(pass_, streamed) < proxy < full < in_memory_need(source)  # the ladder below

    def picked(limit: int | None, sampler: str = "auto") -> tuple[str, str]:
        choice = choose_pass(source, SHORT, "auto", limit, sampler)
        assert limit is None or choice.need <= limit
        return choice.kind, choice.sampler

    assert picked(None) == ("in-memory", "in-memory")
    assert picked(full) == ("streamed", "in-memory")
    # the exact text streamed, before the copy's other text (which this ladder never needs)
    assert picked(full - 1) == ("streamed", "streamed")
    assert picked(proxy) == ("streamed", "streamed")
    assert picked(proxy - 1) == ("streamed", "streamed")
    # forced: full never takes the copy, proxy always does (and says when it does not fit)
    assert picked(full - 1, "full") == ("streamed", "streamed")
    assert picked(None, "proxy") == ("in-memory", "proxy")
    assert picked(full - 1, "proxy") == ("streamed", "proxy")
    with pytest.raises(calibrate_module.CalibrationMemoryError, match="at least"):
        picked(proxy - 1, "proxy")
    with pytest.raises(calibrate_module.MintError, match="--sampler"):
        picked(None, "best")


def test_a_calibration_file_needs_no_sampler(wide: Path, tmp_path: Path) -> None:
    source = open_source(wide)
    text = tmp_path / "calib.txt"
    text.write_text("text " * 100)
    config = CalibrationConfig(sequences=2, seq_len=32, text_file=str(text))
    for sampler in ("auto", "proxy"):
        for limit in (None, sampler_need(source) - 1):
            assert choose_pass(source, config, "auto", limit, sampler).sampler == "none"
    assert config.key(source) == CalibrationConfig(**{**config.__dict__, "proxy": True}).key(source)


def test_notes_and_cache_keys_name_the_sampler(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxy text and full-precision text have their own cache entries and notes; the two
    full-precision samplers (in memory, streamed) give the same tokens and share an entry."""
    source = open_source(tiny_llama)
    # a tiny model fits anywhere: from here on its float32 model "does not fit" under 1 TB
    huge, limit = 2**50, 2**40
    keys, texts, columns = {}, {}, {}
    for name, sampler, sensitivity_pass, need in (
        ("in-memory", "full", "auto", None),
        ("streamed", "full", "streamed", huge),
        ("proxy", "proxy", "auto", None),
    ):
        monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / name))  # each sampler really runs
        with monkeypatch.context() as patch:
            if need is not None:
                patch.setattr(calibrate_module, "sampler_need", lambda source: need)  # noqa: B023
            found = sensitivity(source, SHORT, None, sensitivity_pass, limit, sampler)
        assert found.choice is not None and found.choice.sampler == name
        keys[name], texts[name], columns[name] = found.key, found.text, found.columns
    assert keys["in-memory"] == keys["streamed"] == SHORT.key(source)
    assert keys["proxy"] != keys["in-memory"]
    full, streamed, proxy = columns["in-memory"], columns["streamed"], columns["proxy"]
    assert all(mx.allclose(full[k], streamed[k], rtol=1e-4).item() for k in full)
    assert not any(mx.array_equal(full[k], proxy[k]).item() for k in full)  # other text
    assert "sampled itself" in texts["in-memory"] and texts["in-memory"] == texts["streamed"]
    assert "4-bit copy" in texts["proxy"] and PROXY_NAME in texts["proxy"]
    assert "--sampler proxy" in texts["proxy"]
    # auto when the float32 model does not fit in memory: it samples one block at a time (the
    # same text and key); the copy only when that does not fit either, and the note says why
    monkeypatch.setattr(calibrate_module, "sampler_need", lambda source: huge)
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "auto"))
    found = sensitivity(source, SHORT, None, "streamed", limit)
    assert found.choice is not None and found.choice.sampler == "streamed"
    assert found.key == keys["in-memory"]
    monkeypatch.setattr(calibrate_module, "streamed_sampler_memory", lambda *a: huge)
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "auto-proxy"))
    found = sensitivity(source, SHORT, None, "streamed", limit)
    assert found.choice is not None and found.choice.sampler == "proxy"
    assert found.key == keys["proxy"] and "does not fit under --max-memory" in found.text
    assert calibration_path(source, CalibrationConfig(2, 32, proxy=True)).exists()
    # where the full model's text is cached, it is preferred to the copy's
    monkeypatch.setenv("MINT_MLX_CACHE", str(tmp_path / "in-memory"))
    cached = sensitivity(source, SHORT, None, "streamed", limit)
    assert cached.choice is None and cached.key == keys["in-memory"]
    assert "sampled itself" in cached.text


@pytest.mark.parametrize(
    ("model", "sensitivity_pass"),
    [("tiny_llama", "in-memory"), ("tiny_gemma3", "streamed"), ("tiny_moe", "streamed")],
)
def test_forced_proxy_converts_end_to_end(
    model: str, sensitivity_pass: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Text from the copy, gradients from the 16-bit weights (in memory or streamed), a saved
    model that stock mlx-lm loads, and a plan whose notes say who sampled the text."""
    from mlx_lm.utils import load_model

    src = request.getfixturevalue(model)
    out = tmp_path / "o"
    result = convert(src, out, bpw=4.5, sampler="proxy", sensitivity_pass=sensitivity_pass)
    notes = " ".join(result.plan.notes)
    assert "sensitivity from text sampled by a 4-bit copy of the source" in notes
    saved = json.loads((out / "mint_plan.json").read_text())
    assert any("4-bit copy" in n for n in saved["notes"])
    loaded, _ = load_model(out)
    assert loaded(mx.array([[0, 1, 2]])).shape[:2] == (1, 3)


def test_sampler_flag_on_the_cli(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4.5"]
    code, _, err = run_cli([*args, "--sampler", "proxy"], capsys)
    assert code == 0, err
    assert "4-bit copy" in (out / "README.md").read_text()
