"""Analyze once, plan at any budget: the bridge between the analysis and the allocator.

:func:`prepare` does everything that is costly and budget-independent (sensitivity pass,
RD curves, both cached on disk); :meth:`Prepared.plan` then answers a budget in well under a
second, which is what makes budget sweeps (``python -m mint_mlx.plan``) and the model card's
size/quality curve cheap.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mint_mlx.allocation.allocate import (
    DEFAULT_MIN_SQNR,
    DEFAULT_OBJECTIVE,
    LARGE_ERROR_PENALTY,
    Plan,
    allocate,
    feasible_range,
)
from mint_mlx.allocation.layout import (
    MAX_OFFSET_DIGITS,
    MAX_SHARD_BYTES,
    candidate_bytes,
    exact_total_bytes,
    largest_tensor_bytes,
    offset_digits,
    overhead_bytes,
)
from mint_mlx.allocation.stock import StockPoint, stock_points
from mint_mlx.analysis.analyze import analyze, default_cache_path
from mint_mlx.analysis.equalize import choose_scaling
from mint_mlx.analysis.measure import RDCurve
from mint_mlx.analysis.row_sample import SAMPLE_ELEMENTS
from mint_mlx.analysis.workers import jobs_within, worker_memory
from mint_mlx.errors import BudgetError, MintError
from mint_mlx.formats import FORMAT_SETS, Format, formats_for
from mint_mlx.phases import PhaseLog
from mint_mlx.quant.equalize import FOLDS, Scaling, fold_groups
from mint_mlx.quant.experts import splits_per_expert
from mint_mlx.quant.quantize import SCALE_METHODS
from mint_mlx.sensitivity.calibrate import (
    DEFAULT_SEQUENCES,
    SEQ_LEN,
    CalibrationConfig,
    in_memory_need,
    input_moments,
    sensitivity,
)
from mint_mlx.sensitivity.inputs import InputMoments, input_moments_need
from mint_mlx.sizes import format_size
from mint_mlx.source.model import Source, has_tokenizer

#: The 16-bit dtypes an output may store scales and unquantized tensors in (``--dtype``).
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}


def scale_method_for(scales: str | None, objective: str) -> str:
    """The scale method a run uses (``--scales``): as asked, else the objective's own (the
    paper's method is round-to-nearest; ours fits scales). One rule for convert and plan."""
    method = scales if scales is not None else ("rtn" if objective == "paper" else "optimized")
    if method not in SCALE_METHODS:
        raise MintError(f"unknown scale method {method!r}; use one of {', '.join(SCALE_METHODS)}")
    return method


