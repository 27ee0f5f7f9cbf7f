"""Error-compensated rounding (``--scales gptq``): the numerics against an independent float64
OBS loop, the input moments against the layer inputs computed by hand, the analysis against
what save writes, and a conversion that stock mlx-lm loads."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mint_mlx.formats import Format
from mint_mlx.quant import gptq
from mint_mlx.quant.quantize import dequantize_weight, quantize_compensated
from mint_mlx.quant.scales import fit_affine, storage_rounder, unpack_codes


def _correlated_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Second moments of inputs whose neighbouring columns are strongly correlated, with a
    few loud columns (as real activations have)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((4 * n, n))
    x = z + 0.8 * np.roll(z, 1, axis=1) + 0.5 * z[:, :1]
    x[:, rng.choice(n, 4, replace=False)] *= 6.0
    return x.T @ x / x.shape[0]


def _obs_reference(
    w: np.ndarray, bits: int, g: int, c: np.ndarray, moments: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ as the OBS update (float64, one row at a time, no Cholesky, no lazy batches):
    after rounding column j, move the columns not yet rounded by ``-err * Hinv[j, F] /
    Hinv[j, j]`` and remove j from the inverse. Group scales are fitted on the updated weights
    when a group starts. Returns (restored weights, H)."""
    d = np.sqrt(np.diag(moments))
    h = moments / np.outer(d, d) * np.sqrt(np.outer(c, c))
    damped = h + gptq.DAMP * np.mean(np.diag(h)) * np.eye(len(c))
    out = np.empty_like(w, dtype=np.float64)
    for r in range(w.shape[0]):
        row = w[r].astype(np.float64).copy()
        hinv = np.linalg.inv(damped)
        s = b = 0.0
        for j in range(len(c)):
            if j % g == 0:
                fit = fit_affine(
                    mx.array(row[None, j : j + g].astype(np.float32)),
                    bits,
                    g,
                    mx.bfloat16,
                    mx.array(c[j : j + g]),
                )
                s, b = float(fit.scales[0, 0, 0].item()), float(fit.biases[0, 0, 0].item())
            q = np.clip(np.rint((row[j] - b) / s), 0, 2**bits - 1)
            out[r, j] = q * s + b
            err = (row[j] - out[r, j]) / hinv[j, j]
            row[j + 1 :] -= err * hinv[j, j + 1 :]
            hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out, h


