"""Extended formats end to end (issue 4): convert with ``--formats extended``, save, refuse in
stock mlx-lm by name, load with ``mint_mlx.load``, and compute exactly what was saved.

The reference for every logits check is built without mint-mlx's runtime: the saved arrays are
dequantized with :func:`mint_mlx.quant.quantize.dequantize_weight` (``dequantize_extended`` for the
extended formats) and plugged into a float32 mlx-lm model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mint_mlx
from mint_mlx.allocation.allocate import Plan
from mint_mlx.analysis.analyze import default_cache_path
from mint_mlx.convert import convert, main
from mint_mlx.errors import MintError, SourceError
from mint_mlx.formats import (
    Format,
    format_by_name,
    format_from_entry,
    formats_for,
    paper_formats,
)
from mint_mlx.plan import plan as plan_budgets
from mint_mlx.quant.experts import (
    collapse,
    dequantize_per_expert,
    groups_from_entry,
    is_per_expert_entry,
)
from mint_mlx.quant.quantize import dequantize_weight
from mint_mlx.runtime.expert_layers import PerExpertSwitchLinear
from mint_mlx.runtime.layers import (
    ExtendedQuantizedEmbedding,
    ExtendedQuantizedLinear,
    ExtendedQuantizedSwitchLinear,
)
from mint_mlx.safetensors_io import read_header
from mint_mlx.source.model import cast_to_float32, open_source
from mint_mlx.tools.evaluate import main as evaluate_main
from mint_mlx.tools.evaluation import evaluate

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from test_convert import stock_load, weight_bytes
from tiny_models import CORPUS

PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The caches of this module's conversions: the temp dir conftest's autouse fixture gives
    every fast test, set here too because that fixture runs after module-scoped ones."""
    root = tmp_path_factory.getbasetemp() / "mint-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINT_MLX_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def extended_llama(
    tiny_llama: Path, isolated_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Plan]:
    out = tmp_path_factory.mktemp("ext") / "llama-ext"
    result = convert(tiny_llama, out, bpw=4.5, formats="extended")
    return out, result.plan


@pytest.fixture(scope="module")
def extended_moe(
    tiny_moe: Path, isolated_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Plan]:
    out = tmp_path_factory.mktemp("ext") / "moe-ext"
    result = convert(tiny_moe, out, bpw=4.5, formats="extended", objective="nrmse")
    return out, result.plan


def dequantized_reference(out: Path) -> nn.Module:
    """A float32 mlx-lm model holding the dequantized saved weights; no mint-mlx runtime."""
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = config.get("mint_mlx", config)["model_type"]
    quantization = config.pop("quantization")
    config.pop("quantization_config", None)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights: dict[str, mx.array] = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    for path, entry in quantization.items():
        if not isinstance(entry, dict):
            continue
        if is_per_expert_entry(entry):  # arrays <path>.g<k>.<suffix>, group by group
            prefix = f"{path}."
            arrays = {
                k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)
            }
            weights[f"{path}.weight"] = dequantize_per_expert(arrays, groups_from_entry(entry))
            continue
        suffixes = ("weight", "scales", "biases", "super_scales")
        arrays = {s: weights.pop(f"{path}.{s}") for s in suffixes if f"{path}.{s}" in weights}
        weights[f"{path}.weight"] = dequantize_weight(arrays, format_from_entry(entry))
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()])
    return model


def assert_matches_reference(out: Path) -> None:
    """mint_mlx.load's model (float32 activations) gives the reference's logits."""
    model, tokenizer = mint_mlx.load(out)
    cast_to_float32(model)
    tokens = mx.array([tokenizer.encode(PROMPT + " " + CORPUS[:200])])
    got, want = model(tokens), dequantized_reference(out)(tokens)
    assert got.dtype == mx.float32 and got.shape == want.shape
    err = float(mx.abs(got - want).max().item())
    assert err <= 1e-4 * max(1.0, float(mx.abs(want).max().item())), err


def layer_types(model: nn.Module) -> dict[str, type]:
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {path: type(m) for path, m in leaves}