def output_dtype(source: Source, dtype: str | None) -> mx.Dtype:
    """The 16-bit dtype for scales and unquantized tensors: as asked, else the source's own
    (float32 checkpoints become float16)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise MintError(f"--dtype {dtype} is not supported; use float16 or bfloat16")
        return DTYPES[dtype]
    return DTYPES.get(source.source_dtype(), mx.float16)


@dataclass
class Prepared:
    """A source with its RD curves (and sensitivity weights), ready to plan at any budget."""

    source: Source
    dtype: mx.Dtype
    objective: str
    scales: str
    min_sqnr: float
    curves: list[RDCurve]
    columns: dict[str, mx.array] | None
    cache: Path
    max_shard_bytes: int = MAX_SHARD_BYTES
    notes: list[str] = field(default_factory=list)  # said with every plan
    #: The fisher objective's large-error term (benchmarks vary it; users keep the default).
    large_error_penalty: float = LARGE_ERROR_PENALTY
    #: Wall seconds of the costly phases (``sensitivity``, ``analysis``), cache reads included.
    seconds: dict[str, float] = field(default_factory=dict)
    #: The input second moments ``scales="gptq"`` rounds with (None for other methods).
    moments: InputMoments | None = None
    #: The equivalent scales the analysis measured and save applies (``--equalize``).
    scaling: Scaling | None = None
    #: Priced (tensor, format) pairs by header digit count (see :meth:`_cost_fn`).
    _costs: dict[int, dict[tuple[str, str], int]] = field(default_factory=dict, repr=False)

    def fixed(self, budget: int) -> int:
        """Bytes outside the allocator's control at this budget (see layout.overhead_bytes)."""
        quantizable = {t.key for t in self.source.quantizable}
        shapes = self.source.shapes
        passthrough = {
            k: (shapes[k], self.source.dtypes[k]) for k in shapes if k not in quantizable
        }
        return overhead_bytes(
            passthrough, self.dtype, budget, largest_tensor_bytes(shapes), self.max_shard_bytes
        )

    def _cost_fn(self, digits: int) -> Callable[[str, Format, Sequence[int], mx.Dtype], int]:
        """:func:`candidate_bytes` at ``digits``, remembered: every budget of a sweep prices the
        same (tensor, format) pairs, and pricing builds each header entry."""
        memo = self._costs.setdefault(digits, {})

        def cost(path: str, fmt: Format, shape: Sequence[int], dtype: mx.Dtype) -> int:
            key = (path, fmt.name)
            if key not in memo:
                memo[key] = candidate_bytes(path, fmt, shape, dtype, digits)
            return memo[key]

        return cost

    def _range(self, digits: int, budget_for_fixed: int) -> tuple[int, int]:
        return feasible_range(
            self.curves,
            self.fixed(budget_for_fixed),
            self.dtype,
            self.min_sqnr,
            self._cost_fn(digits),
        )

    @functools.cached_property
    def _bounds(self) -> tuple[int, int]:
        """(smallest, 16-bit) budgets under the allocator's per-tensor byte bounds.

        Header sizes depend on the budget (digits of byte offsets), so the smallest size is
        computed at the digit count of a first, looser bound: a budget of exactly that size
        then needs no more digits, and really is feasible.
        """
        loose_low, loose_full = self._range(MAX_OFFSET_DIGITS, 10**12)
        low, _ = self._range(offset_digits(loose_low), loose_low)
        _, full = self._range(offset_digits(loose_full), loose_full)
        return low, full

    @functools.cached_property
    def smallest_plan(self) -> Plan:
        """The cheapest plan that passes the veto, with its exact size.

        The allocator's per-tensor header bounds overstate the exact file size by a few bytes
        per tensor, so budgets between the exact size of this plan and the bounded one are
        feasible only as this plan.
        """
        return self._allocate(self._bounds[0])

    def size_range(self) -> tuple[int, int]:
        """(smallest feasible budget, 16-bit size) in bytes; the smallest is exact."""
        return self.smallest_plan.total_bytes, self._bounds[1]

    def plan(self, budget: int) -> Plan:
        """The allocation for ``budget`` bytes, with its exact size on disk filled in."""
        smallest = self.smallest_plan
        if budget < smallest.total_bytes:
            low = smallest.total_bytes
            raise BudgetError(
                f"budget {format_size(budget)} is below the smallest feasible size "
                f"{format_size(low, round_up=True)} ({low} bytes); raise the budget to at least that"
            )
        if budget < self._bounds[0]:
            plan = copy.deepcopy(smallest)
            plan.budget = budget
            return plan
        return self._allocate(budget)

    def exact_bytes(self, plan: Plan) -> int:
        """All ``.safetensors`` bytes of ``plan`` as it would be saved (headers included)."""
        return exact_total_bytes(self.source, plan, self.dtype, self.max_shard_bytes)

    @functools.cached_property
    def stock(self) -> list[StockPoint]:
        """Every stock mlx-lm setting this analysis can price (:mod:`mint_mlx.allocation.stock`)."""
        return stock_points(self)

    def _allocate(self, budget: int) -> Plan:
        digits = offset_digits(budget)
        plan = allocate(
            self.curves,
            budget,
            self.fixed(budget),
            self.source.total_parameters,
            self.dtype,
            min_sqnr=self.min_sqnr,
            objective=self.objective,
            num_layers=self.source.num_layers,
            cost_fn=self._cost_fn(digits),
            large_error_penalty=self.large_error_penalty,
        )
        plan.scales = self.scales
        plan.notes = [*self.notes, *plan.notes]
        plan.total_bytes = self.exact_bytes(plan)
        if plan.total_bytes > budget:  # the accounting is an upper bound: a bug if this fires
            raise BudgetError(
                f"internal accounting error: plan takes {plan.total_bytes} bytes over budget "
                f"{budget}; please report it"
            )
        return plan


