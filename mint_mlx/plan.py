"""``python -m mint_mlx.plan``: what each size buys, before spending time on a conversion.

One analysis (cached, shared with ``convert``), then an allocation per budget: a sweep from the
smallest feasible size to the 16-bit size, each with its bytes, bits per weight, (bits, group)
mix and predicted quality. ``--fit`` plans the best model for a machine and context length.
"""

from __future__ import annotations

if __name__ == "__main__":
    # ``python -m mint_mlx.plan``: OpenBLAS goes under MLX's CPU matmul, which works only before
    # mlx.core is imported (below). Imported as a library, the module loads nothing.
    from mint_mlx.blas import use_openblas

    use_openblas()

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mint_mlx.allocation.allocate import DEFAULT_MIN_SQNR, DEFAULT_OBJECTIVE, OBJECTIVES, Plan
from mint_mlx.allocation.prepare import (
    Prepared,
    output_dtype,
    plan_points,
    prepare,
    scale_method_for,
    sweep_budgets,
)
from mint_mlx.allocation.stock import StockPoint, best_within, stock_curve, unmeasured_note
from mint_mlx.analysis.workers import default_jobs
from mint_mlx.cli import reported
from mint_mlx.devices import Fit, bytes_per_token, decode_ceiling, fit_budget, parse_machine
from mint_mlx.errors import MintError
from mint_mlx.formats import COMPACT, FORMAT_SETS
from mint_mlx.memory import resolve_max_memory
from mint_mlx.output.plots import size_quality_curve
from mint_mlx.path_safety import check_run
from mint_mlx.paths import cache_root
from mint_mlx.quant.quantize import SCALE_METHODS
from mint_mlx.sensitivity.calibrate import add_sensitivity_arguments
from mint_mlx.sizes import format_size, parse_size
from mint_mlx.source.model import open_source


def mix(plan: Plan) -> str:
    """Compact (bits, group) mix by share of parameters, e.g. ``4b/g64 61%, 3b/g32cs 20%``
    (``cs``: compact scales)."""
    parts = []
    for row in sorted(plan.distribution(), key=lambda r: -r["pct_params"]):
        if row["pct_params"] < 1.0:
            continue
        label = f"{row['bits']}b/g{row['group_size']}" if row["mode"] == "affine" else row["mode"]
        if row["mode"] == COMPACT:
            label = f"{row['bits']}b/g{row['group_size']}cs"
        if row["mode"] == "passthrough":
            label = "16b"
        parts.append(f"{label} {row['pct_params']:.0f}%")
    return ", ".join(parts)


@dataclass
class SweepPoint:
    budget: int
    bytes: int
    bits_per_weight: float
    distortion: float
    predicted_kld: float | None
    mix: str
    #: The best stock mlx-lm setting no larger than this plan's bytes (mint_mlx.allocation.stock), and
    #: its predicted quality in the same units: what a user would get from mlx_lm convert.
    stock: str | None = None
    stock_bytes: int | None = None
    stock_distortion: float | None = None
    stock_predicted_kld: float | None = None

    def with_stock(self, points: Sequence[StockPoint]) -> SweepPoint:
        best = best_within(points, self.bytes)
        if best is None:
            return self
        return replace(
            self,
            stock=best.name,
            stock_bytes=best.bytes,
            stock_distortion=best.distortion,
            stock_predicted_kld=best.predicted_kld,
        )

    def stock_ratio(self) -> float | None:
        """This plan's predicted quality over the best stock setting's (lower is better)."""
        if self.stock_distortion is None or self.stock_distortion <= 0:
            return None
        if self.predicted_kld is not None and self.stock_predicted_kld:
            return self.predicted_kld / self.stock_predicted_kld
        return self.distortion / self.stock_distortion


def to_point(budget: int, plan: Plan) -> SweepPoint:
    return SweepPoint(
        budget,
        plan.total_bytes,
        plan.bits_per_weight,
        plan.distortion,
        plan.predicted_kld,
        mix(plan),
    )


@dataclass
class PlanReport:
    """Everything ``plan`` prints: the sweep, and the fit for a machine if asked."""

    model: str
    parameters: int
    objective: str
    points: list[SweepPoint]
    fit: Fit | None = None
    fit_point: SweepPoint | None = None
    decode_ceiling_tps: float | None = None
    stock: list[StockPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "parameters": self.parameters,
            "objective": self.objective,
            "points": [asdict(p) for p in self.points],
            "stock": [p.to_json() for p in self.stock],
            "notes": self.notes,
        }
        if self.fit is not None:
            d["fit"] = {
                "machine": asdict(self.fit.machine),
                "context": self.fit.context,
                "gpu_memory": self.fit.gpu_memory,
                "kv_cache": self.fit.kv_cache,
                "runtime_reserve": self.fit.runtime_reserve,
                "weight_budget": self.fit.weight_budget,
                "headroom": self.fit.headroom,
                "plan": asdict(self.fit_point) if self.fit_point else None,
                "decode_ceiling_tokens_per_s": self.decode_ceiling_tps,
            }
        return d


