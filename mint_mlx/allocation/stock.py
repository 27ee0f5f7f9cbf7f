"""What stock ``mlx_lm convert`` would write, priced from the same analysis: mint's gain over
stock, shown before a user spends time converting.

Why it costs (almost) nothing: the analysis measures every native affine format of every
tensor, and the scale fit measures MLX's own round-to-nearest scales first (its incumbent), so
the error of the file ``mlx_lm convert -q --q-bits B --q-group-size G`` would write is already
known for each tensor (:attr:`mint_mlx.analysis.measure.Candidate.rtn_sse`). Which tensors stock
quantizes, and how, is decided here by mlx-lm's own rules, run on the source's own (lazily
loaded) mlx-lm model: :func:`mlx.nn.quantize`'s walk over leaf modules, ``quantize_model``'s
divisibility rule (a layer whose width the group does not divide stays 16-bit), the model's
``quant_predicate`` (e.g. MoE routers at 8 bits) and the ``mixed_*`` recipe predicates.

One approximation, in stock's favour: the price uses the best codes for MLX's stored (16-bit)
scales, while ``mx.quantize`` rounds with the float32 scales before storing them; on a tiny
model that costs stock about 0.5% more distortion than priced (tests/test_stock.py).

The float modes (mxfp4, nvfp4, mxfp8) are priced only where the analysis measured them (with
``--scales rtn``: the default fitted analysis leaves them out, see
:func:`mint_mlx.formats.formats_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from mint_mlx.allocation.allocate import Assignment, Plan, weighted_distortion
from mint_mlx.analysis.measure import Candidate, RDCurve
from mint_mlx.formats import Format, format_by_name
from mint_mlx.quant.experts import split_expert_path
from mint_mlx.stock_settings import Baseline, stock_baselines

if TYPE_CHECKING:
    from mint_mlx.allocation.prepare import Prepared

#: The 16-bit candidate's name (a layer stock leaves unquantized).
UNQUANTIZED = "fp16"


@dataclass(frozen=True)
class StockPoint:
    """One stock setting, priced: its exact size and predicted quality."""

    name: str  # baseline name, e.g. affine-4-g64, mixed_3_6-g64
    command: str  # the mlx_lm.convert flags that make it
    bytes: int  # all .safetensors bytes, as mint-mlx would lay the same arrays out
    bits_per_weight: float
    distortion: float
    predicted_kld: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _predicate(baseline: Baseline, model: nn.Module) -> Any:
    """The predicate ``mlx_lm convert`` would pass to ``quantize_model`` for ``baseline``."""
    if baseline.recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder

        return mixed_quant_predicate_builder(baseline.recipe, model, baseline.group_size)
    return getattr(model, "quant_predicate", None)


def stock_formats(model: nn.Module, baseline: Baseline) -> dict[str, str]:
    """Module path -> the format stock mlx-lm gives that module's weight under ``baseline``
    (:data:`UNQUANTIZED` for a layer it leaves in 16-bit). Mirrors ``quantize_model`` and
    :func:`mlx.nn.quantize`, calling mlx-lm's own predicates."""
    predicate = _predicate(baseline, model)
    default = {"group_size": baseline.group_size, "bits": baseline.bits, "mode": baseline.mode}
    out: dict[str, str] = {}
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    for path, module in leaves:  # type: ignore[str-unpack]
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            continue
        if module.weight.shape[-1] % baseline.group_size != 0:
            out[path] = UNQUANTIZED
            continue
        chosen = True if predicate is None else predicate(path, module)
        if chosen is False:
            out[path] = UNQUANTIZED
            continue
        params = dict(default)
        if isinstance(chosen, dict):
            params.update(chosen)
        mode = str(params.get("mode", "affine"))
        if mode == "affine":
            out[path] = f"affine-{params['bits']}-g{params['group_size']}"
        else:
            out[path] = mode
    return out


def _stock_candidate(curve: RDCurve, name: str, scale_method: str) -> Candidate | None:
    """The curve's measurement of ``name`` as stock would store it, or None if unmeasured
    (an affine format whose scales were fitted without measuring MLX's rule first: HQQ)."""
    for c in curve.candidates:
        if c.format == name:
            if c.rtn_sse is not None:
                return c.as_stock()
            fmt = format_by_name(name)
            fitted = fmt.is_quantized and fmt.mode == "affine" and scale_method != "rtn"
            return None if fitted else c
    if len(curve.candidates) == 1 and curve.fixed:  # a pinned tensor: the same either way
        return curve.candidates[0]
    return None


