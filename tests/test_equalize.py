"""Equivalent scaling (``--equalize``): the folds keep the model's function (checked with
mlx-lm's own forward pass), the analysis measures in the original units what save writes, the
search keeps the exponent that helps, and a conversion loads in stock mlx-lm."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model
from test_gptq import _correlated_inputs

from mint_mlx.analysis.equalize import EXPONENTS, choose_group
from mint_mlx.analysis.measure import measure
from mint_mlx.errors import MintError
from mint_mlx.formats import Format
from mint_mlx.quant import gptq
from mint_mlx.quant.equalize import FOLDS, FoldGroup, Scaling, exact_norm_scale, fold_groups
from mint_mlx.quant.quantize import dequantize_weight, quantize_compensated, quantize_weight
from mint_mlx.source.model import Source, open_source

from tiny_models import LLAMA_CONFIG, build_model_dir


def _groups(source: Source) -> list[FoldGroup]:
    return fold_groups(
        source.model_type, source.config, source.shapes, {t.key for t in source.quantizable}
    )


def _random_scaling(source: Source, seed: int) -> Scaling:
    """Every group scaled by a random ``s`` in [0.3, 3] (norms made exact in bfloat16)."""
    rng = np.random.default_rng(seed)
    scaling = Scaling()
    for g in _groups(source):
        rows = source.shapes[g.target][0]
        s = np.exp(rng.uniform(np.log(0.3), np.log(3.0), rows)).astype(np.float32)
        norm = None
        if g.kind == "norm":
            gamma = np.array(source.tensor(g.target).astype(mx.float32))
            norm, s = exact_norm_scale(gamma, s, g.offset, mx.bfloat16)
        scaling.add(g, s, 1.0, norm)
    return scaling


def _logits(model: object, tokens: mx.array) -> np.ndarray:
    return np.array(model(tokens).astype(mx.float32))  # type: ignore[operator]


#: The other architectures :data:`FOLDS` names, built like the tiny llama: qwen2 has q/k/v
#: biases (the v bias is folded with the v rows), qwen3 norms q and k after projection.
OTHER_FOLDS = {
    "mistral": dict(LLAMA_CONFIG, model_type="mistral", architectures=["MistralForCausalLM"]),
    "qwen2": dict(LLAMA_CONFIG, model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(
        LLAMA_CONFIG, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32
    ),
}


def test_every_known_architecture_is_tested() -> None:
    assert set(FOLDS) == {"llama", "gemma3_text", *OTHER_FOLDS}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3", *OTHER_FOLDS])
def test_folds_keep_the_function(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Scaled consumers and folded norms / rows give the same logits in mlx-lm's forward pass
    (float32, no rounding but the norms' exact 16-bit weights)."""
    if fixture in OTHER_FOLDS:
        path = build_model_dir(tmp_path / fixture, OTHER_FOLDS[fixture])
    else:
        path = request.getfixturevalue(fixture)
    source = open_source(path)
    groups = _groups(source)
    layers = source.num_layers
    # q/k/v, gate/up, down and o per layer: every fold kind, GQA included
    assert len(groups) == 4 * layers
    scaling = _random_scaling(source, 0)
    assert bool(scaling.biases) == (fixture == "qwen2")  # its v_proj bias is folded too
    model, _ = load_model(path)
    model.set_dtype(mx.float32)
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 11, 4]])
    before = _logits(model, tokens)
    changed = []
    for key in source.shapes:
        w = source.tensor(key).astype(mx.float32)
        new = scaling.stored(key, w) if key in source.weights else w
        new = scaling.passthrough(key, new)
        if not mx.array_equal(new, w):
            changed.append(key)
        changed_weight = new.astype(mx.float32)
        model.load_weights([(key, changed_weight)], strict=False)
    after = _logits(model, tokens)
    # every consumer, every norm and every bias folded with its rows moved
    assert len(changed) == 7 * layers + 2 * layers + len(scaling.biases)
    np.testing.assert_allclose(after, before, rtol=2e-3, atol=2e-3 * np.abs(before).max())
    # and a wrong fold is seen: the o_proj scale without its v_proj rows changes the logits
    broken = dict(scaling.rows)
    victim = next(k for k in broken if k.endswith("v_proj.weight"))
    model.load_weights([(victim, source.tensor(victim).astype(mx.float32))], strict=False)
    off = _logits(model, tokens)
    assert np.abs(off - before).max() > 20 * np.abs(after - before).max()


