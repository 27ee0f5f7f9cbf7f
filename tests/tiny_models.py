"""Tiny real mlx-lm models in HF format, built in seconds for the fast tests.

They are real in every way that matters to the converter: mlx-lm model classes, HF tensor names
(MoE experts unstacked, as checkpoints on the hub store them), safetensors shards with an index,
and a real trained BPE tokenizer. Only the weights are random (seeded, with heavy-tailed rows so
that quantization error varies across tensors the way it does in trained models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. To be or not to be, that is the question. All that glitters is not gold. "
    "The history of the city dates back to the Roman period, when a small settlement grew "
    "around the river crossing. In the twentieth century the population grew rapidly. "
    "Quantization stores weights in groups that share a scale and a bias. "
) * 20

LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 320,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}

#: Tied embeddings, and a sanitize() that changes the model it runs on (drops lm_head).
GEMMA3_CONFIG: dict[str, Any] = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 64,
    "sliding_window_pattern": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}

QWEN3_MOE_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


def write_tokenizer(out: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer on a small corpus and save it HF-style; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def _random_weights(model: Any, seed: int) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        shape = tuple(p.shape)
        if name.endswith("norm.weight") or len(shape) == 1:
            w = 1.0 + 0.05 * rng.standard_normal(shape)
        else:
            # Heavy-tailed per-row scales: some rows (channels) carry outliers, as in trained models.
            row_scale = np.exp(0.5 * rng.standard_normal(shape[:-1] + (1,)))
            w = 0.05 * row_scale * rng.standard_t(df=4, size=shape)
        weights[name] = mx.array(w.astype(np.float32)).astype(mx.bfloat16)
    return weights


def _unstack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm's stacked ``switch_mlp`` tensors back to the per-expert names of HF checkpoints."""
    out = {}
    for name, w in weights.items():
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            for e in range(w.shape[0]):
                out[f"{prefix}.experts.{e}.{rest}"] = w[e]
        else:
            out[name] = w
    return out


def build_model_dir(out: Path, config: dict[str, Any], seed: int = 0, shards: int = 1) -> Path:
    """Write an HF-format model directory for ``config`` with random weights; return ``out``."""
    from mlx_lm.utils import _get_classes

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    config = dict(config, vocab_size=vocab, eos_token_id=0, bos_token_id=0)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = _random_weights(model, seed)
    if config["model_type"] == "qwen3_moe":
        weights = _unstack_experts(weights)
    names = sorted(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per_shard : (i + 1) * per_shard]
        fname = (
            "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        )
        mx.save_safetensors(str(out / fname), {k: weights[k] for k in part})
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    return out
