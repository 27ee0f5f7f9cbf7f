"""The runtime layer of a per-expert MoE projection (see :mod:`mint_mlx.quant.experts`).

:class:`PerExpertSwitchLinear` is a drop-in for mlx-lm's ``QuantizedSwitchLinear``: same
``__call__(x, indices, sorted_indices=False)``, same output, but its experts are stored in
several formats, one parameter set per group (``g0``, ``g1``, ... as saved). A call routes each
(token, expert) pair only to the group that holds its expert: the pairs are sorted by (group,
expert), each group multiplies its own run with one gathered matmul over its own sub-stack
(native formats through ``mx.gather_qmm``, extended ones through mint-mlx's kernels), and the
results are put back in the caller's order. Nothing is computed twice.

The group sizes of a call are data-dependent, so a call with more than one group reads the
routing counts back (one small synchronisation); a module whose experts share one format
never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mint_mlx.formats import Format
from mint_mlx.quant.experts import (
    ExpertGroups,
    check_groups,
    dequantize_per_expert,
    groups_from_entry,
    is_per_expert_entry,
    quantize_per_expert,
)
from mint_mlx.runtime.kernels.ops import gather_matmul, gathered_rows

_KIND_DTYPES: dict[str, mx.Dtype] = {"uint32": mx.uint32, "uint8": mx.uint8, "int8": mx.int8}


class PerExpertSwitchLinear(nn.Module):
    """A SwitchLinear stack of ``num_experts`` experts stored group by group in their formats.

    ``groups`` is the module's :data:`~mint_mlx.quant.experts.ExpertGroups`; ``dtype`` the 16-bit
    dtype of scales and 16-bit weights (only placeholders' dtypes: loading replaces them).
    An optional ``bias`` (num_experts, out) stays whole, as in mlx-lm.

    Group k's arrays are a dict parameter ``g<k>`` (so they load from ``<module>.g<k>.weight``
    ...), not a child module: the layer stays a leaf, as every quantized layer is, so tools that
    walk leaf modules (mlx-lm's quantize predicate, the post-save check, the ``dequant-fp32``
    evaluation backend through :meth:`dequantized_weight`) see it as one layer.
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        groups: ExpertGroups,
        bias: bool = False,
        dtype: mx.Dtype = mx.float16,
    ) -> None:
        super().__init__()
        check_groups(groups, num_experts)
        self.input_dims = input_dims
        self.output_dims = output_dims
        self.num_experts = num_experts
        # routing tables are plain attributes (not parameters): loading never touches them
        group_of = [0] * num_experts
        local = [0] * num_experts
        for k, (fmt, experts) in enumerate(groups):
            specs = fmt.array_specs((len(experts), output_dims, input_dims), dtype.size)
            setattr(
                self,
                f"g{k}",
                {
                    suffix: mx.zeros(s, dtype=dtype if kind == "float" else _KIND_DTYPES[kind])
                    for suffix, (s, kind) in specs.items()
                },
            )
            for i, e in enumerate(experts):
                group_of[e], local[e] = k, i
        object.__setattr__(self, "_groups", [(f, list(e)) for f, e in groups])
        object.__setattr__(self, "_group_of", mx.array(group_of, dtype=mx.uint32))
        object.__setattr__(self, "_local", mx.array(local, dtype=mx.uint32))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims), dtype=dtype)
        self.freeze()

    # ------------------------------------------------------------------ construction

    @property
    def groups(self) -> ExpertGroups:
        return [(f, list(e)) for f, e in self._groups]

    def group(self, k: int) -> tuple[Format, dict[str, mx.array]]:
        """Group ``k``'s format and saved arrays (by suffix)."""
        arrays = self[f"g{k}"]
        assert isinstance(arrays, dict)
        return self._groups[k][0], dict(arrays)

    @classmethod
    def from_weight(
        cls,
        weight: mx.array,
        groups: ExpertGroups,
        dtype: mx.Dtype,
        scale_method: str = "rtn",
        columns: mx.array | None = None,
        bias: mx.array | None = None,
    ) -> PerExpertSwitchLinear:
        """Quantize a float (E, out, in) stack into a layer, exactly as save writes it."""
        num_experts, output_dims, input_dims = (int(d) for d in weight.shape)
        layer = cls(input_dims, output_dims, num_experts, groups, bias is not None, dtype)
        arrays = quantize_per_expert(weight, groups, dtype, scale_method, columns)
        params: list[tuple[str, mx.array]] = list(arrays.items())
        if bias is not None:
            params.append(("bias", bias.astype(dtype)))
        layer.load_weights(params, strict=True)
        return layer

    @classmethod
    def from_entry(
        cls,
        entry: Mapping[str, Any],
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        dtype: mx.Dtype = mx.float16,
    ) -> PerExpertSwitchLinear:
        """An empty layer for a config.json per-expert entry, ready for ``load_weights``."""
        return cls(input_dims, output_dims, num_experts, groups_from_entry(entry), bias, dtype)

    # ------------------------------------------------------------------ compute

    def dequantized_weight(self) -> mx.array:
        """The float32 (E, out, in) stack the saved arrays represent."""
        arrays = {
            f"g{k}.{name}": a
            for k in range(len(self._groups))
            for name, a in self.group(k)[1].items()
        }
        return dequantize_per_expert(arrays, self.groups)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if len(self._groups) == 1:
            fmt, arrays = self.group(0)
            y = gather_matmul(x, arrays, fmt, self._local[indices], sorted_indices)
        else:
            y = self._routed(x, indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    def _routed(self, x: mx.array, indices: mx.array) -> mx.array:
        """Each (batch entry, expert) to its group's gathered matmul, in (group, expert) order."""
        batch, xb, idx = gathered_rows(x, indices)
        m = x.shape[-2]
        if xb.shape[0] == 0:
            return mx.zeros((*batch, m, self.output_dims), dtype=x.dtype)
        group = self._group_of[idx]
        # sorted by group, and by expert within a group: each group's local indices ascend
        order = mx.argsort(group * self.num_experts + idx)
        counts = (group[None, :] == mx.arange(len(self._groups))[:, None]).sum(axis=1).tolist()
        pieces = []
        start = 0
        for k, count in enumerate(counts):
            assert isinstance(count, int)
            if count == 0:
                continue
            pos = order[start : start + count]
            fmt, arrays = self.group(k)
            y = gather_matmul(xb[pos], arrays, fmt, self._local[idx[pos]], True)
            pieces.append(y.astype(x.dtype))
            start += count
        ys = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)
        return ys[mx.argsort(order)].reshape(*batch, m, self.output_dims)


