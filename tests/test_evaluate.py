"""Fast tests of mint_mlx.tools.evaluation on tiny random llama models with a real (trained) BPE tokenizer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, mixtral
from mlx_lm.utils import quantize_model, save_config, save_model

from mint_mlx.errors import SourceError
from mint_mlx.source.model import cast_to_float32
from mint_mlx.tools import evaluate as cli
from mint_mlx.tools import evaluation as ev
from mint_mlx.tools.evaluation.kld import compare_cached

SENTENCES = [
    "The cat sat on the mat and looked at the dog.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "In 1905 the physicist published four papers that changed science.",
    "Rivers flow to the sea, and the sea returns water to the clouds.",
    "She read the old book by candle light until the morning came.",
    "Numbers such as 42, 1024 and 3.14 appear in many texts.",
]
TEXT = " ".join(SENTENCES * 12)
SEQ = 32

LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

MIXED = {
    # path -> per-layer quantization; anything else gets the 4-bit g32 affine default
    "model.embed_tokens": {"group_size": 32, "bits": 6, "mode": "affine"},
    "model.layers.0.self_attn.q_proj": {"group_size": 16, "bits": 4, "mode": "nvfp4"},
    "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    "model.layers.1.mlp.up_proj": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
    "model.layers.1.self_attn.v_proj": {"group_size": 64, "bits": 3, "mode": "affine"},
}


def _write_tokenizer(out: Path) -> int:
    """Train a small byte-level BPE on the sentences; write HF tokenizer files; return vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "<|endoftext|>",
                "add_bos_token": False,
            }
        )
    )
    return tok.get_vocab_size()


