"""From RD curves and a byte budget to a Plan: one format per tensor.

A pure function of its inputs (curves, budget, overhead bytes, objective): re-planning at another
budget needs no new analysis. Three rules keep the knapsack from doing something stupid:

- the objective weighs each tensor's relative error by a role prior: the embedding and output
  head (one tensor when tied) and MoE routers move the output far more than an MLP block does;
- the SQNR veto drops candidates below ``min_sqnr`` dB (unless no candidate of that tensor
  passes), so no tensor is ever destroyed to save a few bytes elsewhere;
- a budget at or above the 16-bit size keeps everything in 16 bits, and says so.

Curves may be whole tensors or single experts of a MoE stack (path ``module#e``, from
``analyze(..., per_expert=True)``); the allocator chooses for each independently, and prices an
expert so that the planned size stays an upper bound however its module ends up grouped
(:func:`mint_mlx.quant.experts.cost_key`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mint_mlx.allocation.knapsack import Infeasible, solve
from mint_mlx.allocation.layout import candidate_bytes
from mint_mlx.analysis.measure import Candidate, RDCurve
from mint_mlx.errors import BudgetError
from mint_mlx.formats import PASSTHROUGH, Format, format_by_name
from mint_mlx.quant.experts import cost_key
from mint_mlx.sizes import format_size

DEFAULT_MIN_SQNR = 9.0

#: Measured / predicted mean KLD of the fisher objective's second-order prediction, fitted on the
#: SmolLM2 testbed (benchmarks/RESULTS.md, "Prediction"). The raw prediction overestimates:
#: second order in the error, and the Fisher sampled from the model's own text.
PREDICTION_SCALE = 0.6
#: How much faster than its second-order prediction a tensor's damage grows with its relative
#: error, for tensors inside the network: the fisher distortion is multiplied by
#: ``1 + LARGE_ERROR_PENALTY * nrmse**2``. Fitted on single-tensor measurements (SmolLM2, tune
#: text, benchmarks/RESULTS.md "Large errors"); the embedding and output head are exempt, their
#: measured/predicted ratio does not grow with the error. Without it, the knapsack trades a few
#: 3-bit tensors for many 2-bit ones at ~3.5 bits per weight and measures 10-20% worse.
LARGE_ERROR_PENALTY = 1.4
#: The two ends of the network: the input embedding (its error enters linearly) and the output
#: head (its error goes straight into the logits). They get the largest prior and are exempt
#: from the large-error term.
HEAD_ROLES = ("embedding", "lm_head")
OBJECTIVES = ("fisher", "nrmse", "paper")
DEFAULT_OBJECTIVE = "fisher"


def role_prior(curve: RDCurve, num_layers: int) -> float:
    """Hand-set sensitivity priors (as in the MINT paper): embedding/head 10, router 8,
    first layer 3, last layer 2, everything else 1."""
    if curve.role in HEAD_ROLES:
        return 10.0
    if curve.role == "router":
        return 8.0
    if curve.layer == 0:
        return 3.0
    if num_layers and curve.layer == num_layers - 1:
        return 2.0
    return 1.0


def weighted_distortion(
    curve: RDCurve,
    c: Candidate,
    num_layers: int,
    objective: str,
    large_error_penalty: float = LARGE_ERROR_PENALTY,
) -> float:
    """The quantity the allocator minimizes, summed over tensors.

    ``fisher``: 1/2 x Fisher-weighted squared error, the second-order prediction of the mean
    per-token KL divergence this tensor's error adds (see :mod:`mint_mlx.sensitivity.calibrate`), grown by
    ``large_error_penalty`` (default :data:`LARGE_ERROR_PENALTY`) for large relative errors
    inside the network, where the second-order term under-counts; 0 gives the raw prediction.
    ``nrmse``: role prior x NRMSE, weight-space only: the published MINT loss, but over every
    native format. ``paper``: the same loss restricted to the paper's eight configurations
    (:func:`mint_mlx.formats.paper_formats`), a faithful reimplementation for benchmarks.
    """
    if objective == "fisher":
        if c.wsse is None:
            raise ValueError(f"{curve.path}: the fisher objective needs a calibrated analysis")
        if curve.role in HEAD_ROLES:
            return 0.5 * c.wsse
        return 0.5 * c.wsse * (1.0 + large_error_penalty * curve.nrmse(c) ** 2)
    if objective in ("nrmse", "paper"):
        return role_prior(curve, num_layers) * curve.nrmse(c)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


@dataclass
class Assignment:
    """The plan for one tensor."""

    path: str
    shape: tuple[int, ...]
    role: str
    layer: int | None
    format: str
    nbytes: int
    nrmse: float
    sqnr_db: float
    distortion: float
    fixed: bool = False
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    """One format per quantizable tensor, and the byte totals it implies.

    A MoE stack analyzed per expert has one assignment per expert (``module#e``);
    :func:`mint_mlx.quant.experts.collapse` turns :attr:`formats` back into one entry per module.
    """

    budget: int
    dtype: str
    objective: str
    min_sqnr: float
    assignments: list[Assignment]
    #: Bytes outside the allocator's control (:func:`mint_mlx.allocation.layout.overhead_bytes`);
    #: named as in mint_plan.json.
    fixed_bytes: int
    planned_bytes: int
    total_parameters: int
    exact: bool
    notes: list[str] = field(default_factory=list)
    total_bytes: int = 0  # exact size of all .safetensors files, filled in from the layout
    scales: str = "rtn"  # how affine scales were chosen: "rtn" (MLX's rule), "optimized" or "hqq"
    #: Measured peak resident memory of the conversion up to planning (sensitivity pass and
    #: analysis), in bytes; 0 where not measured (a plan made by the library alone).
    peak_memory: int = 0

    @property
    def formats(self) -> dict[str, Format]:
        return {a.path: format_by_name(a.format) for a in self.assignments}

    @property
    def distortion(self) -> float:
        return sum(a.distortion for a in self.assignments)

    @property
    def predicted_kld(self) -> float | None:
        """Expected mean per-token KL divergence to the 16-bit model (fisher objective only)."""
        return PREDICTION_SCALE * self.distortion if self.objective == "fisher" else None

    @property
    def bits_per_weight(self) -> float:
        size = self.total_bytes or self.planned_bytes
        return 8.0 * size / max(self.total_parameters, 1)

    def distribution(self) -> list[dict[str, Any]]:
        """Rows of the allocation table: format -> tensors, % tensors, % parameters, bytes."""
        rows: dict[str, dict[str, Any]] = {}
        n_tensors = len(self.assignments)
        n_params = sum(a.numel for a in self.assignments) or 1
        for a in self.assignments:
            row = rows.setdefault(
                a.format, {"format": a.format, "tensors": 0, "params": 0, "bytes": 0}
            )
            row["tensors"] += 1
            row["params"] += a.numel
            row["bytes"] += a.nbytes
        out = []
        for row in rows.values():
            fmt = format_by_name(row["format"])
            row["bits"] = fmt.bits
            row["group_size"] = fmt.group_size
            row["mode"] = fmt.mode
            row["pct_tensors"] = 100.0 * row["tensors"] / n_tensors
            row["pct_params"] = 100.0 * row["params"] / n_params
            out.append(row)
        return sorted(out, key=lambda r: (-r["bits"], r["mode"], r["group_size"]))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        d["distortion"] = self.distortion
        for a in d["assignments"]:
            a["shape"] = list(a["shape"])
            if math.isinf(a["sqnr_db"]):
                a["sqnr_db"] = None
        return d

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @staticmethod
    def load(path: Path) -> Plan:
        d = json.loads(path.read_text())
        d.pop("bits_per_weight", None)
        d.pop("distortion", None)
        assignments = []
        for a in d.pop("assignments"):
            a["shape"] = tuple(a["shape"])
            a["sqnr_db"] = math.inf if a["sqnr_db"] is None else a["sqnr_db"]
            assignments.append(Assignment(**a))
        return Plan(assignments=assignments, **d)


def _allowed(curve: RDCurve, min_sqnr: float) -> list[Candidate]:
    """The SQNR veto: candidates at or above ``min_sqnr`` dB, or all if none passes."""
    passing = [c for c in curve.candidates if curve.sqnr_db(c) >= min_sqnr]
    return passing or list(curve.candidates)


def _options_and_costs(
    curves: Sequence[RDCurve],
    dtype: mx.Dtype,
    min_sqnr: float,
    cost_fn: Callable[[str, Format, Sequence[int], mx.Dtype], int],
) -> tuple[list[list[Candidate]], list[list[Format]], list[list[int]]]:
    """Each tensor's candidates after the veto, their formats (resolved from the candidates'
    names once, here), and their bytes on disk (an expert's priced under
    :func:`~mint_mlx.quant.experts.cost_key`)."""
    options = [_allowed(c, min_sqnr) for c in curves]
    formats = [[format_by_name(c.format) for c in opts] for opts in options]
    costs = []
    for cv, fmts in zip(curves, formats, strict=True):
        path, shape = cost_key(cv.path, cv.shape)
        costs.append([cost_fn(path, fmt, shape, dtype) for fmt in fmts])
    return options, formats, costs


def _full_choice(formats: Sequence[Sequence[Format]], costs: Sequence[Sequence[int]]) -> list[int]:
    """The "16-bit" plan: passthrough where allowed, else the pinned format (e.g. a router)."""
    return [
        next(
            (i for i, f in enumerate(fmts) if not f.is_quantized),
            max(range(len(cost)), key=cost.__getitem__),
        )
        for fmts, cost in zip(formats, costs, strict=True)
    ]


def feasible_range(
    curves: Sequence[RDCurve],
    overhead_bytes: int,
    dtype: mx.Dtype,
    min_sqnr: float = DEFAULT_MIN_SQNR,
    cost_fn: Callable[[str, Format, Sequence[int], mx.Dtype], int] = candidate_bytes,
) -> tuple[int, int]:
    """(smallest feasible, 16-bit) planned sizes in bytes: the span a budget sweep covers."""
    _, formats, costs = _options_and_costs(curves, dtype, min_sqnr, cost_fn)
    smallest = overhead_bytes + sum(min(c) for c in costs)
    full = overhead_bytes + sum(
        c[i] for c, i in zip(costs, _full_choice(formats, costs), strict=True)
    )
    return smallest, full


def allocate(
    curves: Sequence[RDCurve],
    budget: int,
    overhead_bytes: int,
    total_parameters: int,
    dtype: mx.Dtype,
    min_sqnr: float = DEFAULT_MIN_SQNR,
    objective: str = DEFAULT_OBJECTIVE,
    num_layers: int | None = None,
    cost_fn: Callable[[str, Format, Sequence[int], mx.Dtype], int] = candidate_bytes,
    large_error_penalty: float = LARGE_ERROR_PENALTY,
) -> Plan:
    """Solve the multiple-choice knapsack of ``curves`` within ``budget - overhead_bytes`` bytes.

    ``cost_fn`` gives each candidate's bytes on disk (data plus header bound);
    ``large_error_penalty`` is :func:`weighted_distortion`'s (fisher objective).
    Raises :class:`BudgetError` with the smallest feasible size when the budget is too small.
    """
    if objective not in OBJECTIVES:
        raise BudgetError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if num_layers is None:
        num_layers = 1 + max((c.layer for c in curves if c.layer is not None), default=-1)
    options, formats, costs = _options_and_costs(curves, dtype, min_sqnr, cost_fn)
    dists = [
        [weighted_distortion(cv, c, num_layers, objective, large_error_penalty) for c in opts]
        for cv, opts in zip(curves, options, strict=True)
    ]
    notes: list[str] = []
    choice, exact = _choose(formats, costs, dists, budget, overhead_bytes, notes)
    assignments, planned = _assignments(curves, options, formats, costs, dists, choice, dtype)
    notes += [f"{cv.path}: {cv.note}" for cv in curves if cv.note]
    vetoed = sum(
        1
        for cv, opts in zip(curves, options, strict=True)
        if len(opts) == len(cv.candidates) and any(cv.sqnr_db(c) < min_sqnr for c in opts)
    )
    if vetoed:
        notes.append(
            f"{vetoed} tensor(s) have no candidate above {min_sqnr:g} dB SQNR: veto lifted"
        )
    return Plan(
        budget=budget,
        dtype=str(dtype).split(".")[-1],
        objective=objective,
        min_sqnr=min_sqnr,
        assignments=assignments,
        fixed_bytes=overhead_bytes,
        planned_bytes=overhead_bytes + planned,
        total_parameters=total_parameters,
        exact=exact,
        notes=notes,
    )


__all__ = ["Assignment", "Plan", "allocate", "DEFAULT_MIN_SQNR", "PASSTHROUGH"]


def _choose(
    formats: Sequence[Sequence[Format]],
    costs: Sequence[Sequence[int]],
    dists: Sequence[Sequence[float]],
    budget: int,
    overhead_bytes: int,
    notes: list[str],
) -> tuple[list[int], bool]:
    """Each tensor's option index, and whether the solver proved it optimal: every tensor in
    16-bit when the budget allows it, else the knapsack's answer (too small: a BudgetError
    naming the smallest feasible size)."""
    full = _full_choice(formats, costs)
    full_size = overhead_bytes + sum(cost[i] for cost, i in zip(costs, full, strict=True))
    if budget >= full_size:
        notes.append(
            f"budget {format_size(budget)} is at or above the 16-bit size {format_size(full_size)}: "
            "every tensor stays in 16-bit"
        )
        return full, True
    try:
        solution = solve(costs, dists, budget - overhead_bytes)
    except Infeasible as e:
        minimum = overhead_bytes + e.minimum
        raise BudgetError(
            f"budget {format_size(budget)} is below the smallest feasible size "
            f"{format_size(minimum, round_up=True)} ({minimum} bytes); raise the budget to at "
            "least that"
        ) from None
    return solution.choice, solution.exact


def _assignments(
    curves: Sequence[RDCurve],
    options: Sequence[Sequence[Candidate]],
    formats: Sequence[Sequence[Format]],
    costs: Sequence[Sequence[int]],
    dists: Sequence[Sequence[float]],
    choice: Sequence[int],
    dtype: mx.Dtype,
) -> tuple[list[Assignment], int]:
    """One assignment per tensor for the chosen options, and their planned bytes."""
    assignments = []
    planned = 0
    for cv, opts, fmts, cost, dist, k in zip(
        curves, options, formats, costs, dists, choice, strict=True
    ):
        c, fmt = opts[k], fmts[k]
        planned += cost[k]
        assignments.append(
            Assignment(
                path=cv.path,
                shape=tuple(cv.shape),
                role=cv.role,
                layer=cv.layer,
                format=c.format,
                nbytes=fmt.nbytes(cv.shape, dtype.size),
                nrmse=cv.nrmse(c),
                sqnr_db=cv.sqnr_db(c),
                distortion=dist[k],  # what the solver minimized, not a recomputation
                fixed=cv.fixed,
                note=cv.note,
            )
        )
    return assignments, planned
