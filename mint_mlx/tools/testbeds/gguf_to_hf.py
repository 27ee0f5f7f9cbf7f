"""GGUF -> HF-format bf16 model directory, for llama (SmolLM2) and ``gemma3_text``: tensor
names, llama.cpp's layout conventions undone, ``config.json``, weights dithered on the way."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mint_mlx.tools.testbeds.dither import DITHER, SEED, block_steps, dither
from mint_mlx.tools.testbeds.gguf_tokenizers import (
    gguf_field,
    write_gpt2_tokenizer,
    write_spm_tokenizer,
)
from mint_mlx.tools.testbeds.wheels import TestbedError


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (convert_hf_to_gguf.py).

    llama.cpp reorders each head's rows from HF's "rotate half" layout (first half, second half)
    to interleaved pairs: ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. This inverts it.
    ``n_head`` is the number of heads of *this* tensor (KV heads for K).
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward ``permute`` (HF -> GGUF row order); the inverse of the above."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _map_gguf_name(
    gguf_name: str, arch: str, global_names: dict[str, str], layer_names: dict[str, str]
) -> str:
    """HF tensor name of a GGUF tensor name, from one architecture's two name tables."""
    if gguf_name in global_names:
        return global_names[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    raise TestbedError(
        f"unknown GGUF {arch} tensor {gguf_name!r}; the testbed builder needs updating"
    )


def hf_name(gguf_name: str) -> str:
    """HF llama tensor name of a GGUF llama tensor name."""
    return _map_gguf_name(gguf_name, "llama", _GLOBAL_NAMES, _LAYER_NAMES)


def _f32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.99999974e-06 -> 1e-05)."""
    return float(f"{np.float32(x):.7g}")


def llama_config(reader: Any, has_output: bool) -> dict[str, Any]:
    """An HF ``config.json`` for a GGUF llama."""
    a = gguf_field(reader, "general.architecture")
    if a != "llama":
        raise TestbedError(f"expected a llama GGUF, got architecture {a!r}")
    n_head = int(gguf_field(reader, "llama.attention.head_count"))
    hidden = int(gguf_field(reader, "llama.embedding_length"))
    vocab = gguf_field(reader, "llama.vocab_size") or len(
        gguf_field(reader, "tokenizer.ggml.tokens")
    )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(gguf_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(gguf_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(gguf_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(gguf_field(reader, "llama.context_length")),
        "rms_norm_eps": _f32(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(vocab),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "bfloat16",
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def _convert_tensors(
    reader: Any,
    rename: Callable[[str], str],
    fix: Callable[[str, np.ndarray], np.ndarray],
    amplitude: float,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dequantize, dither and rename every GGUF tensor into bf16 MLX arrays under HF names.

    The dither is applied in the GGUF's own layout (where the block grid lives), then ``fix``
    undoes llama.cpp's conversion of that tensor (row permutation, norm offset, ...).
    Returns the weights and a summary for ``testbed.json``.
    """
    # lazy: gguf is an optional (dev) dependency, needed only to build a testbed
    import gguf

    weights: dict[str, Any] = {}
    types: dict[str, int] = {}
    dithered = 0
    bar = _progress(len(reader.tensors), "gguf -> hf", progress)
    for t in reader.tensors:
        name = rename(t.name)
        type_name = t.tensor_type.name
        types[type_name] = types.get(type_name, 0) + 1
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if type_name not in ("F32", "F16", "BF16"):
            step = block_steps(np.asarray(t.data), type_name, w.shape[-1])
            w = dither(w, step, amplitude, seed, name)
            dithered += 1 if amplitude else 0
        weights[name] = mx.array(fix(t.name, w)).astype(mx.bfloat16)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = {"tensors": len(reader.tensors), "gguf_types": types, "dithered_tensors": dithered}
    return weights, summary


def _save_weights(weights: dict[str, Any], config: dict[str, Any], reader: Any, out: Path) -> None:
    """``model.safetensors``, ``config.json`` and ``generation_config.json`` into ``out``."""

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
    }
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        generation["pad_token_id"] = int(pad)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def gguf_llama_to_hf(
    gguf_path: Path,
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    progress: bool = False,
) -> dict[str, Any]:
    """Write an HF-format bf16 llama directory from a GGUF; dither quantized tensors.

    Returns a summary (tensor counts, types) for ``testbed.json``.
    """
    # lazy: gguf is an optional (dev) dependency, needed only to build a testbed
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    names = [t.name for t in reader.tensors]
    config = llama_config(reader, has_output="output.weight" in names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def fix(gguf_name: str, w: np.ndarray) -> np.ndarray:
        if gguf_name.endswith("attn_q.weight"):
            return unpermute_rotary(w, n_head)
        if gguf_name.endswith("attn_k.weight"):
            return unpermute_rotary(w, n_kv)
        return w

    weights, summary = _convert_tensors(reader, hf_name, fix, amplitude, seed, progress)
    _save_weights(weights, config, reader, out)
    del weights
    write_gpt2_tokenizer(reader, out)
    return summary


_GEMMA3_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


_GEMMA3_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}