def prepare(
    source: Source,
    dtype: mx.Dtype,
    objective: str = DEFAULT_OBJECTIVE,
    scale_method: str = "optimized",
    min_sqnr: float = DEFAULT_MIN_SQNR,
    analysis: Path | None = None,
    calibration: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    jobs: int = 1,
    formats: str = "native",
    sensitivity_pass: str = "auto",
    max_memory: int | None = None,
    exact_analysis: bool = False,
    sampler: str = "auto",
    phases: PhaseLog | None = None,
    calibration_sequences: int = DEFAULT_SEQUENCES,
    calibration_length: int = SEQ_LEN,
    calibration_seed: int = 0,
    equalize: bool = False,
) -> Prepared:
    """Run (or reuse from cache) the sensitivity pass and the analysis of ``source``.

    The ``fisher`` objective first estimates output sensitivities: from text the model samples
    itself, or from the ``calibration`` text file (``calibration_sequences`` sequences of
    ``calibration_length`` tokens: fewer is faster and a noisier estimate). ``formats`` is the
    candidate set (:data:`~mint_mlx.formats.FORMAT_SETS`); the analysis cache is keyed by the set's format
    names, so a native and an extended analysis of the same model never mix. The sensitivity
    pass runs in memory or block by block as ``sensitivity_pass`` and ``max_memory`` (bytes)
    decide (:func:`mint_mlx.sensitivity.calibrate.choose_pass`), and ``sampler`` which model samples the
    text (:data:`~mint_mlx.sensitivity.calibrate.SAMPLERS`); when neither fits, a one-line error says
    what would, never a silent switch to weight error. The analysis estimates each
    candidate's error from a row sample of each tensor (:mod:`mint_mlx.analysis.row_sample`), or with
    ``exact_analysis`` measures every weight. ``equalize`` scales the input columns of the
    layers whose input can take the inverse (:mod:`mint_mlx.analysis.equalize`) before the
    analysis measures them.
    """
    if formats not in FORMAT_SETS:
        raise MintError(f"unknown --formats {formats!r}; use one of {', '.join(FORMAT_SETS)}")
    start = time.perf_counter()
    notes = _source_notes(source, formats, objective)
    objective, columns, calib_key, used = _sensitivity_pass(
        source,
        objective,
        CalibrationConfig(
            sequences=calibration_sequences,
            seq_len=calibration_length,
            seed=calibration_seed,
            text_file=calibration,
        ),
        progress,
        sensitivity_pass,
        max_memory,
        sampler,
        phases,
        notes,
    )
    moments = _moments(source, scale_method, objective, used, max_memory, progress, notes)
    sensitivity_seconds = time.perf_counter() - start
    candidates = formats_for(objective, scale_method, formats)
    per_expert = _per_expert(source, formats, objective)
    sample = None if exact_analysis else SAMPLE_ELEMENTS
    jobs = _analysis_jobs(source, jobs, max_memory, notes, equalize)
    if phases is not None:
        phases.start(
            "analysis",
            f"{len(source.quantizable)} tensors x {len(candidates)} formats"
            + ("" if sample is None else ", errors from a row sample")
            + (", equivalent scales chosen first" if equalize else ""),
        )
    start = time.perf_counter()
    scaling = _scaling(source, equalize, objective, columns, dtype, calib_key, progress)
    if scaling is not None:
        notes.append(_scaling_note(scaling))
    cache = analysis or default_cache_path(
        source,
        candidates,
        dtype,
        calib_key,
        scale_method,
        per_expert,
        sample,
        "" if scaling is None else scaling.digest(),
    )
    curves = analyze(
        source,
        candidates,
        dtype,
        cache,
        progress=progress,
        columns=columns,
        calibration=calib_key,
        scale_method=scale_method,
        jobs=jobs,
        per_expert=per_expert,
        sample_elements=sample,
        moments=moments,
        scaling=scaling,
    )
    # the analysis's time includes choosing the equivalent scales
    seconds = {"sensitivity": sensitivity_seconds, "analysis": time.perf_counter() - start}
    notes += _sample_notes(curves)
    return Prepared(
        source,
        dtype,
        objective,
        scale_method,
        min_sqnr,
        curves,
        columns,
        cache,
        max_shard_bytes,
        notes,
        seconds=seconds,
        moments=moments,
        scaling=scaling,
    )