def plan(
    hf_path: str | Path,
    budgets: Sequence[str | int] | None = None,
    sweep: bool = False,
    fit: str | None = None,
    context: int = 4096,
    png: str | Path | None = None,
    dtype: str | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    min_sqnr: float = DEFAULT_MIN_SQNR,
    analysis: str | Path | None = None,
    progress: bool = False,
    jobs: int = 1,
    formats: str = "native",
    scales: str | None = None,
    sensitivity_pass: str = "auto",
    max_memory: str | int | None = None,
    exact_analysis: bool = False,
    sampler: str = "auto",
    equalize: bool = False,
) -> PlanReport:
    """Plan ``hf_path`` at the given budgets (or a sweep) and optionally for a machine.

    ``formats`` and ``scales`` mean what they mean for :func:`mint_mlx.convert.convert`, so
    a plan printed here is the plan a conversion with the same flags makes (same cache too).
    """
    scale_method = scale_method_for(scales, objective)
    source = open_source(hf_path)
    cache = Path(analysis).expanduser() if analysis else None
    check_run(  # before any work: the cache and the plot may not be written into the source
        source.path,
        analysis=cache,
        written=[("--png", Path(png).expanduser())] if png is not None else [],
        cache=cache_root(create=False),
    )
    out_dtype = output_dtype(source, dtype)
    prepared = prepare(
        source,
        out_dtype,
        objective=objective,
        scale_method=scale_method,
        min_sqnr=min_sqnr,
        analysis=cache,
        progress=progress,
        jobs=jobs,
        formats=formats,
        sensitivity_pass=sensitivity_pass,
        max_memory=resolve_max_memory(max_memory),
        exact_analysis=exact_analysis,
        sampler=sampler,
        equalize=equalize,
    )
    wanted = [parse_size(b) for b in budgets or []]
    if sweep or (not wanted and fit is None):
        wanted += sweep_budgets(prepared)
    report = PlanReport(str(hf_path), source.total_parameters, objective, [])
    report.stock = prepared.stock
    unpriced = unmeasured_note(report.stock)
    report.notes = [n for n in [unpriced] if n]
    if fit is not None:
        _add_fit(report, prepared, fit, context)
    explicit = set(parse_size(b) for b in budgets or [])
    report.points = _sweep_points(prepared, wanted, explicit, report.stock)
    if png is not None and report.points:
        _write_png(report, Path(png).expanduser(), png, Path(str(hf_path)).name)
    return report


def _add_fit(report: PlanReport, prepared: Prepared, fit: str, context: int) -> None:
    """The best plan for machine ``fit`` at ``context`` tokens, and its decode speed ceiling."""
    config = prepared.source.config
    machine = parse_machine(fit)
    report.fit = fit_budget(machine, config, context)
    fit_plan = prepared.plan(report.fit.weight_budget)
    report.fit_point = to_point(report.fit.weight_budget, fit_plan).with_stock(report.stock)
    experts = sum(a.nbytes for a in fit_plan.assignments if a.role == "experts")
    per_token = bytes_per_token(config, fit_plan.total_bytes, experts)
    report.decode_ceiling_tps = decode_ceiling(machine, per_token)


def _sweep_points(
    prepared: Prepared, wanted: Sequence[int], explicit: set[int], stock: Sequence[StockPoint]
) -> list[SweepPoint]:
    """A point per wanted budget, less the sweep points that buy nothing more than the last."""
    points: list[SweepPoint] = []
    for b, p in plan_points(prepared, wanted):
        previous = points[-1] if points else None
        if previous and b not in explicit and previous.bytes == p.total_bytes:
            continue  # a sweep point that buys nothing more (the next upgrade does not fit)
        points.append(to_point(b, p).with_stock(stock))
    return points


def _write_png(report: PlanReport, path: Path, png: str | Path, name: str) -> None:
    """The size/quality curve of the sweep (the fit marked, if any) at ``path`` (``--png``)."""
    chosen = None
    if report.fit_point is not None:
        chosen = (report.fit_point.bits_per_weight, _quality(report.fit_point))
    try:
        size_quality_curve(
            [(p.bits_per_weight, _quality(p)) for p in report.points],
            path,
            chosen=chosen,
            title=f"{name}: size vs predicted quality",
            ylabel=_quality_label(report.objective),
            stock=stock_curve(report.stock),
        )
    except OSError as e:  # no such folder, permission denied, read-only, disk full
        raise MintError(
            f"cannot write --png {png} ({e.strerror or type(e).__name__}); pick a path in a "
            "folder you can write to (the analysis is cached)"
        ) from e