def swap_per_expert_layers(
    model: nn.Module, quantization: Mapping[str, Any], dtype: mx.Dtype
) -> list[str]:
    """Replace every SwitchLinear that ``quantization`` (config.json's block) plans per expert
    with an empty :class:`PerExpertSwitchLinear`; return their paths.

    Call it on the freshly built model, before ``nn.quantize`` and ``load_weights``, and leave
    the per-expert entries out of the quantization block mlx-lm's loader quantizes with: the
    new layer is a leaf without ``to_quantized``, which ``nn.quantize`` refuses if its
    predicate says to quantize it.
    """
    from mlx_lm.models.switch_layers import SwitchLinear

    leaves: list[tuple[str, nn.Module]] = tree_flatten(  # type: ignore[assignment]
        model.leaf_modules(), is_leaf=nn.Module.is_module
    )
    swapped: list[tuple[str, nn.Module]] = []
    for path, module in leaves:
        entry = quantization.get(path)
        if not is_per_expert_entry(entry):
            continue
        assert isinstance(entry, Mapping)
        if not isinstance(module, SwitchLinear):
            raise ValueError(f"{path} is planned per expert but is a {type(module).__name__}")
        num_experts, output_dims, input_dims = (int(d) for d in module.weight.shape)
        layer = PerExpertSwitchLinear.from_entry(
            entry, input_dims, output_dims, num_experts, "bias" in module, dtype
        )
        swapped.append((path, layer))
    if swapped:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swapped))
    return [p for p, _ in swapped]


__all__ = ["PerExpertSwitchLinear", "swap_per_expert_layers"]