@pytest.mark.parametrize(("bits", "group"), [(3, 32), (4, 64)])
def test_feedback_matches_the_obs_update(bits: int, group: int) -> None:
    rng = np.random.default_rng(1)
    n, rows = 256, 4  # two of gptq.BLOCK: the update between blocks counts
    w = rng.standard_normal((rows, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n)
    moments = _correlated_inputs(n)
    f = gptq.factor(moments, c)
    got = gptq.compensated(w, [(bits, group)], c, f, storage_rounder(mx.bfloat16))[0]
    want, h = _obs_reference(w, bits, group, c, moments)
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
    mismatched = np.mean(np.abs(got.restored() - want) > 1e-4)
    assert mismatched < 0.02
    form = gptq.row_form(w - got.restored(), h).sum()
    assert form == pytest.approx(gptq.row_form(w - want, h).sum(), rel=0.02)


def test_uncorrelated_inputs_give_the_plain_fit() -> None:
    """With no correlation between inputs there is nothing to compensate: the codes and
    scales are the fitted scales' own."""
    rng = np.random.default_rng(2)
    n = 256
    w = rng.standard_normal((32, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n).astype(np.float32)
    f = gptq.factor(np.diag(rng.uniform(1.0, 3.0, n)), c)
    for r in gptq.compensated(w, [(4, 64), (3, 32)], c, f, storage_rounder(mx.bfloat16)):
        fit = fit_affine(mx.array(w), r.bits, r.group_size, mx.bfloat16, mx.array(c), pack=True)
        assert fit.packed is not None
        np.testing.assert_array_equal(np.array(fit.scales)[..., 0], r.scales)
        np.testing.assert_array_equal(np.array(unpack_codes(fit.packed, r.bits)), r.codes)


def test_feedback_lowers_the_output_error_in_every_format() -> None:
    rng = np.random.default_rng(3)
    n = 256
    w = rng.standard_normal((48, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n).astype(np.float32)
    f = gptq.factor(_correlated_inputs(n, 4), c)
    specs = [(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)]
    for r in gptq.compensated(w, specs, c, f, storage_rounder(mx.bfloat16)):
        fit = fit_affine(mx.array(w), r.bits, r.group_size, mx.bfloat16, mx.array(c), pack=True)
        assert fit.packed is not None
        plain = gptq.Rounded(
            r.bits,
            r.group_size,
            np.array(unpack_codes(fit.packed, r.bits), np.float32),
            np.array(fit.scales)[..., 0],
            np.array(fit.biases)[..., 0],
        )
        fed = gptq.row_form(w - r.restored(), f.h).sum()
        assert fed < 0.9 * gptq.row_form(w - plain.restored(), f.h).sum(), (r.bits, r.group_size)


def test_saved_arrays_are_what_was_rounded() -> None:
    """The packed codes, scales and biases save writes dequantize (with MLX) to the weights
    the feedback loop produced."""
    rng = np.random.default_rng(5)
    n = 128
    w = rng.standard_normal((16, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n).astype(np.float32)
    moments = _correlated_inputs(n, 6)
    fmt = Format("affine", 4, 32)
    arrays = quantize_compensated(mx.array(w), fmt, mx.bfloat16, mx.array(c), moments)
    got = np.array(dequantize_weight(arrays, fmt))
    f = gptq.factor(moments, c)
    want = gptq.compensated(w, [(4, 32)], c, f, storage_rounder(mx.bfloat16))[0].restored()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_input_moments_are_the_layer_inputs(tiny_llama: Path) -> None:
    """q/k/v share one matrix: the normed hidden state's x^T x per token, computed here from
    the model's own modules."""
    from mlx_lm.utils import load_model

    from mint_mlx.sensitivity.inputs import collect_input_moments
    from mint_mlx.source.model import cast_to_float32, open_source

    source = open_source(tiny_llama)
    model, _ = load_model(tiny_llama)
    cast_to_float32(model)
    tokens = mx.array(np.random.default_rng(0).integers(0, 200, (2, 17)))
    keys = [t.key for t in source.quantizable]
    matrices, aliases = collect_input_moments(model, tokens, keys)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert aliases["model.layers.0.self_attn.k_proj.weight"] == aliases[q] == q
    assert aliases["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert "model.embed_tokens.weight" not in aliases
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens[:, :-1]))
    flat = np.array(x.reshape(-1, x.shape[-1]), np.float64)
    np.testing.assert_allclose(
        np.array(matrices[q]), flat.T @ flat / flat.shape[0], rtol=1e-4, atol=1e-6
    )


def test_analysis_error_is_the_error_of_what_save_writes() -> None:
    """Measured on every row, a compensated candidate's weighted error is the quadratic form
    of the arrays save writes."""
    from mint_mlx.analysis.measure import measure

    rng = np.random.default_rng(7)
    n = 128
    w = rng.standard_normal((40, n)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, n).astype(np.float32)
    moments = _correlated_inputs(n, 8)
    fmts = [Format("affine", 4, 64), Format("affine", 3, 32)]
    got = measure(mx.array(w), fmts, mx.bfloat16, mx.array(c), "gptq", None, 0, moments)
    assert got.wsse is not None and got.rtn_wsse is not None
    h = gptq.factor(moments, c).h
    for i, fmt in enumerate(fmts):
        arrays = quantize_compensated(mx.array(w), fmt, mx.bfloat16, mx.array(c), moments)
        delta = w - np.array(dequantize_weight(arrays, fmt))
        assert got.wsse[i] == pytest.approx(gptq.row_form(delta, h).sum(), rel=1e-4)
        assert got.sse[i] == pytest.approx(float((delta.astype(np.float64) ** 2).sum()), rel=1e-4)
        g, bits = fmt.group_size, fmt.bits
        wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=g, bits=bits)
        s, b = s.astype(mx.float32), b.astype(mx.float32)
        stock = mx.dequantize(wq, s, b, group_size=g, bits=bits, dtype=mx.float32)
        rtn = gptq.row_form(w - np.array(stock), h).sum()
        assert got.rtn_wsse[i] == pytest.approx(rtn, rel=1e-3)


def test_gptq_conversion_loads_in_stock_mlx_lm(tiny_llama: Path, tmp_path: Path) -> None:
    from mint_mlx.allocation.allocate import Plan
    from mint_mlx.convert import convert

    from test_convert import stock_load, weight_bytes

    out = tmp_path / "out"
    result = convert(tiny_llama, out, bpw=4.5, scales="gptq")
    assert weight_bytes(out) == result.plan.total_bytes <= result.plan.budget
    assert Plan.load(out / "mint_plan.json").scales == "gptq"
    assert any("gptq: error-compensated" in n for n in result.plan.notes)
    info = stock_load(out)
    assert not info["mint_imported"] and info["finite"]


def test_gptq_needs_the_sensitivity_pass(tiny_llama: Path) -> None:
    from mint_mlx.errors import MintError
    from mint_mlx.plan import plan

    with pytest.raises(MintError, match="--objective fisher"):
        plan(tiny_llama, budgets=["1MB"], scales="gptq", objective="nrmse")