def _quality(p: SweepPoint) -> float:
    return p.predicted_kld if p.predicted_kld is not None else p.distortion


def _stock_cell(p: SweepPoint) -> str:
    if p.stock is None:
        return "none fits"
    quality = p.stock_predicted_kld if p.stock_predicted_kld is not None else p.stock_distortion
    ratio = p.stock_ratio()
    return f"{p.stock} ({quality:.4g}{'' if ratio is None else f', mint {ratio:.2f}x'})"


def _quality_label(objective: str) -> str:
    if objective == "fisher":
        return "predicted mean KL divergence (nats)"
    return f"{objective} distortion (no KLD prediction)"


def format_report(report: PlanReport) -> str:
    lines = [
        "| budget | bytes | bits/weight | predicted KLD | distortion | best stock that fits "
        "(its prediction, mint's ratio) | mix (share of parameters) |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in report.points:
        kld = f"{p.predicted_kld:.4f}" if p.predicted_kld is not None else "n/a"
        lines.append(
            f"| {format_size(p.budget)} | {format_size(p.bytes)} | {p.bits_per_weight:.3f} | "
            f"{kld} | {p.distortion:.4g} | {_stock_cell(p)} | {p.mix} |"
        )
    lines += [
        "",
        "stock: the best `mlx_lm convert -q` setting no larger than the plan, priced from the "
        "same analysis (MLX's own scales, mlx-lm's own layer rules)",
        *(f"note: {n}" for n in report.notes),
    ]
    if report.fit is not None and report.fit_point is not None:
        lines += [""] + report.fit.lines()
        fp = report.fit_point
        kld = f", predicted KLD {fp.predicted_kld:.4f}" if fp.predicted_kld is not None else ""
        lines.append(
            f"best plan that fits: {format_size(fp.bytes)}, {fp.bits_per_weight:.3f} bits per weight{kld}"
            f" ({fp.mix}); best stock that fits: {_stock_cell(fp)}"
        )
        if report.decode_ceiling_tps is not None:
            lines.append(
                f"decode speed ceiling (upper bound: memory bandwidth / bytes read per token): "
                f"{report.decode_ceiling_tps:.0f} tokens/s"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mint_mlx.plan",
        description="Show what each size buys (and what fits a machine) before converting.",
    )
    p.add_argument("--hf-path", required=True, help="HF-format directory or hub id")
    p.add_argument("--budgets", help="comma-separated sizes, e.g. 3GB,4GB,5GB")
    p.add_argument("--sweep", action="store_true", help="smallest feasible to 16-bit (default)")
    p.add_argument("--fit", help="machine (m3-max-64gb) or memory size (16GB) to plan for")
    p.add_argument("--context", type=int, default=4096, help="context length for the KV cache")
    p.add_argument("--png", help="write the size/quality curve here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--dtype", choices=["float16", "bfloat16"])
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE)
    p.add_argument("--min-sqnr", type=float, default=DEFAULT_MIN_SQNR)
    p.add_argument("--analysis", help="analysis cache file")
    p.add_argument(
        "--jobs", type=int, default=default_jobs(), help="analysis worker processes (all cores)"
    )
    p.add_argument(
        "--formats",
        choices=FORMAT_SETS,
        default="native",
        help="candidate formats: native (stock mlx-lm, default) or extended (needs mint_mlx.load)",
    )
    p.add_argument(
        "--scales",
        choices=SCALE_METHODS,
        help="affine scales: optimized (default), rtn (MLX's rule), hqq (HQQ's solver) or "
        "gptq (fitted, with error-compensated codes)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        help="equivalent scaling of each layer's input columns, folded into the layer before",
    )
    add_sensitivity_arguments(p)
    p.add_argument(
        "--exact-analysis",
        action="store_true",
        help="measure every candidate on every weight instead of a row sample (slower; the "
        "sample's estimates are within a few percent)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reported("interrupted (the analysis cache is kept)") as outcome:
        report = plan(
            args.hf_path,
            budgets=args.budgets.split(",") if args.budgets else None,
            sweep=args.sweep,
            fit=args.fit,
            context=args.context,
            png=args.png,
            dtype=args.dtype,
            objective=args.objective,
            min_sqnr=args.min_sqnr,
            analysis=args.analysis,
            progress=not args.quiet,
            jobs=args.jobs,
            formats=args.formats,
            scales=args.scales,
            sensitivity_pass=args.sensitivity_pass,
            max_memory=args.max_memory,
            exact_analysis=args.exact_analysis,
            sampler=args.sampler,
            equalize=args.equalize,
        )
    if outcome.exit_code is not None:
        return outcome.exit_code
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