def test_analysis_measures_in_original_units_what_save_writes() -> None:
    """Every row measured: a scaled candidate's weighted error is that of the save's arrays,
    dequantized and unscaled, against the original weight under the original columns; the
    round-to-nearest errors are stock's on the unscaled weight."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    c = rng.uniform(0.1, 5.0, 128).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 128).astype(np.float32)
    fmts = [Format("affine", 4, 64), Format("affine", 3, 32), Format("affine", 8, 64)]
    got = measure(mx.array(w), fmts, mx.bfloat16, mx.array(c), "optimized", None, 0, None, s)
    assert got.wsse is not None and got.rtn_wsse is not None and got.rtn_sse is not None
    scaled = w * s
    assert got.energy == pytest.approx(float((scaled.astype(np.float64) ** 2).sum()), rel=1e-5)
    for i, fmt in enumerate(fmts):
        arrays = quantize_weight(
            mx.array(scaled), fmt, mx.bfloat16, "optimized", mx.array(c / s**2)
        )
        restored = np.array(dequantize_weight(arrays, fmt)) / s
        werr = float((c * (w - restored).astype(np.float64) ** 2).sum())
        assert got.wsse[i] == pytest.approx(werr, rel=1e-4)
        stock = quantize_weight(mx.array(w), fmt, mx.bfloat16, "rtn")
        d = w - np.array(dequantize_weight(stock, fmt))
        assert got.rtn_wsse[i] == pytest.approx(float((c * d.astype(np.float64) ** 2).sum()), 1e-4)
        # stock's relative error, carried against the stored tensor's energy
        rel = float((d.astype(np.float64) ** 2).sum() / (w.astype(np.float64) ** 2).sum())
        assert got.rtn_sse[i] / got.energy == pytest.approx(rel, rel=1e-5)


def test_exact_norm_scale_realizes_what_the_rounded_weight_divides_by() -> None:
    rng = np.random.default_rng(1)
    gamma = np.array(mx.array(rng.uniform(-0.5, 2.0, 256)).astype(mx.bfloat16).astype(mx.float32))
    gamma[:3] = [0.0, -1.0, 1e-30]
    s = rng.uniform(0.5, 2.0, 256).astype(np.float32)
    for offset in (0.0, 1.0):
        stored, realized = exact_norm_scale(gamma, s, offset, mx.bfloat16)
        as_bf16 = np.array(mx.array(stored).astype(mx.bfloat16).astype(mx.float32))
        np.testing.assert_array_equal(stored, as_bf16)  # storable as is
        gain = gamma.astype(np.float64) + offset
        live = gain != 0
        np.testing.assert_allclose(
            (stored.astype(np.float64) + offset)[live] * realized[live], gain[live], rtol=1e-6
        )
        assert np.abs(realized[live] / s[live] - 1).max() < 0.02  # close to the wish
        assert (realized[~live] == 1).all()


def test_search_keeps_the_exponent_that_helps(tiny_llama: Path) -> None:
    """With a few columns far more sensitive than the rest, scaling them up lowers the
    group's error in the reference format, and the search takes a non-zero exponent; with
    flat sensitivities every exponent is the identity and it takes 0."""
    source = open_source(tiny_llama)
    group = next(g for g in _groups(source) if g.name.endswith("attention input"))
    n = source.shapes[group.consumers[0]][1]
    rng = np.random.default_rng(0)
    loud = np.ones(n, np.float32)
    loud[rng.choice(n, 8, replace=False)] = 1e3
    for cols, expect_scaled in ((loud, True), (np.ones(n, np.float32), False)):
        columns = {c: mx.array(cols) for c in group.consumers}
        scaling = Scaling()
        choose_group(source, group, columns, mx.bfloat16, scaling)
        exponent = scaling.exponents[group.name]
        assert (exponent > 0) == expect_scaled
        if expect_scaled:
            assert exponent in EXPONENTS
            s = scaling.columns[group.consumers[0]]
            ref = Format("affine", 4, 64)
            for c in group.consumers:
                w = source.tensor(c)
                base = measure(w, [ref], mx.bfloat16, columns[c], "optimized", None)
                with_s = measure(w, [ref], mx.bfloat16, columns[c], "optimized", None, 0, None, s)
                assert base.wsse is not None and with_s.wsse is not None
            # loud columns are scaled up, quiet ones down
            assert s[cols > 1].min() > s[cols == 1].max()


def test_equalized_conversion_loads_in_stock_mlx_lm(tiny_llama: Path, tmp_path: Path) -> None:
    """The output loads without mint_mlx; its norms are the exact folded weights, and its
    scaled consumers, dequantized and divided by their scales, are the source's weights up to
    rounding (closer than without the division)."""
    from mint_mlx.allocation.prepare import prepare
    from mint_mlx.convert import convert

    from test_convert import stock_load, weight_bytes

    out = tmp_path / "out"
    result = convert(tiny_llama, out, bpw=4.5, equalize=True)
    assert weight_bytes(out) == result.plan.total_bytes <= result.plan.budget
    assert any(n.startswith("equalize:") and "of 8 layer groups" in n for n in result.plan.notes)
    info = stock_load(out)
    assert not info["mint_imported"] and info["finite"]
    source = open_source(tiny_llama)
    prepared = prepare(source, mx.bfloat16, equalize=True)  # the run's, from the caches
    scaling, columns = prepared.scaling, prepared.columns
    assert scaling is not None and columns is not None and scaling.scaled_groups > 0
    curves = {c.path: c for c in prepared.curves}
    saved: dict[str, mx.array] = {}
    for f in out.glob("*.safetensors"):
        saved.update(mx.load(str(f)))  # type: ignore[arg-type]
    for g in _groups(source):
        if g.kind == "norm":
            want = scaling.norms.get(g.target)
            if want is None:
                want = np.array(source.tensor(g.target).astype(mx.float32))
            np.testing.assert_array_equal(np.array(saved[g.target].astype(mx.float32)), want)
    for key, s in scaling.columns.items():
        module = key[: -len(".weight")]
        fmt = result.plan.formats[module]
        if not fmt.is_quantized:
            continue
        arrays = {k: saved[f"{module}.{k}"] for k in ("weight", "scales", "biases")}
        restored = np.array(dequantize_weight(arrays, fmt))
        w = np.array(source.tensor(key).astype(mx.float32))
        row = scaling.rows.get(key)
        unscaled = restored / s * (1.0 if row is None else row[:, None])
        d = np.array(columns[key].astype(mx.float32), np.float64)
        werr = float((d * (unscaled - w).astype(np.float64) ** 2).sum())
        measured = next(c.wsse for c in curves[module].candidates if c.format == fmt.name)
        # exact (these tensors are smaller than the row sample); a row fold is measured
        # unscaled, equal up to the 16-bit rounding of its scales
        assert werr == pytest.approx(measured, rel=1e-3 if row is None else 0.05), key


def test_equalize_needs_the_sensitivity_pass_and_known_wiring(
    tiny_llama: Path, tiny_moe: Path
) -> None:
    from mint_mlx.plan import plan

    with pytest.raises(MintError, match="--objective fisher"):
        plan(tiny_llama, budgets=["1MB"], equalize=True, objective="nrmse")
    with pytest.raises(MintError, match="does not know where to fold"):
        plan(tiny_moe, budgets=["1MB"], equalize=True)


def test_scaled_gptq_measures_the_original_quadratic_form() -> None:
    """With error feedback too: the scaled candidate's weighted error is the original form
    ``dw H dw^T`` of what save writes, unscaled (the correlations do not change under column
    scaling, the Fisher diagonal is divided by ``s^2``)."""
    rng = np.random.default_rng(5)
    n = 128
    w = rng.standard_normal((32, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n).astype(np.float32)
    s = rng.uniform(0.5, 2.0, n).astype(np.float32)
    moments = _correlated_inputs(n, 2).astype(np.float32)
    fmt = Format("affine", 4, 64)
    got = measure(mx.array(w), [fmt], mx.bfloat16, mx.array(c), "gptq", None, 0, moments, s)
    assert got.wsse is not None
    scaling = Scaling(columns={"w": s})
    arrays = quantize_compensated(
        mx.array(w * s),
        fmt,
        mx.bfloat16,
        scaling.columns_for("w", mx.array(c)),
        scaling.moments_for("w", moments),
    )
    delta = w - np.array(dequantize_weight(arrays, fmt)) / s
    h = gptq.factor(moments, c).h
    assert got.wsse[0] == pytest.approx(gptq.row_form(delta, h).sum(), rel=1e-3)