def stock_plan(prepared: Prepared, baseline: Baseline) -> Plan | None:
    """The plan that stands for ``mlx_lm convert`` with ``baseline``: its formats, its errors
    (MLX's own scales) and its exact size. None when the analysis did not measure one of the
    formats it needs (a float mode under fitted scales)."""
    by_module = stock_formats(prepared.source.model, baseline)
    num_layers = prepared.source.num_layers
    assignments = []
    for curve in prepared.curves:
        module = split_expert_path(curve.path)[0]
        name = by_module.get(module, UNQUANTIZED)
        c = _stock_candidate(curve, name, prepared.scales)
        if c is None:
            return None
        fmt: Format = format_by_name(c.format)
        assignments.append(
            Assignment(
                path=curve.path,
                shape=tuple(curve.shape),
                role=curve.role,
                layer=curve.layer,
                format=c.format,
                nbytes=fmt.nbytes(curve.shape, prepared.dtype.size),
                nrmse=curve.nrmse(c),
                sqnr_db=curve.sqnr_db(c),
                distortion=weighted_distortion(
                    curve, c, num_layers, prepared.objective, prepared.large_error_penalty
                ),
                fixed=curve.fixed,
            )
        )
    plan = Plan(
        budget=0,
        dtype=str(prepared.dtype).split(".")[-1],
        objective=prepared.objective,
        min_sqnr=0.0,
        assignments=assignments,
        fixed_bytes=0,
        planned_bytes=0,
        total_parameters=prepared.source.total_parameters,
        exact=True,
        scales="rtn",
    )
    plan.total_bytes = prepared.exact_bytes(plan)
    plan.budget = plan.total_bytes
    return plan


def stock_points(
    prepared: Prepared, baselines: Sequence[Baseline] | None = None
) -> list[StockPoint]:
    """Every stock setting the analysis can price, smallest first."""
    points = []
    for b in stock_baselines() if baselines is None else baselines:
        plan = stock_plan(prepared, b)
        if plan is None:
            continue
        points.append(
            StockPoint(
                b.name,
                b.command,
                plan.total_bytes,
                plan.bits_per_weight,
                plan.distortion,
                plan.predicted_kld,
            )
        )
    return sorted(points, key=lambda p: (p.bytes, p.distortion))


def best_within(points: Sequence[StockPoint], budget: int) -> StockPoint | None:
    """The stock setting with the least distortion among those no larger than ``budget``."""
    fitting = [p for p in points if p.bytes <= budget]
    return min(fitting, key=lambda p: p.distortion) if fitting else None


def frontier(points: Sequence[StockPoint]) -> list[StockPoint]:
    """The stock settings no other is both smaller and better than (what a plot draws)."""
    out: list[StockPoint] = []
    for p in sorted(points, key=lambda p: (p.bytes, p.distortion)):
        if not out or p.distortion < out[-1].distortion:
            out.append(p)
    return out


def unmeasured_note(points: Sequence[StockPoint]) -> str | None:
    """Says which stock settings could not be priced (float modes under fitted scales)."""
    priced = {p.name for p in points}
    missing = [b.name for b in stock_baselines() if b.name not in priced]
    if not missing:
        return None
    return (
        f"stock {', '.join(missing)} not compared: the analysis did not measure their formats "
        "with MLX's own scales (the fitted-scales analysis leaves the float modes out, HQQ's "
        "measures no MLX scales; --scales rtn measures them all)"
    )


__all__ = [
    "StockPoint",
    "best_within",
    "frontier",
    "stock_formats",
    "stock_plan",
    "stock_points",
]


def stock_curve(points: Sequence[StockPoint]) -> list[tuple[float, float, str]]:
    """(bits per weight, predicted quality, name) of the stock settings on their frontier."""
    return [
        (
            p.bits_per_weight,
            p.predicted_kld if p.predicted_kld is not None else p.distortion,
            p.name,
        )
        for p in frontier(points)
    ]
