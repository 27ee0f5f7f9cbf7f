"""The block-streamed sensitivity pass computes what the in-memory pass computes.

Expected values come from the in-memory pass (one ``nn.value_and_grad`` over the whole model,
:func:`mint_mlx.sensitivity.calibrate.column_fisher`), which shares none of the streamed pass's stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mint_mlx.sensitivity.calibrate import column_fisher, load_float32_model
from mint_mlx.sensitivity.sampling import sample_sequences
from mint_mlx.sensitivity.streamed import (
    STREAMABLE_ARCHITECTURES,
    streamed_column_fisher,
    streamed_sample,
)
from mint_mlx.source.model import open_source

from tiny_models import GEMMA3_CONFIG, LLAMA_CONFIG, QWEN3_MOE_CONFIG, build_model_dir

_DENSE = {k: LLAMA_CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
_DENSE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
_DENSE |= {"rope_theta": 10000.0, "max_position_embeddings": 512, "torch_dtype": "bfloat16"}

#: One tiny model per architecture the streamed pass supports (tied and untied heads, sliding
#: and global attention, two MoE layouts).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": LLAMA_CONFIG,
    "llama-untied": dict(LLAMA_CONFIG, tie_word_embeddings=False),
    "mistral": dict(_DENSE, model_type="mistral", tie_word_embeddings=False),
    "qwen2": dict(_DENSE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_DENSE, model_type="qwen3", head_dim=32, tie_word_embeddings=False),
    "gemma3_text": GEMMA3_CONFIG,
    "qwen3_moe": QWEN3_MOE_CONFIG,
    "mixtral": dict(_DENSE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
}


def test_every_streamable_architecture_is_tested() -> None:
    assert {c["model_type"] for c in CONFIGS.values()} == set(STREAMABLE_ARCHITECTURES)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streamed")
    return {name: build_model_dir(root / name, cfg) for name, cfg in CONFIGS.items()}


def _relative_error(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert a.keys() == b.keys()
    return max((mx.abs(a[k] - b[k]).max() / mx.abs(a[k]).max()).item() for k in a)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_pass_equals_in_memory_pass(models: dict[str, Path], name: str) -> None:
    source = open_source(models[name])
    model = load_float32_model(source)
    sequences = sample_sequences(model, 0, 3, 48, seed=1)
    keys = [t.key for t in source.quantizable]
    expected = column_fisher(model, sequences, keys)
    del model
    for on_disk in (False, True):
        got = streamed_column_fisher(source, sequences, keys, activations_on_disk=on_disk)
        assert _relative_error(expected, got) < 1e-4, (name, on_disk)
    # the source is left as it was: a second pass gives the same numbers
    again = streamed_column_fisher(source, sequences, keys)
    assert _relative_error(expected, again) < 1e-4


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen3_moe"])
def test_streamed_sampler_samples_the_same_tokens(models: dict[str, Path], name: str) -> None:
    source = open_source(models[name])
    expected = sample_sequences(load_float32_model(source), 0, 3, 32, seed=5)
    got = streamed_sample(source, 0, 3, 32, seed=5)
    assert mx.array_equal(expected, got).item()
    other_seed = streamed_sample(source, 0, 3, 32, seed=6)
    assert not mx.array_equal(expected, other_seed).item()


def test_short_sequences_are_batched_into_units_of_summed_gradients(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences shorter than ``UNIT_TOKENS`` go through one backward per unit: the estimate is
    the mean over units of (the sum of the unit's per-sequence gradients)^2 / its tokens, row
    averaged and floored; both passes compute it. Expected from one gradient per sequence."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mint_mlx.sensitivity import fisher

    monkeypatch.setattr(fisher, "UNIT_TOKENS", 64)  # 32-token sequences: units of 2
    source = open_source(models["llama"])
    model = load_float32_model(source)
    sequences = sample_sequences(model, 0, 4, 32, seed=2)
    keys = [t.key for t in source.quantizable]

    def loss_fn(m: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x), y, reduction="sum")

    grad_fn = nn.value_and_grad(model, loss_fn)
    per_sequence = []
    for i in range(4):
        _, g = grad_fn(model, sequences[i : i + 1, :-1], sequences[i : i + 1, 1:])
        per_sequence.append(dict(tree_flatten(g)))
    expected = {}
    for key in keys:
        units = [per_sequence[a][key] + per_sequence[a + 1][key] for a in (0, 2)]
        v = sum((u * u).mean(axis=-2) / (2 * 31) for u in units) / 2
        expected[key] = v + fisher.FLOOR * v.mean()
    got = column_fisher(model, sequences, keys)
    assert _relative_error(expected, got) < 1e-4
    del model
    streamed = streamed_column_fisher(source, sequences, keys)
    assert _relative_error(expected, streamed) < 1e-4
