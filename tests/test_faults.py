"""Faults and bad input (issue 5): each gives one clear line and exit 2, or a clear choice,
never a half-written output; and the analysis cache follows tensor content, not file dates."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mint_mlx.analysis.measure
import mint_mlx.safetensors_io
from mint_mlx.convert import convert, main

from tiny_models import LLAMA_CONFIG, build_model_dir


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensor(model_dir: Path, key: str, fn) -> None:
    """Replace one tensor of a single-shard model by ``fn(tensor)``, keeping shape and dtype."""
    shard = model_dir / "model.safetensors"
    weights = mx.load(str(shard))
    assert isinstance(weights, dict)
    weights[key] = fn(weights[key]).astype(weights[key].dtype)
    mx.save_safetensors(str(shard), weights)
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write time


def no_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("analysis should come from the cache")

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", boom)


def count_analysis(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = mint_mlx.analysis.measure.analyze_tensor

    def counting(info, *args, **kwargs):
        seen.append(info.path)
        return real(info, *args, **kwargs)

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", counting)
    return seen


# ----------------------------------------------------------------------------- content hashes


def test_touched_or_copied_source_reuses_the_analysis(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    cache = tmp_path / "a.jsonl"
    first = convert(src, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True).plan
    shard = src / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched: data unchanged
    moved = tmp_path / "moved"
    shutil.move(src, moved)  # and moved: the hashes must be recomputed from the data
    no_analysis(monkeypatch)
    second = convert(moved, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True).plan
    assert second.formats == first.formats


def test_changed_tensor_is_reanalyzed(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weight-error objective: only the changed tensor is measured again. (With the Fisher
    objective every tensor's weighting changes with the model, so all are re-measured.)"""
    src = copy_model(tiny_llama, tmp_path / "src")
    cache = tmp_path / "a.jsonl"
    convert(src, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True, objective="nrmse")
    key = "model.layers.1.mlp.down_proj.weight"
    rewrite_tensor(src, key, lambda w: w * 3.0)
    seen = count_analysis(monkeypatch)
    convert(src, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True, objective="nrmse")
    assert seen == ["model.layers.1.mlp.down_proj"]
    lines = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    energies = [c["energy"] for c in lines if c["path"] == "model.layers.1.mlp.down_proj"]
    assert len(energies) == 2 and energies[1] == pytest.approx(9.0 * energies[0], rel=1e-2)


def test_fisher_weights_follow_the_content(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    cache = tmp_path / "a.jsonl"
    plan = convert(src, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True).plan
    rewrite_tensor(src, "model.norm.weight", lambda w: w * 2.0)  # not quantized, but it
    seen = count_analysis(monkeypatch)  # moves every gradient
    with pytest.raises(mint_mlx.errors.AnalysisCacheError):  # the explicit file is for the
        convert(src, tmp_path / "o", bpw=4.0, analysis=cache, dry_run=True)  # old weights
    convert(src, tmp_path / "o", bpw=4.0, dry_run=True)
    assert len(seen) == len(plan.assignments)


# ----------------------------------------------------------------------------- bad input


def test_config_missing_fields(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"]
    (src / "config.json").write_text(json.dumps(config))
    args = ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "config.json", "hidden_size")
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "config.json", "model_type")
    assert not (tmp_path / "o").exists()


def test_shard_left_out_of_the_index(
    tiny_moe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_model(tiny_moe, tmp_path / "src")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != dropped}
    index_path.write_text(json.dumps(index))
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "missing")
    assert not (tmp_path / "o").exists()