#: llama.cpp fixes what the Gemma 3 GGUF does not say: every 6th layer is global (full
#: attention), the others slide with rotary base 10000 (llama-model.cpp, LLM_ARCH_GEMMA3).
#: Used unless the GGUF has ``sliding_window_pattern`` / ``rope.freq_base_swa``.
GEMMA3_SLIDING_WINDOW_PATTERN = 6


GEMMA3_ROPE_LOCAL_BASE = 10_000.0


def gemma3_hf_name(gguf_name: str) -> str:
    """HF ``Gemma3ForCausalLM`` tensor name of a GGUF gemma3 tensor name (no ``lm_head``: tied)."""
    return _map_gguf_name(gguf_name, "gemma3", _GEMMA3_GLOBAL_NAMES, _GEMMA3_LAYER_NAMES)


def gemma_norm_from_gguf(w: np.ndarray) -> np.ndarray:
    """HF/mlx-lm Gemma RMSNorm weight from llama.cpp's: subtract the folded-in 1.

    Gemma's RMSNorm scales by ``(1 + w)``; llama.cpp's convert stores ``w + 1`` (``norm_shift``)
    so that its generic RMSNorm can multiply by the stored value. mlx-lm's ``gemma3_text`` adds
    the 1 itself, so it must get ``w`` back. Exact for bf16 ``w`` (the GGUF keeps norms in F32).
    """
    return (w.astype(np.float32) - np.float32(1.0)).astype(np.float32)


def _gemma3_pattern(value: Any, layers: int) -> int:
    """The period of global layers: llama.cpp's fixed 6 unless the GGUF states one.

    Newer converters may write ``sliding_window_pattern`` as a period or as one flag per layer
    (true = sliding); mlx-lm's ``gemma3_text`` can only express "every n-th layer is global".
    """
    if value is None:
        return GEMMA3_SLIDING_WINDOW_PATTERN
    if isinstance(value, int | np.integer):
        return int(value)
    flags = [bool(v) for v in value]
    for period in range(1, layers + 1):
        if flags == [(i + 1) % period != 0 for i in range(layers)]:
            return period
    raise TestbedError(f"gemma3 sliding-window flags {flags} are not periodic; not supported")


def gemma3_config(reader: Any) -> dict[str, Any]:
    """An HF ``config.json`` (``gemma3_text``) for a GGUF gemma3, as mlx-lm and transformers read it."""
    a = gguf_field(reader, "general.architecture")
    if a != "gemma3":
        raise TestbedError(f"expected a gemma3 GGUF, got architecture {a!r}")

    def key(k: str, default: Any = None) -> Any:
        v = gguf_field(reader, f"gemma3.{k}", default)
        if v is None:
            raise TestbedError(f"the GGUF has no gemma3.{k}")
        return v

    n_head = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    head_dim = int(key("attention.key_length"))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise TestbedError("gemma3 with key_length != value_length is not supported")
    pattern = _gemma3_pattern(gguf_field(reader, "gemma3.attention.sliding_window_pattern"), layers)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers), which uses
    # hidden / heads: that is HF's query_pre_attn_scalar.
    scalar = hidden // n_head if layers == 62 else head_dim
    rope_scaling = None
    if gguf_field(reader, "gemma3.rope.scaling.type") is not None:
        kind = gguf_field(reader, "gemma3.rope.scaling.type")
        if kind != "linear":
            raise TestbedError(f"unsupported gemma3 rope scaling {kind!r}")
        factor = float(key("rope.scaling.factor"))
        rope_scaling = {"rope_type": "linear", "factor": factor}
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base")),
        "rope_local_base_freq": _f32(
            gguf_field(reader, "gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_BASE)
        ),
        "rope_scaling": rope_scaling,
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(key("attention.sliding_window")),
        "sliding_window_pattern": pattern,  # mlx-lm's name
        "_sliding_window_pattern": pattern,  # transformers' name
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "vocab_size": len(tokens),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(gguf_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "bfloat16",
    }


def gguf_gemma3_to_hf(
    gguf_path: Path,
    out: Path,
    amplitude: float = DITHER,
    seed: int = SEED,
    progress: bool = False,
) -> dict[str, Any]:
    """Write an HF-format bf16 ``gemma3_text`` directory from a GGUF; dither quantized tensors.

    No Q/K permutation to undo: llama.cpp permutes rows only for llama-style rotary, and its Gemma
    3 conversion passes Q/K through. Norm weights lose llama.cpp's +1. The embedding is tied (no
    ``lm_head``; mlx-lm's ``sanitize`` ties it). Returns a summary for ``testbed.json``.
    """
    # lazy: gguf is an optional (dev) dependency, needed only to build a testbed
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    config = gemma3_config(reader)
    if any(t.name == "output.weight" for t in reader.tensors):
        raise TestbedError("this gemma3 GGUF has an untied output.weight; not supported")

    def fix(gguf_name: str, w: np.ndarray) -> np.ndarray:
        return gemma_norm_from_gguf(w) if gguf_name.endswith("norm.weight") else w

    weights, summary = _convert_tensors(reader, gemma3_hf_name, fix, amplitude, seed, progress)
    _save_weights(weights, config, reader, out)
    del weights
    write_spm_tokenizer(reader, out)
    return summary
