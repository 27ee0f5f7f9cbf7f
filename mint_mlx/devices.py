"""Will it fit on my Mac? Unified memory, the GPU's share of it, and the KV cache.

A model's weights are not the only tenant: macOS lets the GPU wire only part of unified memory
(by default about two thirds on machines up to 36 GB, three quarters above), the KV cache
grows with the context, and the runtime needs working space. :func:`fit_budget` turns a
machine (or a plain memory size) and a context length into the largest weight budget that
leaves all of that free, and says how the memory is split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mint_mlx.errors import BudgetError
from mint_mlx.sizes import format_size, parse_size

GB = 10**9
GIB = 2**30

#: Apple Silicon chips: memory bandwidth in GB/s (Apple's published figures) and the unified
#: memory sizes they ship with, in GB.
CHIPS: dict[str, tuple[float, tuple[int, ...]]] = {
    "m1": (68.25, (8, 16)),
    "m1-pro": (200.0, (16, 32)),
    "m1-max": (400.0, (32, 64)),
    "m1-ultra": (800.0, (64, 128)),
    "m2": (100.0, (8, 16, 24)),
    "m2-pro": (200.0, (16, 32)),
    "m2-max": (400.0, (32, 64, 96)),
    "m2-ultra": (800.0, (64, 128, 192)),
    "m3": (100.0, (8, 16, 24)),
    "m3-pro": (150.0, (18, 36)),
    "m3-max": (400.0, (36, 48, 64, 96, 128)),
    "m3-ultra": (819.0, (96, 256, 512)),
    "m4": (120.0, (16, 24, 32)),
    "m4-pro": (273.0, (24, 48, 64)),
    "m4-max": (546.0, (36, 48, 64, 128)),
}

#: Working space for activations, the framework and the prompt's temporaries.
RUNTIME_RESERVE_FRACTION = 0.05
RUNTIME_RESERVE_MIN = int(0.5 * GB)


@dataclass(frozen=True)
class Machine:
    """A target: its unified memory and (for named chips) its memory bandwidth."""

    name: str
    memory: int
    bandwidth_gbs: float | None = None


def parse_machine(text: str) -> Machine:
    """``m3-max-64gb`` (a chip and its memory) or a plain size such as ``16GB``."""
    m = re.fullmatch(r"(m\d(?:-(?:pro|max|ultra))?)-(\d+)\s*gb", text.strip().lower())
    if m:
        chip, size = m.group(1), int(m.group(2))
        if chip not in CHIPS:
            raise BudgetError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)}")
        bandwidth, sizes = CHIPS[chip]
        if size not in sizes:
            raise BudgetError(
                f"{chip} ships with {', '.join(f'{s}GB' for s in sizes)}, not {size}GB; "
                "pick one of those or pass a plain size like --fit 24GB"
            )
        # Apple's "GB" of unified memory are binary gigabytes.
        return Machine(text.strip().lower(), size * GIB, bandwidth)
    try:
        memory = parse_size(text)
    except BudgetError:
        raise BudgetError(
            f"--fit {text!r} is neither a size (16GB) nor a machine like m3-max-64gb; chips: "
            f"{', '.join(CHIPS)}"
        ) from None
    return Machine(text.strip(), memory)


def gpu_memory(memory: int) -> int:
    """What MLX can wire for the GPU by default: ~2/3 of RAM up to 36 GB, ~3/4 above."""
    fraction = 2 / 3 if memory <= 36 * GIB else 3 / 4
    return int(memory * fraction)


def kv_cache_bytes(config: dict[str, Any], context: int, dtype_bytes: int = 2) -> int:
    """Keys and values for ``context`` tokens in every layer (an upper bound for models with
    sliding-window layers, which keep less)."""
    text = config.get("text_config", config)
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * context * dtype_bytes


@dataclass
class Fit:
    """How a machine's memory splits between weights, KV cache and reserves."""

    machine: Machine
    context: int
    gpu_memory: int
    kv_cache: int
    runtime_reserve: int
    weight_budget: int

    @property
    def headroom(self) -> int:
        """Unified memory left outside the GPU's share (for macOS and other apps)."""
        return self.machine.memory - self.gpu_memory

    def lines(self) -> list[str]:
        m = self.machine
        return [
            f"{m.name}: {format_size(m.memory)} unified memory; the GPU may wire "
            f"{format_size(self.gpu_memory)} (the rest, {format_size(self.headroom)}, stays with macOS)",
            f"KV cache for {self.context} tokens: {format_size(self.kv_cache)}; runtime reserve "
            f"{format_size(self.runtime_reserve)}",
            f"largest weight budget that fits: {format_size(self.weight_budget)}",
        ]


def fit_budget(machine: Machine, config: dict[str, Any], context: int) -> Fit:
    """The weight budget that leaves the KV cache, a runtime reserve and macOS's share free."""
    gpu = gpu_memory(machine.memory)
    kv = kv_cache_bytes(config, context)
    reserve = max(RUNTIME_RESERVE_MIN, int(RUNTIME_RESERVE_FRACTION * gpu))
    budget = gpu - kv - reserve
    if budget <= 0:
        raise BudgetError(
            f"{machine.name} leaves no room for weights: the GPU share {format_size(gpu)} is taken "
            f"by the KV cache ({format_size(kv)} for {context} tokens) and the runtime reserve; "
            "use a shorter --context or a larger machine"
        )
    return Fit(machine, context, gpu, kv, reserve, budget)


def bytes_per_token(config: dict[str, Any], weight_bytes: int, expert_bytes: int) -> float:
    """Weight bytes read to decode one token: all dense weights, and only the routed share of
    expert weights for MoE models."""
    text = config.get("text_config", config)
    experts = text.get("num_experts") or text.get("num_local_experts") or 0
    active = text.get("num_experts_per_tok") or 0
    if experts and active:
        return (weight_bytes - expert_bytes) + expert_bytes * active / experts
    return float(weight_bytes)


def decode_ceiling(machine: Machine, per_token: float) -> float | None:
    """Tokens per second if decoding were limited only by memory bandwidth (an upper bound)."""
    if machine.bandwidth_gbs is None or per_token <= 0:
        return None
    return machine.bandwidth_gbs * GB / per_token
