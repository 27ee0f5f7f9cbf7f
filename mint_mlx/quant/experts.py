"""Per-expert formats: one format per expert inside a MoE projection (a SwitchLinear stack).

The experts of one stack are not equally sensitive (routers send most tokens to a few of them),
so the allocator may give each expert its own format. This module is the convention every stage
shares:

- **Plan paths.** The analysis measures a stack of E > 1 experts as E curves, one per expert,
  with path ``f"{module}#{e}"`` (:data:`EXPERT_SEP` never occurs in parameter names) and the
  expert's own shape (out, in). The allocator treats them as independent tensors.
- **Collapse.** :func:`collapse` turns a plan's formats back into one entry per module: a
  module whose experts all got the same format becomes a plain :class:`Format` (saved exactly
  like today, so it stays stock-loadable when the format is native); any other becomes
  :data:`ExpertGroups`, the experts grouped by format.
- **Storage.** Group k of a per-expert module is saved as ``<module>.g<k>.weight`` / ``scales``
  / ``biases`` (/ ``super_scales``), stacked over its experts in ascending expert order, exactly
  the arrays :func:`mint_mlx.quant.quantize.quantize_in_chunks` gives for that sub-stack (their
  file layout is :func:`mint_mlx.allocation.layout.per_expert_slots`). Which
  experts a group holds lives in config.json only (:func:`per_expert_entry`), so it costs no
  safetensors bytes. Groups are ordered by their first (smallest) expert, which is what makes
  the allocator's per-expert header bound (:func:`cost_key`) an upper bound.

The runtime layer that reads this storage is :class:`mint_mlx.runtime.expert_layers.PerExpertSwitchLinear`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.formats import PASSTHROUGH, Format, format_from_entry
from mint_mlx.quant.quantize import dequantize_weight, quantize_in_chunks
from mint_mlx.source.model import TensorInfo

#: Separates a module path from an expert index in plan paths (``mlp.switch_mlp.up_proj#3``).
EXPERT_SEP = "#"

#: The ``mode`` of a per-expert module's config.json quantization entry.
PER_EXPERT_MODE = "per_expert"

#: Experts of one module grouped by format: [(format, [experts ascending]), ...], ordered by
#: each group's first expert.
ExpertGroups = list[tuple[Format, list[int]]]

#: One module's entry after :func:`collapse`: a plain format, or per-expert groups.
ModuleEntry = Format | ExpertGroups


# ----------------------------------------------------------------------------- naming


def expert_path(module: str, expert: int) -> str:
    """The plan path of one expert of ``module``."""
    if EXPERT_SEP in module:
        raise ValueError(f"module path {module!r} already names an expert")
    if expert < 0:
        raise ValueError(f"expert index must be >= 0, got {expert}")
    return f"{module}{EXPERT_SEP}{expert}"


def split_expert_path(path: str) -> tuple[str, int | None]:
    """(module, expert) of a plan path; expert is None for a whole-module path."""
    module, sep, expert = path.rpartition(EXPERT_SEP)
    if not sep:
        return path, None
    if not expert.isdigit() or not module or EXPERT_SEP in module:
        raise ValueError(f"malformed per-expert path {path!r}; expected '<module>#<expert>'")
    return module, int(expert)


def group_name(module: str, group: int) -> str:
    """Prefix of the arrays of group ``group`` of a per-expert module (``<module>.g<k>``)."""
    return f"{module}.g{group}"


def splits_per_expert(info: TensorInfo) -> bool:
    """Whether the analysis measures ``info`` expert by expert: a stack of more than one expert
    whose format is not pinned by the architecture (a pinned format applies to the stack)."""
    return len(info.shape) == 3 and info.shape[0] > 1 and info.fixed is None


def expert_infos(info: TensorInfo) -> list[TensorInfo]:
    """One :class:`TensorInfo` per expert of a stack (path ``module#e``, shape (out, in))."""
    return [
        TensorInfo(
            path=expert_path(info.path, e),
            shape=tuple(info.shape[1:]),
            source_dtype=info.source_dtype,
            role=info.role,
            layer=info.layer,
            fixed=None,
        )
        for e in range(info.shape[0])
    ]


def cost_key(path: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """The (path, shape) under which the allocator prices a curve's candidates.

    A whole module is priced as itself. Expert e of a module is priced as if it were saved
    alone as group e, ``<module>.g<e>.*`` with shape (1, out, in): same data bytes, and a header
    entry at least as long as any it can really cause. Grouped experts share one entry (the
    group index k is at most its first expert's index, since groups are ordered by first
    expert; the experts count in the shape has fewer digits than the other members' entries
    are long), and a uniform module is one entry for all E >= 2 of them. So the per-tensor
    bounds the planner sums stay upper bounds of the exact file size.
    """
    module, expert = split_expert_path(path)
    if expert is None:
        return path, tuple(shape)
    return group_name(module, expert), (1, *shape)


# ----------------------------------------------------------------------------- grouping


def group_experts(per_expert: Mapping[int, Format]) -> ExpertGroups:
    """Experts grouped by format: each group's experts ascending, groups ordered by their first
    expert (deterministic, and required by :func:`cost_key`'s bound)."""
    groups: dict[Format, list[int]] = {}
    for e in sorted(per_expert):
        groups.setdefault(per_expert[e], []).append(e)
    return list(groups.items())


def check_groups(groups: Sequence[tuple[Format, Sequence[int]]], num_experts: int) -> None:
    """Every expert 0..num_experts-1 in exactly one group, ascending within each group, and
    the groups ordered by first expert (the storage convention)."""
    seen = [e for _, experts in groups for e in experts]
    if sorted(seen) != list(range(num_experts)):
        raise ValueError(
            f"per-expert groups must hold each of the {num_experts} experts exactly once, "
            f"got {sorted(seen)}"
        )
    for fmt, experts in groups:
        if not experts or list(experts) != sorted(set(experts)):
            raise ValueError(f"group {fmt.name} must list its experts ascending, got {experts}")
    firsts = [experts[0] for _, experts in groups]
    if firsts != sorted(firsts):
        raise ValueError(f"per-expert groups must be ordered by first expert, got {firsts}")


def collapse(formats: Mapping[str, Format]) -> dict[str, ModuleEntry]:
    """A plan's formats, one entry per module (in first-appearance order).

    Whole-module paths pass through. The ``module#e`` paths of one module must name experts
    0..E-1; if all share one format the module becomes that plain format (saved and loaded
    exactly as a whole-module choice), else its :func:`group_experts`.
    """
    out: dict[str, ModuleEntry] = {}
    per_module: dict[str, dict[int, Format]] = {}
    for path, fmt in formats.items():
        module, expert = split_expert_path(path)
        if expert is None:
            if module in per_module:
                raise ValueError(f"{module} is planned both whole and per expert")
            out[module] = fmt
            continue
        if module in out and module not in per_module:
            raise ValueError(f"{module} is planned both whole and per expert")
        experts = per_module.setdefault(module, {})
        if expert in experts:
            raise ValueError(f"{path} is planned twice")
        experts[expert] = fmt
        out[module] = []  # placeholder keeps the module's position
    for module, experts in per_module.items():
        if sorted(experts) != list(range(len(experts))):
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            raise ValueError(f"{module}: per-expert plan lacks expert(s) {missing}")
        groups = group_experts(experts)
        out[module] = groups[0][0] if len(groups) == 1 else groups
    return out


def is_stock_loadable(modules: Mapping[str, ModuleEntry]) -> bool:
    """Whether stock mlx-lm can load these (collapsed) modules: plain native formats only."""
    return all(isinstance(m, Format) and m.native for m in modules.values())


def needs_mint(formats: Mapping[str, Format]) -> bool:
    """Whether a plan's output needs mint-mlx to load: an extended format, or a per-expert
    module (stock mlx-lm knows neither). Save marks the config by it, the card says so by it."""
    return not is_stock_loadable(collapse(formats))


# ----------------------------------------------------------------------------- config entry


def _format_fields(fmt: Format) -> dict[str, Any]:
    if not fmt.is_quantized:
        return {"bits": fmt.bits, "group_size": 0, "mode": PASSTHROUGH}
    return {"bits": fmt.bits, "group_size": fmt.group_size, "mode": fmt.mode}


def per_expert_entry(groups: ExpertGroups) -> dict[str, Any]:
    """The config.json ``quantization`` entry of a per-expert module.

    ``{"mode": "per_expert", "groups": [{"bits", "group_size", "mode", "experts": [...]}]}``;
    a 16-bit group has ``mode: "passthrough"``. mlx-lm knows no such mode, so stock mlx-lm
    refuses the layer instead of loading it wrongly.
    """
    check_groups(groups, sum(len(e) for _, e in groups))
    return {
        "mode": PER_EXPERT_MODE,
        "groups": [{**_format_fields(f), "experts": list(map(int, e))} for f, e in groups],
    }


def is_per_expert_entry(entry: object) -> bool:
    return isinstance(entry, dict) and entry.get("mode") == PER_EXPERT_MODE


def groups_from_entry(entry: Mapping[str, Any]) -> ExpertGroups:
    """Inverse of :func:`per_expert_entry` (validated: a damaged config fails here, clearly)."""
    if entry.get("mode") != PER_EXPERT_MODE or not isinstance(entry.get("groups"), list):
        raise ValueError(f"not a per-expert quantization entry: {entry!r}")
    groups: ExpertGroups = []
    for g in entry["groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("experts"), list):
            raise ValueError(f"malformed per-expert group {g!r}")
        if g.get("mode") == PASSTHROUGH:
            fmt = Format(PASSTHROUGH, 16, 0)
        else:
            fields = {k: g[k] for k in ("bits", "group_size", "mode") if k in g}
            fmt = format_from_entry(fields)
        groups.append((fmt, [int(e) for e in g["experts"]]))
    check_groups(groups, sum(len(e) for _, e in groups))
    return groups


def module_entry(entry: ModuleEntry) -> dict[str, Any] | bool:
    """The config.json ``quantization`` entry of one collapsed module, either kind."""
    if isinstance(entry, Format):
        return entry.quantization_entry()
    return per_expert_entry(entry)


# ----------------------------------------------------------------------------- storage


def quantize_per_expert(
    weight: mx.array,
    groups: ExpertGroups,
    dtype: mx.Dtype,
    scale_method: str = "rtn",
    columns: mx.array | None = None,
) -> dict[str, mx.array]:
    """The arrays of a per-expert module: ``g<k>.<suffix>`` -> array, in file order.

    Each group's sub-stack goes through :func:`~mint_mlx.quant.quantize.quantize_in_chunks`, which
    quantizes expert by expert with that expert's Fisher ``columns`` (E, in): the very arrays
    the analysis measured for that expert.
    """
    if weight.ndim != 3:
        raise ValueError(f"per-expert formats need an expert stack, got shape {weight.shape}")
    check_groups(groups, weight.shape[0])
    out: dict[str, mx.array] = {}
    for k, (fmt, experts) in enumerate(groups):
        pick = mx.array(experts, dtype=mx.int32)
        sub = weight[pick]
        cols = None if columns is None else columns[pick] if columns.ndim == 2 else columns
        arrays = quantize_in_chunks(sub, fmt, dtype, scale_method, cols)
        mx.eval(arrays)
        out.update({f"g{k}.{suffix}": a for suffix, a in arrays.items()})
    return out


def group_arrays(arrays: Mapping[str, mx.array], k: int) -> dict[str, mx.array]:
    """Group ``k``'s arrays out of :func:`quantize_per_expert`'s output, by plain suffix."""
    prefix = f"g{k}."
    return {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}


def dequantize_per_expert(arrays: Mapping[str, mx.array], groups: ExpertGroups) -> mx.array:
    """The float32 (E, out, in) stack that a per-expert module's arrays represent."""
    num_experts = sum(len(e) for _, e in groups)
    check_groups(groups, num_experts)
    rows: list[mx.array | None] = [None] * num_experts
    for k, (fmt, experts) in enumerate(groups):
        w = dequantize_weight(group_arrays(arrays, k), fmt)
        for i, e in enumerate(experts):
            rows[e] = w[i]
    return mx.stack([r for r in rows if r is not None])


def module_arrays(
    module: str,
    entry: ModuleEntry,
    weight: mx.array,
    dtype: mx.Dtype,
    scale_method: str = "rtn",
    columns: mx.array | None = None,
    moments: np.ndarray | None = None,
) -> Iterator[tuple[str, mx.array]]:
    """(name, array) of one collapsed module in file order, either kind: what save writes for
    it, in the order :func:`mint_mlx.allocation.layout.output_layout` lays it out. ``moments``:
    its inputs' second moments, for ``scales="gptq"``."""
    if isinstance(entry, Format):
        arrays = quantize_in_chunks(weight, entry, dtype, scale_method, columns, moments=moments)
        mx.eval(arrays)
        for suffix, a in arrays.items():
            yield f"{module}.{suffix}", a
        return
    for name, a in quantize_per_expert(weight, entry, dtype, scale_method, columns).items():
        yield f"{module}.{name}", a