def _save(out: Path, model: nn.Module, config: dict, tok_dir: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    return out


def _tiny_llama(vocab: int, seed: int = 0) -> tuple[nn.Module, dict]:
    mx.random.seed(seed)
    config = dict(LLAMA_CONFIG, vocab_size=vocab)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Larger than default init so that logits are far from uniform and KL is informative.
    model.update(tree_map(lambda a: a * 4.0 if a.ndim == 2 else a, model.parameters()))
    model.set_dtype(mx.bfloat16)  # like real checkpoints: bf16 weights give bf16 scales
    mx.eval(model.parameters())
    return model, config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = root / "tok"
    vocab = _write_tokenizer(tok_dir)
    paths: dict[str, Path] = {}

    model, config = _tiny_llama(vocab)
    paths["ref"] = _save(root / "ref", model, config, tok_dir)
    weights = dict(tree_flatten(model.parameters()))

    for eps in (0.01, 0.03, 0.1):
        noisy, _ = _tiny_llama(vocab)
        mx.random.seed(123)
        noisy.load_weights(
            [
                (k, (v.astype(mx.float32) + eps * mx.random.normal(v.shape)).astype(v.dtype))
                for k, v in weights.items()
            ]
        )
        paths[f"noisy{eps}"] = _save(root / f"noisy{eps}", noisy, config, tok_dir)

    q4, _ = _tiny_llama(vocab)
    q4, q4_config = quantize_model(q4, config, group_size=32, bits=4)
    paths["q4g32"] = _save(root / "q4g32", q4, q4_config, tok_dir)

    mixed, _ = _tiny_llama(vocab)
    mixed, mixed_config = quantize_model(
        mixed, config, group_size=32, bits=4, quant_predicate=lambda p, m: MIXED.get(p, True)
    )
    paths["mixed"] = _save(root / "mixed", mixed, mixed_config, tok_dir)
    paths["tok"] = tok_dir
    return paths


def _native_fp32_logits(path: Path, batch: mx.array) -> mx.array:
    """The real quantized layers, with float32 activations (never bf16 on a CPU)."""
    model, _ = ev.load_for_eval(path, backend="native")
    cast_to_float32(model)
    return model(batch).astype(mx.float32)


def _windows(path: Path, seq_len: int = SEQ) -> mx.array:
    _, tok = ev.load_for_eval(path, backend="dequant-fp32")
    return ev.make_windows(tok, TEXT, seq_len)


# ------------------------------------------------------------------------------------ backends


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ev.resolve_backend("native") == "native"
    assert ev.resolve_backend("dequant-fp32") == "dequant-fp32"
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert ev.resolve_backend("auto") == "dequant-fp32"
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert ev.resolve_backend("auto") == "native"
    with pytest.raises(ev.EvaluateError):
        ev.resolve_backend("gpu")


def _python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS preload is a Linux matter")
def test_openblas_is_an_entry_point_step() -> None:
    """Running a CLI module loads OpenBLAS ahead of mlx.core; importing mint_mlx or the library
    modules (the CLI modules included) has no such side effect; and use_openblas() once mlx.core
    is imported is too late, and says so. Each case in a fresh process."""
    from mint_mlx.blas import find_openblas

    path = find_openblas()
    if path is None:
        pytest.skip("no OpenBLAS installed (apt install libopenblas0-pthread)")
    # the system OpenBLAS we load, not numpy's bundled copy (libscipy_openblas64_), which any
    # numpy import maps
    directory = os.path.dirname(os.path.realpath(path))
    maps = f"any({directory!r} in line for line in open('/proc/self/maps'))"
    report = f"import mint_mlx.blas as b; print(b.openblas_active(), {maps})"
    for cli_module in ("mint_mlx.tools.evaluate", "mint_mlx.tools.testbed"):
        run = (
            f"import runpy, sys; sys.argv = ['{cli_module}', '--help']\n"
            f"try:\n    runpy.run_module({cli_module!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
        )
        assert _python(run + report).splitlines()[-1] == "True True", cli_module
    libraries = (
        "mint_mlx, mint_mlx.tools.evaluation, mint_mlx.tools.testbeds, "
        "mint_mlx.tools.evaluate, mint_mlx.tools.testbed"
    )
    code = f"import {libraries}, mlx.core; {report}"
    assert _python(code) == "False False"
    # mlx.core imported first: too late, and use_openblas says so instead of pretending.
    code = f"import mlx.core, mint_mlx.blas as b; print(b.use_openblas(), {maps})"
    assert _python(code) == "False False"


@pytest.mark.parametrize("name", ["q4g32", "mixed"])
def test_backends_give_same_logits(tiny: dict[str, Path], name: str) -> None:
    batch = _windows(tiny["ref"])[:2]
    native = _native_fp32_logits(tiny[name], batch)
    model, _ = ev.load_for_eval(tiny[name], backend="dequant-fp32")
    deq = model(batch)
    assert deq.dtype == mx.float32
    scale = mx.abs(native).max().item()
    err = mx.abs(native - deq).max().item()
    assert err <= 1e-3 * scale, (err, scale)


def test_dequant_backend_is_all_float32_and_unquantized(tiny: dict[str, Path]) -> None:
    model, _ = ev.load_for_eval(tiny["mixed"], backend="dequant-fp32")
    for _, module in model.named_modules():
        assert not isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    for _, arr in tree_flatten(model.parameters()):
        assert arr.dtype == mx.float32


def test_dequant_uses_float32_scales(tiny: dict[str, Path]) -> None:
    """The dequantized weight equals mx.dequantize with scales/biases cast to float32 first."""
    from mlx_lm.utils import load_model

    qmodel, config = load_model(tiny["q4g32"])
    assert qmodel.model.layers[0].mlp.gate_proj.scales.dtype == mx.bfloat16
    q = qmodel.model.layers[0].mlp.gate_proj
    expect = mx.dequantize(
        q.weight,
        q.scales.astype(mx.float32),
        q.biases.astype(mx.float32),
        32,
        4,
        dtype=mx.float32,
    )
    model, _ = ev.load_for_eval(tiny["q4g32"], backend="dequant-fp32")
    assert mx.array_equal(model.model.layers[0].mlp.gate_proj.weight, expect).item()


def test_mixed_config_layers_really_differ(tiny: dict[str, Path]) -> None:
    """The mixed model really carries per-layer modes (else the logits test proves less)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny["mixed"])
    modes = {
        (m.mode, m.bits, m.group_size)
        for _, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
    }
    assert {
        ("nvfp4", 4, 16),
        ("mxfp4", 4, 32),
        ("mxfp8", 8, 32),
        ("affine", 3, 64),
        ("affine", 6, 32),
        ("affine", 4, 32),
    } <= modes


@pytest.mark.parametrize("recipe", ["affine+mxfp4", "nvfp4-global-scale"])
def test_moe_switch_layers_dequantize(tmp_path: Path, tiny: dict[str, Path], recipe: str) -> None:
    """QuantizedSwitchLinear (stacked experts) -> float32 SwitchLinear, same logits; including
    nvfp4 with one tensor scale per expert."""
    vocab = json.loads((tiny["tok"] / "tokenizer.json").read_text())["model"]["vocab"]
    config = {
        "model_type": "mixtral",
        "vocab_size": len(vocab) + 2,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    mx.random.seed(1)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    if recipe == "nvfp4-global-scale":
        original = model.model.layers[0].block_sparse_moe.switch_mlp.up_proj.weight
        model, qconfig = quantize_model(model, config, 16, 4, mode="nvfp4", global_scale=True)
        gs = model.model.layers[0].block_sparse_moe.switch_mlp.up_proj.global_scale
        assert gs is not None and gs.shape == (4,)
        path = _save(tmp_path / "moe", model, qconfig, tiny["tok"])
        # CPU gather_qmm has no global scale, so compare with the unquantized weights instead:
        # a dropped or misapplied per-expert scale would be off by orders of magnitude.
        deq_model, _ = ev.load_for_eval(path, backend="dequant-fp32")
        w = deq_model.model.layers[0].block_sparse_moe.switch_mlp.up_proj.weight
        rel = (mx.linalg.norm(w - original) / mx.linalg.norm(original)).item()
        assert w.dtype == mx.float32 and rel < 0.2, rel
        return
    else:
        model, qconfig = quantize_model(
            model,
            config,
            group_size=32,
            bits=4,
            quant_predicate=lambda p, m: (
                {"group_size": 32, "bits": 4, "mode": "mxfp4"}
                if p.endswith("switch_mlp.down_proj")
                else True
            ),
        )
    path = _save(tmp_path / "moe", model, qconfig, tiny["tok"])
    batch = _windows(tiny["ref"])[:1, :8]
    native = _native_fp32_logits(path, batch)
    deq_model, _ = ev.load_for_eval(path, backend="dequant-fp32")
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    layer = deq_model.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    assert isinstance(layer, SwitchLinear) and not isinstance(layer, QuantizedSwitchLinear)
    deq = deq_model(batch)
    assert mx.abs(native - deq).max().item() <= 1e-3 * mx.abs(native).max().item()


# ------------------------------------------------------------------------------------ metrics


def test_kld_against_itself_is_zero(tiny: dict[str, Path]) -> None:
    r = ev.evaluate(tiny["ref"], tiny["ref"], TEXT, seq_len=SEQ, batch_size=2)
    assert r.n_windows >= 3 and r.n_tokens == r.n_windows * (SEQ - 1)
    assert r.kld_mean == 0.0 and r.kld_p99 == 0.0
    assert r.top1_agreement == 1.0
    assert r.ppl == r.ppl_reference
    assert r.backend == "dequant-fp32"


def test_kld_grows_with_perturbation(tiny: dict[str, Path]) -> None:
    klds = []
    for eps in (0.01, 0.03, 0.1):
        r = ev.evaluate(tiny[f"noisy{eps}"], tiny["ref"], TEXT, seq_len=SEQ)
        assert r.kld_mean is not None and r.kld_mean > 0
        assert r.kld_median is not None and r.kld_p99 is not None
        assert r.kld_median <= r.kld_p99
        klds.append(r.kld_mean)
    assert klds[0] < klds[1] < klds[2], klds


def test_quantized_kld_positive(tiny: dict[str, Path]) -> None:
    r = ev.evaluate(tiny["q4g32"], tiny["ref"], Path(_text_file(tiny)), seq_len=SEQ, tokens=100)
    assert r.n_windows == 100 // SEQ
    assert r.kld_mean is not None and r.kld_mean > 0
    assert r.top1_agreement is not None and 0 < r.top1_agreement <= 1


def _text_file(tiny: dict[str, Path]) -> Path:
    p = tiny["tok"] / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_perplexity_matches_mlx_lm_eval_ppl(tiny: dict[str, Path]) -> None:
    from mlx_lm.perplexity import eval_ppl

    windows = _windows(tiny["q4g32"])
    model, _ = ev.load_for_eval(tiny["q4g32"], backend="dequant-fp32")
    expect, _ = eval_ppl(model, windows, batch_size=3)
    ours = ev.perplexity(tiny["q4g32"], np.array(windows), backend="dequant-fp32", batch_size=2)
    assert math.isclose(ours, expect, rel_tol=1e-3), (ours, expect)
    # the text path builds the same windows
    assert math.isclose(ev.perplexity(tiny["q4g32"], TEXT, seq_len=SEQ), ours, rel_tol=1e-6)


def test_windows_bos_and_token_limit() -> None:
    w = ev.windows_from_tokens(list(range(100)), 10)
    assert w.shape == (10, 10) and w[1, 0].item() == 10
    w = ev.windows_from_tokens(list(range(100)), 10, tokens=35)
    assert w.shape == (3, 10)
    w = ev.windows_from_tokens(list(range(100)), 10, bos_id=7)
    assert w.shape == (11, 10) and (np.array(w[:, 0]) == 7).all() and w[1, 1].item() == 9
    with pytest.raises(ev.EvaluateError):
        ev.windows_from_tokens([1, 2, 3], 10)


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    from mint_mlx.errors import MintError

    with pytest.raises(MintError, match="config.json"):
        ev.evaluate(tmp_path / "nope", None, TEXT)


def test_cli_json_and_ppl_only(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    text = _text_file(tiny)
    assert (
        cli.main(
            [
                "--model",
                str(tiny["q4g32"]),
                "--reference",
                str(tiny["ref"]),
                "--text",
                str(text),
                "--seq-len",
                str(SEQ),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["kld_mean"] > 0 and out["n_tokens"] > 0 and out["backend"] == "dequant-fp32"
    assert cli.main(["--model", str(tiny["ref"]), "--text", str(text), "--seq-len", str(SEQ)]) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "KLD" not in printed
    assert cli.main(["--model", str(tiny["ref"]) + "-missing", "--text", str(text)]) == 2


def test_unknown_quantized_layers_are_refused_not_guessed() -> None:
    class Odd(nn.QuantizedLinear):
        pass

    model = nn.Sequential(Odd(32, 8, group_size=32, bits=4))
    with pytest.raises(ev.EvaluateError, match="dequantized_weight"):
        ev.dequantize_to_float32(model)

    class WithHook(Odd):
        def dequantized_weight(self) -> mx.array:
            return mx.dequantize(self.weight, self.scales, self.biases, 32, 4)

    layer = WithHook(32, 8, group_size=32, bits=4)
    model = nn.Sequential(layer)
    x = mx.random.normal((2, 32))
    expect = layer(x)
    ev.dequantize_to_float32(model)
    assert isinstance(model.layers[0], nn.Linear)
    assert mx.allclose(model(x), expect, atol=1e-5).item()


# ------------------------------------------------------------------------------ many models

#: KL against a float16-cached reference: the rounding of log-probabilities (relative 2^-11,
#: renormalized in float32) moves the mean KLD by ~2e-6 relative (measured on these models) and
#: single tokens (median, p99) by up to ~2e-4; the bounds leave a margin of about 5x.
KLD_RTOL = {"kld_mean": 1e-4, "kld_median": 1e-3, "kld_p99": 1e-3}
KLD_ATOL = 1e-5  # per token against itself: ~1e-6


def test_evaluate_many_matches_evaluate(tiny: dict[str, Path], tmp_path: Path) -> None:
    """One reference pass, cached in float16, gives evaluate()'s numbers: reference PPL exactly,
    PPL and top-1 agreement to float32 rounding (numpy on one side, MLX on the other), KLD to the
    fp16 rounding of the reference."""
    names = ["q4g32", "mixed", "noisy0.1", "ref"]
    many = ev.evaluate_many(
        [tiny[n] for n in names], tiny["ref"], TEXT, seq_len=SEQ, batch_size=2, cache_dir=tmp_path
    )
    for name, got in zip(names, many, strict=True):
        want = ev.evaluate(tiny[name], tiny["ref"], TEXT, seq_len=SEQ, batch_size=2)
        assert got.n_tokens == want.n_tokens and got.n_windows == want.n_windows
        assert got.ppl == pytest.approx(want.ppl, rel=1e-6), name
        assert got.ppl_reference == want.ppl_reference, name
        assert abs(got.top1_agreement - want.top1_agreement) <= 1.0 / got.n_tokens, name
        for field in ("kld_mean", "kld_median", "kld_p99"):
            a, b = getattr(got, field), getattr(want, field)
            assert a is not None and b is not None
            assert abs(a - b) <= KLD_RTOL[field] * b + KLD_ATOL, (name, field, a, b)
    assert many[-1].kld_mean is not None and many[-1].kld_mean < 1e-6  # itself: ~0
    assert many[0].kld_mean is not None and many[0].kld_mean > 100 * KLD_ATOL


def test_reference_cache_is_reused_and_keyed(tiny: dict[str, Path], tmp_path: Path) -> None:
    first = ev.build_reference_cache(tiny["ref"], TEXT, tmp_path, seq_len=SEQ, batch_size=3)
    assert first.seconds > 0 and first.logprobs().dtype == np.float16
    assert first.logprobs().shape == (first.n_windows, SEQ - 1, first.vocab)
    # the stored log-probabilities are the reference's, rounded to float16
    model, _ = ev.load_for_eval(tiny["ref"], backend="dequant-fp32")
    z = model(mx.array(first.windows[:1, :-1])).astype(mx.float32)
    lp = np.array(z - mx.logsumexp(z, axis=-1, keepdims=True))
    assert np.allclose(first.logprobs()[0], lp, rtol=2e-3, atol=1e-3)
    again = ev.build_reference_cache(tiny["ref"], TEXT, tmp_path, seq_len=SEQ, batch_size=3)
    assert again.directory == first.directory and again.seconds == 0.0
    assert again.ppl == first.ppl
    # per-window means, in window order, average to the overall mean (equal window lengths)
    r = ev.evaluate_cached(tiny["noisy0.1"], first, batch_size=2, per_window=True)
    assert r.kld_windows is not None and len(r.kld_windows) == first.n_windows
    assert r.kld_mean is not None and np.isclose(np.mean(r.kld_windows), r.kld_mean, rtol=1e-9)
    assert len(set(r.kld_windows)) == first.n_windows  # really one number per window
    other = ev.build_reference_cache(tiny["ref"], TEXT, tmp_path, seq_len=SEQ, tokens=4 * SEQ)
    assert other.directory != first.directory and other.n_windows == 4
    # an interrupted build (no meta.json) is rebuilt, not trusted
    (first.directory / "meta.json").unlink()
    rebuilt = ev.build_reference_cache(tiny["ref"], TEXT, tmp_path, seq_len=SEQ, batch_size=3)
    assert rebuilt.seconds > 0 and rebuilt.directory == first.directory


def test_cli_several_models(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    text = _text_file(tiny)
    args = ["--model", str(tiny["q4g32"]), "--model", str(tiny["noisy0.01"])]
    args += ["--reference", str(tiny["ref"]), "--text", str(text), "--seq-len", str(SEQ)]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["kld_mean"] > out[1]["kld_mean"] > 0  # 4-bit is further away than 1% noise
    assert cli.main(args[:4] + ["--text", str(text)]) == 2  # several models, no reference


def test_cached_comparison_matches_a_direct_float64_computation() -> None:
    """The chunked numpy comparison (row chunks and reused buffers) gives, for every position,
    what a direct whole-array computation gives: a row count that is not a multiple of the chunk
    and a vocabulary wider than it included."""
    rng = np.random.default_rng(0)
    batch, seq, vocab = 3, 7, 53  # 21 positions: two full chunks of 8 and a partial one
    zq = (rng.standard_normal((batch, seq, vocab)) * 3).astype(np.float32)
    zp = zq + rng.standard_normal((batch, seq, vocab)).astype(np.float32)
    lp64 = zp - np.log(np.exp(zp.astype(np.float64)).sum(-1, keepdims=True))
    lp16 = lp64.astype(np.float16)
    targets = rng.integers(0, vocab, (batch, seq))
    top1_ref = lp64.argmax(-1)
    top1_ref[0, 0] = (zq[0, 0].argmax() + 1) % vocab  # one sure disagreement
    nll, kld, same = compare_cached(zq, lp16, top1_ref, targets)

    lq = zq.astype(np.float64)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    p = lp16.astype(np.float64)
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    want_kld = (np.exp(p) * (p - lq)).sum(-1)
    want_nll = -np.take_along_axis(lq, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kld, want_kld, rtol=1e-4, atol=1e-6)
    assert kld.shape == nll.shape == same.shape == (batch, seq)
    np.testing.assert_array_equal(same, zq.argmax(-1) == top1_ref)
    assert same[0, 0] == 0 and 0 < same.sum() < batch * seq


def test_missing_model_path_says_whether_it_reads_as_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Evaluation never downloads: a missing "org/name" gets a hint that it looks like a hub id,
    # a missing local path does not (the message would mislead there).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as hub:
        ev.load_for_eval("HuggingFaceTB/SmolLM2-135M", backend="dequant-fp32")
    assert "reads as a hub id" in str(hub.value) and "\n" not in str(hub.value)
    with pytest.raises(SourceError) as local:
        ev.load_for_eval(tmp_path / "no-such-model", backend="dequant-fp32")
    assert "not a model directory" in str(local.value)
    assert "hub id" not in str(local.value)