def _scaling(
    source: Source,
    equalize: bool,
    objective: str,
    columns: dict[str, mx.array] | None,
    dtype: mx.Dtype,
    calib_key: str,
    progress: bool,
) -> Scaling | None:
    """The equivalent scales ``--equalize`` asks for (chosen once per calibration, cached)."""
    if not equalize:
        return None
    if objective != "fisher" or columns is None:
        raise MintError(
            "--equalize chooses its scales by the sensitivity pass's weights; use it with "
            "--objective fisher"
        )
    if not fold_groups(
        source.model_type, source.config, source.shapes, {t.key for t in source.quantizable}
    ):
        raise MintError(
            f"--equalize does not know where to fold the scales of a {source.model_type!r} "
            f"model (it knows {', '.join(sorted(FOLDS))}); leave --equalize out"
        )
    return choose_scaling(source, columns, dtype, calib_key, progress)


def _scaling_note(scaling: Scaling) -> str:
    exps = [e for e in scaling.exponents.values() if e != 0.0]
    typical = f", exponents {min(exps):g}-{max(exps):g}" if exps else ""
    return (
        f"equalize: {scaling.scaled_groups} of {len(scaling.exponents)} layer groups scaled "
        f"(inverse folded into norms and preceding layers{typical})"
    )


def _moments(
    source: Source,
    scale_method: str,
    objective: str,
    used: CalibrationConfig | None,
    max_memory: int | None,
    progress: bool,
    notes: list[str],
) -> InputMoments | None:
    """The input second moments ``--scales gptq`` needs (computed once, cached beside the
    column Fisher); None for every other scale method."""
    if scale_method != "gptq":
        return None
    if objective != "fisher" or used is None:
        raise MintError(
            "--scales gptq weighs errors by the sensitivity pass; use it with --objective fisher"
        )
    need = in_memory_need(source) + input_moments_need(source)
    if max_memory is not None and need > max_memory:
        raise MintError(
            f"--scales gptq collects its input moments with the float32 model in memory "
            f"({format_size(need, round_up=True)}), over --max-memory "
            f"{format_size(max_memory)}; raise --max-memory or use --scales optimized"
        )
    moments = input_moments(source, used, progress)
    shared = len(set(moments.aliases.values()))
    notes.append(
        f"gptq: error-compensated rounding for the {len(moments.aliases)} linear layers "
        f"({shared} distinct inputs); embeddings and expert stacks keep fitted rounding"
    )
    return moments


def _source_notes(source: Source, formats: str, objective: str) -> list[str]:
    """What every plan of this run says about its options and its source."""
    notes = []
    if formats == "extended" and objective == "paper":
        notes.append(
            "--formats extended does not apply to --objective paper: planned over the "
            "paper's eight configurations"
        )
    if not has_tokenizer(source.path):
        notes.append(
            f"{source.path.name} has no tokenizer files, so neither has the output: copy them "
            "in before generating text"
        )
    return notes