def test_extended_plan_saves_exact_bytes_and_marked_config(
    extended_llama: tuple[Path, Plan],
) -> None:
    out, plan = extended_llama
    extended = {a.path: format_by_name(a.format) for a in plan.assignments}
    extended = {p: f for p, f in extended.items() if not f.native}
    assert extended, "at 4.5 bpw the allocator picks extended formats for this model"
    assert weight_bytes(out) == plan.total_bytes <= plan.budget
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mint-mlx/llama"
    assert config["mint_mlx"] == {"model_type": "llama", "format_version": 1}
    for a in plan.assignments:
        assert config["quantization"][a.path] == format_by_name(a.format).quantization_entry()
    header = read_header(out / "model.safetensors")
    compact = [p for p, f in extended.items() if f.mode == "affine_cs"]
    assert compact
    for path in compact:
        assert header[f"{path}.weight"]["dtype"] == "U32"
        assert header[f"{path}.scales"]["dtype"] == "U8"
        assert header[f"{path}.biases"]["dtype"] == "I8"
        assert header[f"{path}.super_scales"]["dtype"] == "BF16"
        assert header[f"{path}.super_scales"]["shape"][-1] == 2
    card = (out / "README.md").read_text()
    assert "mint_mlx.load" in card and "mint_mlx.generate" in card


def test_stock_mlx_lm_refuses_by_name(extended_llama: tuple[Path, Plan]) -> None:
    from mlx_lm import load

    with pytest.raises(ValueError, match="Model type mint-mlx/llama not supported"):
        load(str(extended_llama[0]))


def test_mint_load_computes_what_was_saved(extended_llama: tuple[Path, Plan]) -> None:
    out, plan = extended_llama
    model, _ = mint_mlx.load(out, lazy=True)
    types = layer_types(model)
    for a in plan.assignments:
        fmt = format_by_name(a.format)
        if not fmt.is_quantized:
            continue
        want = (
            (ExtendedQuantizedEmbedding if "embed" in a.path else ExtendedQuantizedLinear)
            if not fmt.native
            else (nn.QuantizedEmbedding if "embed" in a.path else nn.QuantizedLinear)
        )
        assert types[a.path] is want, a.path
    # tied head: the embedding's as_linear runs the same arrays as a matmul
    assert_matches_reference(out)


