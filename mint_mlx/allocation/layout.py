"""Exact byte accounting of the saved files: which arrays are written, in which order and shard.

The budget counts every byte of every ``.safetensors`` file, headers included. The allocator is
given each candidate's data bytes *plus* an upper bound on the header bytes its arrays add, and
the overhead (unquantized tensors, per-shard headers) is subtracted first, so a plan that fits
on paper fits on disk. After planning the real layout is computed and its size is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import ceil, prod
from typing import TYPE_CHECKING

import mlx.core as mx

from mint_mlx.formats import Format
from mint_mlx.quant.experts import ExpertGroups, check_groups, collapse, group_name
from mint_mlx.safetensors_io import (
    MAX_OFFSET_DIGITS,
    TAG_OF,
    ShardLayout,
    TensorSlot,
    header_entry_bytes,
    header_overhead_bytes,
    plan_shards,
)

if TYPE_CHECKING:  # types only: the plan and the source are upstream of the output
    from mint_mlx.allocation.allocate import Plan
    from mint_mlx.source.model import Source

#: mlx-lm's shard size (5 GB of data per file).
MAX_SHARD_BYTES = 5 * 10**9


def _tag(kind: str, dtype: mx.Dtype) -> str:
    if kind == "float":
        return TAG_OF[dtype]
    return {"uint32": "U32", "uint8": "U8", "int8": "I8"}[kind]


def module_slots(path: str, fmt: Format, shape: Sequence[int], dtype: mx.Dtype) -> list[TensorSlot]:
    """Arrays saved for one quantizable module in ``fmt`` (weight, then scales and biases)."""
    return [
        TensorSlot(f"{path}.{suffix}", _tag(kind, dtype), tuple(s))
        for suffix, (s, kind) in fmt.array_specs(shape, dtype.size).items()
    ]


def per_expert_slots(
    module: str, groups: ExpertGroups, shape: Sequence[int], dtype: mx.Dtype
) -> list[TensorSlot]:
    """The arrays saved for a per-expert module of ``shape`` (E, out, in), group by group
    (the storage convention of :mod:`mint_mlx.quant.experts`)."""
    if len(shape) != 3:
        raise ValueError(f"{module}: per-expert formats need an expert stack, got shape {shape}")
    check_groups(groups, shape[0])
    slots: list[TensorSlot] = []
    for k, (fmt, experts) in enumerate(groups):
        slots += module_slots(group_name(module, k), fmt, (len(experts), *shape[1:]), dtype)
    return slots


def offset_digits(budget: int) -> int:
    """Digits of the largest byte offset a file within ``budget`` bytes can have."""
    return len(str(max(budget, 1)))


def candidate_bytes(
    path: str,
    fmt: Format,
    shape: Sequence[int],
    dtype: mx.Dtype,
    digits: int = MAX_OFFSET_DIGITS,
) -> int:
    """Data bytes plus an upper bound of the header bytes of ``path`` stored as ``fmt``."""
    slots = module_slots(path, fmt, shape, dtype)
    return sum(s.nbytes + header_entry_bytes(s.name, s.dtype, s.shape, digits) for s in slots)


def passthrough_dtype(source_dtype: mx.Dtype, out_dtype: mx.Dtype) -> mx.Dtype:
    """Float tensors are saved in the output dtype (as mlx-lm does); others keep their dtype."""
    return out_dtype if mx.issubdtype(source_dtype, mx.floating) else source_dtype


def passthrough_slot(
    key: str, shape: Sequence[int], source_dtype: mx.Dtype, out_dtype: mx.Dtype
) -> TensorSlot:
    return TensorSlot(key, TAG_OF[passthrough_dtype(source_dtype, out_dtype)], tuple(shape))


def overhead_bytes(
    passthrough: Mapping[str, tuple[tuple[int, ...], mx.Dtype]],
    out_dtype: mx.Dtype,
    budget: int,
    largest_tensor: int,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Bytes the allocator cannot change: unquantized tensors and per-shard overhead.

    The shard count is bounded from the budget: every shard but the last holds at least
    ``max_shard_bytes - largest_tensor`` bytes of data.
    """
    total = 0
    for key, (shape, dtype) in passthrough.items():
        slot = passthrough_slot(key, shape, dtype, out_dtype)
        total += slot.nbytes + header_entry_bytes(
            slot.name, slot.dtype, slot.shape, offset_digits(budget)
        )
    fill = max(max_shard_bytes - largest_tensor, 1)
    shards = 1 + ceil(max(budget - max_shard_bytes, 0) / fill) + 1
    return total + shards * header_overhead_bytes()


def output_layout(
    order: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, mx.Dtype],
    formats: Mapping[str, Format],
    out_dtype: mx.Dtype,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[ShardLayout]:
    """The exact files: tensors written in source order (each shard's data is laid out smallest
    first, see :class:`ShardLayout`); a quantizable module (a key of ``formats``,
    by module path) expands into its weight/scales/biases. Per-expert keys (``module#e``) are
    collapsed first: a module whose experts share a format is laid out as that format, any
    other as its groups (:mod:`mint_mlx.quant.experts`)."""
    modules = collapse(formats)
    slots: list[TensorSlot] = []
    for key in order:
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        entry = modules.get(module) if module is not None else None
        if module is None or entry is None:
            slots.append(passthrough_slot(key, shapes[key], dtypes[key], out_dtype))
        elif isinstance(entry, Format):
            slots += module_slots(module, entry, shapes[key], out_dtype)
        else:
            slots += per_expert_slots(module, entry, shapes[key], out_dtype)
    return plan_shards(slots, max_shard_bytes)


def total_file_bytes(shards: Sequence[ShardLayout]) -> int:
    return sum(s.file_bytes for s in shards)


def largest_tensor_bytes(shapes: Mapping[str, tuple[int, ...]], dtype_bytes: int = 4) -> int:
    return max((prod(s) * dtype_bytes for s in shapes.values()), default=0)


def layout_for(
    source: Source, plan: Plan, dtype: mx.Dtype, max_shard_bytes: int
) -> list[ShardLayout]:
    """The files a plan writes for ``source``, shard by shard."""
    return output_layout(
        list(source.shapes), source.shapes, source.dtypes, plan.formats, dtype, max_shard_bytes
    )


def exact_total_bytes(
    source: Source, plan: Plan, dtype: mx.Dtype, max_shard_bytes: int = MAX_SHARD_BYTES
) -> int:
    """Every byte of every ``.safetensors`` file the plan writes, headers included."""
    return total_file_bytes(layout_for(source, plan, dtype, max_shard_bytes))