def _sensitivity_pass(
    source: Source,
    objective: str,
    config: CalibrationConfig,
    progress: bool,
    sensitivity_pass: str,
    max_memory: int | None,
    sampler: str,
    phases: PhaseLog | None,
    notes: list[str],
) -> tuple[str, dict[str, mx.array] | None, str, CalibrationConfig | None]:
    """(objective, Fisher column weights, their cache key) for the ``fisher`` objective (run or
    read from the cache, described in ``notes``); the objective unchanged and no weights
    otherwise. Non-finite sensitivities fall back to ``nrmse``, and say so."""
    if objective != "fisher":
        return objective, None, "", None
    if phases is not None:
        phases.start("sensitivity", "how much each weight column moves the output")
    if config.sequences < 1:
        raise MintError(f"--calibration-sequences must be at least 1, not {config.sequences}")
    if config.seq_len < 2:  # one token has no next token to predict
        raise MintError(f"--calibration-length must be at least 2, not {config.seq_len}")
    found = sensitivity(source, config, progress, sensitivity_pass, max_memory, sampler)
    how = "read from the cache" if found.choice is None else found.choice.describe(max_memory)
    tokens = f"{config.sequences} x {config.seq_len} tokens"
    notes.append(f"sensitivity from {found.text}, {tokens}; {how}")
    if not all(bool(mx.all(mx.isfinite(c)).item()) for c in found.columns.values()):
        # NaN/Inf weights make every gradient NaN: weigh by weight error instead, and say so
        notes.append(
            "the sensitivity pass gave non-finite values (the source has NaN/Inf weights); "
            "planned with --objective nrmse instead"
        )
        return "nrmse", None, "", None
    # the full model's text and a 4-bit copy's have their own keys
    return objective, found.columns, found.key, found.config


def _per_expert(source: Source, formats: str, objective: str) -> bool:
    """Whether each expert of a MoE stack is its own item in the knapsack: per-expert configs
    are an extended format, and only models that have expert stacks get the flag (it changes
    the cache key)."""
    return (
        formats == "extended"
        and objective != "paper"
        and any(splits_per_expert(info) for info in source.quantizable)
    )


def _sample_notes(curves: Sequence[RDCurve]) -> list[str]:
    """The note that errors were estimated from row samples, if any were."""
    sampled = sum(1 for c in curves if c.sampled_rows)
    if not sampled:
        return []
    return [
        f"errors of {sampled} of {len(curves)} tensors estimated from a stratified sample "
        f"of about {SAMPLE_ELEMENTS:,} weights each (--exact-analysis measures every weight)"
    ]


def _analysis_jobs(
    source: Source, jobs: int, max_memory: int | None, notes: list[str], scaled: bool
) -> int:
    """``jobs`` analysis processes, fewer if ``max_memory`` cannot hold them (and a note)."""
    allowed = jobs_within(source, jobs, max_memory, scaled)
    if allowed < jobs:
        notes.append(
            f"analysis ran in {allowed} process{'es' if allowed > 1 else ''} instead of --jobs "
            f"{jobs}: each needs about {format_size(worker_memory(source, scaled))} and --max-memory is "
            f"{format_size(max_memory or 0)}"
        )
    return allowed


def sweep_budgets(prepared: Prepared, points: int = 12) -> list[int]:
    """Budgets evenly spaced from the smallest feasible size to the 16-bit size."""
    low, high = prepared.size_range()
    return [low + (high - low) * k // (points - 1) for k in range(points)]


def plan_points(prepared: Prepared, budgets: Sequence[int]) -> list[tuple[int, Plan]]:
    """A plan per budget; never a worse plan for a larger budget (a plan that fits a smaller
    budget fits a larger one too, so it is kept if the solver's answer is not better)."""
    out: list[tuple[int, Plan]] = []
    best: Plan | None = None
    for budget in sorted(budgets):
        plan = prepared.plan(budget)
        if best is not None and best.distortion < plan.distortion:
            plan = best
        best = plan
        out.append((budget, plan))
    return out