def test_generate_cli_writes_text(extended_llama: tuple[Path, Plan]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mint_mlx.generate", "--model", str(extended_llama[0])]
        + ["--prompt", PROMPT, "--max-tokens", "8", "--ignore-chat-template"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # the text of a random tiny model may be whitespace only: what must hold is that tokens were
    # generated through mint_mlx.load's layers and printed between mlx-lm's separators
    assert run.stdout.count("==========") == 2, run.stdout
    generated = re.search(r"Generation: (\d+) tokens", run.stdout)
    assert generated is not None and int(generated.group(1)) >= 1, run.stdout


def test_evaluate_runs_on_both_backends(
    extended_llama: tuple[Path, Plan],
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = extended_llama[0]
    text = CORPUS[:4000]
    fp32 = evaluate(out, tiny_llama, text, seq_len=32, backend="dequant-fp32")
    native = evaluate(out, tiny_llama, text, seq_len=32, backend="native")
    assert fp32.kld_mean is not None and native.kld_mean is not None
    assert 0.0 < fp32.kld_mean < 1.0
    # bf16 activations on the native path move the numbers a little, not the picture
    assert native.ppl == pytest.approx(fp32.ppl, rel=0.05)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(text)
    args = ["--model", str(out), "--reference", str(tiny_llama), "--text", str(heldout)]
    code = evaluate_main(args + ["--seq-len", "32", "--backend", "dequant-fp32", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(fp32.ppl)


def test_moe_expert_stacks_round_trip(extended_moe: tuple[Path, Plan]) -> None:
    from mlx_lm import generate

    out, plan = extended_moe
    modules = collapse(plan.formats)
    stacks = {p: e for p, e in modules.items() if "switch_mlp" in p}
    per_expert = [p for p, e in stacks.items() if not isinstance(e, Format)]
    whole = [p for p, e in stacks.items() if isinstance(e, Format) and not e.native]
    assert per_expert, "at 4.5 bpw the allocator gives experts of one stack different formats"
    assert any(not f.native for p in per_expert for f, _ in stacks[p])
    model, tokenizer = mint_mlx.load(out)
    types = layer_types(model)
    assert all(types[p] is PerExpertSwitchLinear for p in per_expert)
    assert all(types[p] is ExtendedQuantizedSwitchLinear for p in whole)
    config = json.loads((out / "config.json").read_text())
    assert all(config["quantization"][p]["mode"] == "per_expert" for p in per_expert)
    from mlx_lm import load as stock_mlx_lm_load

    with pytest.raises(ValueError, match="Model type mint-mlx/qwen3_moe not supported"):
        stock_mlx_lm_load(str(out))
    routers = [a.path for a in plan.assignments if a.role == "router"]
    assert routers and all(types[p] is nn.QuantizedLinear for p in routers)
    assert generate(model, tokenizer, prompt=PROMPT, max_tokens=4)
    assert_matches_reference(out)


def test_native_output_is_unchanged_and_mint_load_reads_it(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "native"
    plan = convert(tiny_llama, out, bpw=4.5).plan
    assert all(format_by_name(a.format).native for a in plan.assignments)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "mint_mlx" not in config
    card = (out / "README.md").read_text()
    assert "Loads in stock mlx-lm" in card and "mint_mlx.load" not in card
    assert stock_load(out)["finite"]
    from mlx_lm import load as stock

    tokens = mx.array([[1, 2, 3, 4, 5]])
    mine, want = mint_mlx.load(out)[0](tokens), stock(str(out))[0](tokens)
    assert mx.array_equal(mine, want).item()
    assert_matches_reference(out)


def test_load_errors_are_one_line(extended_llama: tuple[Path, Plan], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no model directory"):
        mint_mlx.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(extended_llama[0], broken)
    config = json.loads((broken / "config.json").read_text())
    path = next(p for p, e in config["quantization"].items() if isinstance(e, dict))
    config["quantization"][path] = {"group_size": 48, "bits": 4, "mode": "affine_cs"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MintError, match=f"{path}: unknown format") as info:
        mint_mlx.load(broken)
    assert "\n" not in str(info.value)
    config["mint_mlx"]["format_version"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MintError, match="format version 2.*upgrade mint-mlx"):
        mint_mlx.load(broken)


def test_candidate_sets_and_cache_keys(tiny_llama: Path) -> None:
    native = formats_for("fisher", "optimized")
    extended = formats_for("fisher", "optimized", "extended")
    assert set(native) < set(extended) and any(not f.native for f in extended)
    # full-scale affine g16 never earned a place (compact g16 dominates it); g256 and every
    # compact group size did
    names = {f.name for f in extended}
    assert "affine-4-g16" not in names and "affine-4-g16-cs" in names
    assert {"affine-4-g256", "affine-4-g32-cs", "affine-4-g64-cs"} <= names
    assert formats_for("paper", "rtn", "extended") == paper_formats()
    assert all(f in formats_for("fisher", "rtn", "extended") for f in formats_for("fisher", "rtn"))
    source = open_source(tiny_llama)
    assert default_cache_path(source, native, mx.bfloat16) != default_cache_path(
        source, extended, mx.bfloat16
    )


def test_paper_mode_keeps_its_eight_configurations(tiny_llama: Path, tmp_path: Path) -> None:
    plan = convert(
        tiny_llama, tmp_path / "o", bpw=4.5, objective="paper", formats="extended", dry_run=True
    ).plan
    assert {a.format for a in plan.assignments} <= {f.name for f in paper_formats()}
    assert any("--formats extended does not apply" in n for n in plan.notes)


def test_plan_and_convert_clis_take_formats(
    tiny_llama: Path,
    extended_llama: tuple[Path, Plan],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # same flags as the extended_llama conversion: the analysis comes from its cache
    budget = extended_llama[1].budget
    report = plan_budgets(tiny_llama, budgets=[str(budget)], formats="extended")
    assert report.points and "cs" in report.points[0].mix
    code = main(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "o"), "--bpw", "4.5"]
        + ["--formats", "extended", "--dry-run", "--quiet"]
    )
    assert code == 0
    assert "compact scales" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_extended_end_to_end(tmp_path: Path) -> None:
    """The real testbed: extended formats get chosen, the output refuses stock mlx-lm, loads
    with mint-mlx, generates text and scores close to its 16-bit reference."""
    from mlx_lm import generate
    from mlx_lm import load as stock

    from mint_mlx.tools.testbeds import ensure_testbed, ensure_wiki_text

    src = ensure_testbed("smollm2-135m", progress=True)
    out = tmp_path / "smollm2-ext"
    plan = convert(src, out, bpw=4.25, formats="extended", jobs=2).plan
    print(json.dumps(plan.distribution(), indent=1))
    assert any(not format_by_name(a.format).native for a in plan.assignments)
    assert weight_bytes(out) == plan.total_bytes <= plan.budget
    with pytest.raises(ValueError, match="mint-mlx/llama"):
        stock(str(out))
    model, tokenizer = mint_mlx.load(out)
    assert generate(model, tokenizer, prompt="The capital of France is", max_tokens=8).strip()
    heldout = ensure_wiki_text() / "heldout.txt"
    result = evaluate(out, src, heldout, tokens=4 * 512, seq_len=512, backend="dequant-fp32")
    print(json.dumps(result.to_json(), indent=1))
    assert result.ppl_reference is not None and result.kld_mean is not None
    assert result.ppl <= 1.5 * result.ppl_reference