def test_corrupt_shard_header(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\xff" * 16  # garbage inside the JSON header
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_widths_no_group_size_divides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hidden 72, intermediate 200: no group size of 32, 64 or 128 divides any input width."""
    config = dict(LLAMA_CONFIG, hidden_size=72, intermediate_size=200, head_dim=18)
    src = build_model_dir(tmp_path / "odd", config)
    code, _, err = run_cli(
        ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "smallest feasible")
    assert not (tmp_path / "o").exists()
    result = convert(src, tmp_path / "o", budget="1GB")
    assert all(not f.is_quantized for f in result.plan.formats.values())


# ----------------------------------------------------------------------------- bad weights


def test_non_finite_tensor_stays_16_bit_and_is_reported(tiny_llama: Path, tmp_path: Path) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    key = "model.layers.0.self_attn.v_proj"

    def poison(w: mx.array) -> mx.array:
        a = np.array(w.astype(mx.float32))
        a[3, 5], a[7, 1] = np.nan, np.inf
        return mx.array(a)

    rewrite_tensor(src, f"{key}.weight", poison)
    plan = convert(src, tmp_path / "o", bpw=4.0, objective="nrmse").plan
    assert not plan.formats[key].is_quantized
    assert any(key in n and "non-finite" in n for n in plan.notes)
    assert (tmp_path / "o" / "config.json").exists()
    # the default objective too: its sensitivity pass sees a broken model
    plan = convert(src, tmp_path / "o2", bpw=4.0).plan
    assert not plan.formats[key].is_quantized
    assert any("sensitivity pass" in n and "objective nrmse" in n for n in plan.notes)
    assert plan.distortion == plan.distortion  # not NaN: planned on finite errors


def test_all_zero_tensor_is_stored_exactly_in_the_smallest_format(
    tiny_llama: Path, tmp_path: Path
) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    key = "model.layers.1.self_attn.o_proj"
    rewrite_tensor(src, f"{key}.weight", mx.zeros_like)
    result = convert(src, tmp_path / "o", bpw=4.0)
    fmt = result.plan.formats[key]
    assert fmt.is_quantized and fmt.bits == 2
    assert any(key in n and "all zeros" in n for n in result.plan.notes)
    from mlx_lm.utils import load_model

    model, _ = load_model(tmp_path / "o")
    layer = model.model.layers[1].self_attn.o_proj
    restored = mx.dequantize(
        layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits
    )
    assert float(mx.abs(restored).max().item()) == 0.0


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_saving(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out" / "model"
    cache = tmp_path / "a.jsonl"
    real = mint_mlx.safetensors_io.ShardWriter.write
    calls = {"n": 0}

    def full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mint_mlx.safetensors_io.ShardWriter, "write", full)
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4"]
    code, _, err = run_cli([*args, "--analysis", str(cache)], capsys)
    assert_one_line_error(code, err, "no space left", "--mlx-path")
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp dir either
    # the cache is still usable: the re-run measures nothing again
    monkeypatch.setattr(mint_mlx.safetensors_io.ShardWriter, "write", real)
    no_analysis(monkeypatch)
    code, _, err = run_cli([*args, "--analysis", str(cache)], capsys)
    assert code == 0, err
    assert (out / "config.json").exists()


def test_too_little_free_space_is_refused_up_front(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: usage._replace(free=1000),  # type: ignore[attr-defined]
    )
    code, _, err = run_cli(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"], capsys
    )
    assert_one_line_error(code, err, "free", "--mlx-path")
    assert not (tmp_path / "o").exists()


def test_second_pass_over_a_model_whose_sanitize_mutates_it(tmp_path: Path) -> None:
    """gemma3's sanitize drops the model's lm_head when embeddings are tied: re-reading
    released tensors (digest, then analyze, then save) must not run it on the same model."""
    from mint_mlx.source.model import open_source

    from tiny_models import GEMMA3_CONFIG

    src = build_model_dir(tmp_path / "gemma", GEMMA3_CONFIG)
    source = open_source(src)
    key = source.quantizable[0].key
    first = np.array(source.tensor(key).astype(mx.float32))
    source.release(key)
    again = np.array(source.tensor(key).astype(mx.float32))
    assert np.array_equal(first, again)
    result = convert(src, tmp_path / "o", bpw=4.5)
    assert (tmp_path / "o" / "config.json").exists() and result.plan.total_bytes > 0


def test_ctrl_c_during_analysis_from_the_command_line(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cache = tmp_path / "a.jsonl"
    real = mint_mlx.analysis.measure.analyze_tensor
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", interrupted)
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--bpw", "4"]
    code, _, err = run_cli([*args, "--analysis", str(cache)], capsys)
    assert_one_line_error(code, err, "interrupted", "cache is kept")
    assert not (tmp_path / "o").exists()
    assert len(cache.read_text().splitlines()) == 1 + 3  # header + the three finished tensors
    monkeypatch.setattr(mint_mlx.analysis.measure, "analyze_tensor", real)
    code, _, err = run_cli([*args, "--analysis", str(cache)], capsys)
    assert code == 0, err


def test_ctrl_c_during_upload_says_how_to_resume(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import mint_mlx.output.hub

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mint_mlx.output.hub, "upload", interrupted)
    out = tmp_path / "o"
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--bpw", "4"]
    code, _, err = run_cli([*args, "--upload-repo", "me/tiny"], capsys)
    assert_one_line_error(
        code, err, "during the upload", "python -m mint_mlx.output.hub", "me/tiny"
    )
    assert (out / "config.json").exists()  # the model itself is complete


# ----------------------------------------------------------------------------- a source that changes


def negate_in_place(shard: Path, key: str) -> None:
    """Flip the sign bit of every bf16 value of one tensor, in the file's own bytes: a new
    content at the same size (the safetensors header is parsed here, independently)."""
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + n])[key]
    assert entry["dtype"] == "BF16"
    start, end = (8 + n + o for o in entry["data_offsets"])
    values = np.frombuffer(bytes(data[start:end]), dtype=np.uint16) ^ np.uint16(0x8000)
    data[start:end] = values.tobytes()
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["rewritten", "same-size-and-date", "reshaped"])
def test_shard_replaced_mid_run_fails_instead_of_giving_a_wrong_output(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, how: str
) -> None:
    """The shard changes after the analysis and before the save (issue 21): the content hashes
    catch it, even when the new file keeps the old size and date, and nothing is published.
    The re-run, on the now stable source, analyses the new tensor and converts."""
    import mint_mlx.convert

    src = copy_model(tiny_llama, tmp_path / "src")
    shard = src / "model.safetensors"
    key = "model.layers.0.mlp.down_proj.weight"
    real_prepare = mint_mlx.convert.prepare

    def then_replace(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        st = shard.stat()
        if how == "reshaped":
            weights = mx.load(str(shard))
            weights[key] = weights[key][:, :64]
            mx.save_safetensors(str(shard), weights)
        else:
            negate_in_place(shard, key)
            assert shard.stat().st_size == st.st_size
        if how == "same-size-and-date":
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        return prepared

    monkeypatch.setattr(mint_mlx.convert, "prepare", then_replace)
    out = tmp_path / "o"
    args = ["--hf-path", str(src), "--mlx-path", str(out), "--bpw", "4"]
    args += ["--objective", "nrmse", "--scales", "rtn"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "changed while it was being converted", "re-run")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    if how == "reshaped":
        return  # the config no longer matches the weights: that source is refused on open
    monkeypatch.setattr(mint_mlx.convert, "prepare", real_prepare)
    code, _, err = run_cli(args, capsys)  # with stale remembered hashes it would fail again
    assert code == 0, err
    # and the output holds the new tensor: its dequantized weights follow the negated source
    module = key.removesuffix(".weight")
    saved: dict[str, mx.array] = {}
    for f in out.glob("*.safetensors"):
        saved.update(mx.load(str(f)))  # type: ignore[arg-type]
    entry = json.loads((out / "config.json").read_text())["quantization"][module]
    w = mx.dequantize(
        saved[key],
        saved[f"{module}.scales"].astype(mx.float32),
        saved[f"{module}.biases"].astype(mx.float32),
        group_size=entry["group_size"],
        bits=entry["bits"],
    )
    new = mx.load(str(shard))[key].astype(mx.float32)  # type: ignore[index]
    corr = np.corrcoef(np.array(w).ravel(), np.array(new).ravel())[0, 1]
    assert corr > 0.9, corr
