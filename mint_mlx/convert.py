"""``python -m mint_mlx.convert``: the best mlx-lm model that fits a byte budget.

Flow: open the source -> analyze (cached) -> allocate under the budget -> write to a temporary
directory -> check it loads as planned -> rename into place -> optionally upload.
"""

from __future__ import annotations

if __name__ == "__main__":
    # ``python -m mint_mlx.convert``: OpenBLAS goes under MLX's CPU matmul, which works only
    # before mlx.core is imported (below). Imported as a library, the module loads nothing.
    from mint_mlx.blas import use_openblas

    use_openblas()

import argparse
import errno
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mint_mlx.allocation.allocate import DEFAULT_MIN_SQNR, DEFAULT_OBJECTIVE, OBJECTIVES, Plan
from mint_mlx.allocation.layout import MAX_SHARD_BYTES
from mint_mlx.allocation.prepare import DTYPES, Prepared, output_dtype, prepare, scale_method_for
from mint_mlx.allocation.stock import StockPoint, best_within
from mint_mlx.analysis.workers import default_jobs, distributed_group
from mint_mlx.cli import reported
from mint_mlx.errors import BudgetError, DiskFullError, MintError
from mint_mlx.formats import FORMAT_SETS
from mint_mlx.memory import forget_worker_peaks, peak_rss, resolve_max_memory
from mint_mlx.output import hub
from mint_mlx.output.card import (
    CARD_IMAGES,
    card_figures,
    distribution_table,
    model_card,
    summary_lines,
)
from mint_mlx.output.save import save_model_dir, staging_dir
from mint_mlx.path_safety import Read, check_run, not_writable
from mint_mlx.paths import cache_root
from mint_mlx.phases import TIMINGS_FILE, PhaseLog, closing_lines
from mint_mlx.quant.quantize import SCALE_METHODS
from mint_mlx.runtime.check import verify_saved
from mint_mlx.sensitivity.calibrate import DEFAULT_SEQUENCES, SEQ_LEN, add_sensitivity_arguments
from mint_mlx.sizes import format_size, parse_size
from mint_mlx.source.model import Source, open_source
from mint_mlx.source.origin import Origin, origin_of


@dataclass
class ConvertResult:
    """What a conversion produced (``path`` is None for a dry run)."""

    plan: Plan
    path: Path | None
    analysis: Path | None
    url: str | None = None
    rank: int = 0  # under mlx.launch: only rank 0 prints and saves
    replaced: str | None = None  # what --force replaced at ``path`` ("a mint-mlx output")
    #: Wall seconds per phase: sensitivity, analysis, plan, card (figures), save.
    seconds: dict[str, float] = field(default_factory=dict)
    #: Stock mlx-lm settings priced from the same analysis (the comparison the card shows).
    stock: list[StockPoint] = field(default_factory=list)
    #: The phases as announced, with the memory peak at the end of each.
    phases: PhaseLog | None = None


def resolve_budget(source: Source, budget: str | int | None, bpw: float | None) -> int:
    """Bytes allowed for all ``.safetensors`` files; ``bpw`` means bpw x parameters / 8."""
    if (budget is None) == (bpw is None):
        raise BudgetError("give exactly one of --budget SIZE (e.g. 5.5GB) or --bpw BITS (e.g. 4.5)")
    if bpw is not None:
        if not 1.0 <= bpw <= 32.0:
            raise BudgetError(f"--bpw {bpw} is out of range; use bits per weight between 1 and 32")
        return int(bpw * source.total_parameters / 8)
    return parse_size(budget)  # type: ignore[arg-type]


@dataclass
class ConvertOptions:
    """Every choice of a conversion besides its two paths (see :func:`convert`)."""

    budget: str | int | None = None
    bpw: float | None = None
    dtype: str | None = None
    min_sqnr: float = DEFAULT_MIN_SQNR
    dry_run: bool = False
    analysis: str | Path | None = None
    force: bool = False
    upload_repo: str | None = None
    objective: str = DEFAULT_OBJECTIVE
    calibration: str | Path | None = None
    scales: str | None = None
    max_shard_bytes: int = MAX_SHARD_BYTES
    progress: bool = False
    command: Sequence[str] | None = None
    jobs: int = 1
    formats: str = "native"
    sensitivity_pass: str = "auto"
    max_memory: str | int | None = None
    exact_analysis: bool = False
    sampler: str = "auto"
    calibration_sequences: int = DEFAULT_SEQUENCES
    calibration_length: int = SEQ_LEN
    calibration_seed: int = 0
    equalize: bool = False


@dataclass
class Published:
    """The output this run renamed into place and what that replaced, set the moment it is in
    place (:func:`mint_mlx.path_safety.publish` calls it with Ctrl-C held back): a Ctrl-C after
    it interrupted only the upload, and the CLI says so."""

    path: Path | None = None
    replaced: str | None = None

    def __call__(self, out: Path, replaced: str | None) -> None:
        self.path = out.resolve()
        self.replaced = replaced


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    budget: str | int | None = None,
    bpw: float | None = None,
    dtype: str | None = None,
    min_sqnr: float = DEFAULT_MIN_SQNR,
    dry_run: bool = False,
    analysis: str | Path | None = None,
    force: bool = False,
    upload_repo: str | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    calibration: str | Path | None = None,
    scales: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    command: Sequence[str] | None = None,
    jobs: int = 1,
    formats: str = "native",
    sensitivity_pass: str = "auto",
    max_memory: str | int | None = None,
    exact_analysis: bool = False,
    sampler: str = "auto",
    calibration_sequences: int = DEFAULT_SEQUENCES,
    calibration_length: int = SEQ_LEN,
    calibration_seed: int = 0,
    equalize: bool = False,
) -> ConvertResult:
    """Convert ``hf_path`` into an mlx-lm model at ``mlx_path`` whose weights fit ``budget``.

    Exactly one of ``budget`` (bytes or a size like ``"5.5GB"``) and ``bpw`` is given. With
    ``dry_run`` only the plan is made (and the analysis cached). ``formats="extended"`` lets the
    allocator also pick mint-mlx's extended formats; an output that uses one loads with
    :func:`mint_mlx.load` (stock mlx-lm refuses it by name). ``max_memory`` (bytes or a size;
    default :func:`mint_mlx.memory.default_max_memory`) bounds the sensitivity pass, which runs
    in memory or block by block as ``sensitivity_pass`` says, from text that ``sampler`` (the
    source, or its 4-bit copy; see :data:`mint_mlx.sensitivity.calibrate.SAMPLERS`) samples. Raises
    :class:`MintError` subclasses for anything the user can fix.
    """
    options = ConvertOptions(
        budget=budget,
        bpw=bpw,
        dtype=dtype,
        min_sqnr=min_sqnr,
        dry_run=dry_run,
        analysis=analysis,
        force=force,
        upload_repo=upload_repo,
        objective=objective,
        calibration=calibration,
        scales=scales,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        command=command,
        jobs=jobs,
        formats=formats,
        sensitivity_pass=sensitivity_pass,
        max_memory=max_memory,
        exact_analysis=exact_analysis,
        sampler=sampler,
        calibration_sequences=calibration_sequences,
        calibration_length=calibration_length,
        calibration_seed=calibration_seed,
        equalize=equalize,
    )
    return run_conversion(hf_path, mlx_path, options)


def run_conversion(
    hf_path: str | Path,
    mlx_path: str | Path,
    options: ConvertOptions,
    published: Published | None = None,
) -> ConvertResult:
    """:func:`convert` with its choices in ``options``; ``published`` is told when the output
    is in place. The steps: check the options and paths -> analyze and plan -> (rank 0, not a
    dry run) card and figures -> write, check and publish the output -> upload."""
    published = Published() if published is None else published
    out = Path(mlx_path).expanduser()
    scales = _scale_method(options)
    source = open_source(hf_path)
    cache = Path(options.analysis).expanduser() if options.analysis else None
    group = distributed_group()
    writes = group is None or group.rank() == 0  # under mlx.launch only rank 0 writes files
    reads = check_run(  # before any work: nothing the run reads may be written or replaced
        source.path,
        out=out if writes and not options.dry_run else None,
        force=options.force,
        calibration=options.calibration,
        analysis=cache if writes else None,
        cache=cache_root(create=False),
    )
    out_dtype = output_dtype(source, options.dtype)
    nbytes = resolve_budget(source, options.budget, options.bpw)
    forget_worker_peaks()  # this conversion's workers only
    phases = _phase_log(source, options, writes)
    prepared = _prepare(source, out_dtype, scales, cache, options, phases)
    seconds = dict(prepared.seconds)
    plan = _plan(prepared, nbytes, phases, seconds)
    group = distributed_group()
    if group is not None and group.rank() != 0:  # mlx.launch: rank 0 saves
        return ConvertResult(plan, None, prepared.cache, rank=group.rank(), seconds=seconds)
    if options.dry_run:
        phases.finish()
        return ConvertResult(
            plan, None, prepared.cache, seconds=seconds, stock=prepared.stock, phases=phases
        )
    card = _card(hf_path, source, out, nbytes, prepared, plan, options)
    check_free_space(out, plan.total_bytes)
    staged = _Staged(source, prepared, plan, out_dtype, card, options, phases, seconds)
    _save(staged, out, reads, published)
    url = hub.upload(out, options.upload_repo) if options.upload_repo else None
    return ConvertResult(
        plan,
        out,
        prepared.cache,
        url,
        replaced=published.replaced,
        seconds=seconds,
        stock=prepared.stock,
        phases=phases,
    )


def _scale_method(options: ConvertOptions) -> str:
    """The scale method to use, after the checks that need no source."""
    if options.calibration is not None and not Path(options.calibration).is_file():
        raise MintError(f"calibration file {options.calibration} does not exist; pass a text file")
    return scale_method_for(options.scales, options.objective)


def _phase_log(source: Source, options: ConvertOptions, writes: bool) -> PhaseLog:
    """The phases this run announces (only the process that writes, and only with progress)."""
    return PhaseLog(
        [
            *(["sensitivity"] if options.objective == "fisher" else []),
            "analysis",
            "plan",
            *([] if options.dry_run else ["card", "save"]),
        ],
        source.total_parameters,
        enabled=options.progress and writes,
        timings=cache_root(create=False) / TIMINGS_FILE,
    )


def _prepare(
    source: Source,
    out_dtype: mx.Dtype,
    scale_method: str,
    cache: Path | None,
    options: ConvertOptions,
    phases: PhaseLog,
) -> Prepared:
    """The sensitivity pass and the analysis (both cached): everything but the budget."""
    return prepare(
        source,
        out_dtype,
        objective=options.objective,
        scale_method=scale_method,
        min_sqnr=options.min_sqnr,
        analysis=cache,
        calibration=None if options.calibration is None else str(options.calibration),
        max_shard_bytes=options.max_shard_bytes,
        progress=options.progress,
        jobs=options.jobs,
        formats=options.formats,
        sensitivity_pass=options.sensitivity_pass,
        max_memory=resolve_max_memory(options.max_memory),
        exact_analysis=options.exact_analysis,
        sampler=options.sampler,
        phases=phases,
        calibration_sequences=options.calibration_sequences,
        calibration_length=options.calibration_length,
        calibration_seed=options.calibration_seed,
        equalize=options.equalize,
    )


def _plan(prepared: Prepared, nbytes: int, phases: PhaseLog, seconds: dict[str, float]) -> Plan:
    """The allocation at ``nbytes``, timed, with the memory peak so far."""
    phases.start("plan", f"budget {format_size(nbytes)}")
    start = time.perf_counter()
    plan = prepared.plan(nbytes)
    seconds["plan"] = time.perf_counter() - start
    plan.peak_memory = peak_rss()
    return plan


def _card(
    hf_path: str | Path,
    source: Source,
    out: Path,
    nbytes: int,
    prepared: Prepared,
    plan: Plan,
    options: ConvertOptions,
) -> str:
    """The model card (README.md), with the command line as the card shows it."""
    origin = origin_of(hf_path, source.path, source.config)
    argv = options.command or [
        "--hf-path",
        str(hf_path),
        "--mlx-path",
        out.name,
        "--budget",
        str(nbytes),
    ]
    return model_card(
        plan,
        origin,
        command=public_command(argv, origin, out),
        name=out.name,
        images=CARD_IMAGES,
        stock=prepared.stock,
    )


@dataclass
class _Staged:
    """What goes into the output directory, and where the save phase reports to."""

    source: Source
    prepared: Prepared
    plan: Plan
    dtype: mx.Dtype
    card: str
    options: ConvertOptions
    phases: PhaseLog
    seconds: dict[str, float]


def _save(staged: _Staged, out: Path, reads: Sequence[Read], published: Published) -> None:
    """Write the output into a temporary sibling of ``out``, check that it loads as planned,
    and rename it into place; a disk that fills up or refuses is one line."""
    try:
        with staging_dir(out, staged.options.force, reads, published) as tmp:
            _write_output(staged, tmp, out.name)
    except OSError as e:
        refused = not_writable(e, "--mlx-path", out)
        if refused is not None:
            raise refused from e
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device of {out.parent} while saving (the model needs "
                f"{format_size(staged.plan.total_bytes)}); free space or pick another "
                "--mlx-path, then re-run: the analysis is cached"
            ) from e
        raise


def _write_output(staged: _Staged, tmp: Path, name: str) -> None:
    """The card's figures, then the model directory, then the post-save check, timed."""
    phases, seconds, plan = staged.phases, staged.seconds, staged.plan
    phases.start("card", "size/quality curve over 10 budgets, layer heatmap")
    start = time.perf_counter()
    card_figures(staged.prepared, plan, tmp, name)
    seconds["card"] = time.perf_counter() - start
    phases.start("save", f"{format_size(plan.total_bytes)}, then read back and checked")
    start = time.perf_counter()
    save_model_dir(
        staged.source,
        plan,
        tmp,
        staged.dtype,
        staged.card,
        max_shard_bytes=staged.options.max_shard_bytes,
        progress=staged.options.progress,
        columns=staged.prepared.columns,
        moments=staged.prepared.moments,
        scaling=staged.prepared.scaling,
    )
    verify_saved(tmp, plan)
    seconds["save"] = time.perf_counter() - start
    phases.finish()
    if staged.options.progress:
        phases.save_rates(seconds)


#: Room kept free beyond the weights: config, tokenizer, card and its figures.
SPACE_MARGIN = 64 * 2**20


#: Options whose value is a local path, and what the card shows instead (see public_command).
_PATH_OPTIONS = ("--hf-path", "--mlx-path", "--calibration", "--analysis")


def public_command(argv: Sequence[str], origin: Origin, out: Path) -> str:
    """The conversion's command line as the card shows it: the source by its hub id (or folder
    name), the output by its name, other files by their names; never a local absolute path."""
    shown = {"--hf-path": origin.name, "--mlx-path": out.name}
    args: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            args.append(shown.get(pending, Path(arg).name))
            pending = None
            continue
        option, eq, value = arg.partition("=")
        if option in _PATH_OPTIONS and eq:
            args.append(f"{option}={shown.get(option, Path(value).name)}")
        elif arg in _PATH_OPTIONS:
            args.append(arg)
            pending = arg
        else:
            args.append(arg)
    return "python -m mint_mlx.convert " + shlex.join(args)


def check_free_space(out: Path, weight_bytes: int) -> None:
    """Refuse up front when the output's file system cannot hold the model."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < weight_bytes + SPACE_MARGIN:
        raise DiskFullError(
            f"{parent} has {format_size(free)} free but the model needs "
            f"{format_size(weight_bytes + SPACE_MARGIN)}; free space or pick another --mlx-path"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mint_mlx.convert",
        description="Quantize a model to the best stock-mlx-lm model that fits a memory budget.",
    )
    p.add_argument("--hf-path", required=True, help="HF-format model directory or hub id")
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", help="bytes for all weight files: 5.5GB, 5GiB, 800MB")
    size.add_argument("--bpw", type=float, help="average bits per weight instead of --budget")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="16-bit dtype for scales and unquantized tensors"
    )
    p.add_argument(
        "--min-sqnr", type=float, default=DEFAULT_MIN_SQNR, help="SQNR veto in dB (default 9)"
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=DEFAULT_OBJECTIVE,
        help="fisher: output-sensitivity weighted (default); nrmse: weight error with role priors",
    )
    p.add_argument(
        "--scales",
        choices=SCALE_METHODS,
        help="affine scales: optimized (fitted, default), rtn (MLX's rule; default in paper mode) "
        "hqq (HQQ's lp-norm zero-point solver) or gptq (fitted, with error-compensated "
        "codes from the calibration text's input correlations; still stock-loadable)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        help="equivalent scaling (AWQ's lever): scale each layer's input columns by their "
        "sensitivity and fold the inverse into the norm or layer before; same function, "
        "still stock-loadable",
    )
    p.add_argument(
        "--calibration",
        help="text file for the sensitivity estimate (default: text the model samples itself)",
    )
    p.add_argument(
        "--calibration-sequences",
        type=int,
        default=DEFAULT_SEQUENCES,
        metavar="N",
        help=f"sequences for the sensitivity estimate (default {DEFAULT_SEQUENCES}); fewer is "
        "faster and noisier (see README)",
    )
    p.add_argument(
        "--calibration-length",
        type=int,
        default=SEQ_LEN,
        metavar="T",
        help=f"tokens per calibration sequence (default {SEQ_LEN}); sampling takes T steps, so "
        "more, shorter sequences sample faster",
    )
    p.add_argument(
        "--calibration-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the self-sampled calibration text (default 0); another seed shows how "
        "much the plan depends on the sample",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan, write only the analysis cache"
    )
    p.add_argument("--analysis", help="analysis cache file (default: in ~/.cache/mint_mlx)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --mlx-path if it is an earlier output (never a source or other files)",
    )
    p.add_argument("--upload-repo", help="hub repo (org/name) to upload the result to")
    p.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="analysis worker processes (default: all cores); under mlx.launch, per rank",
    )
    p.add_argument(
        "--formats",
        choices=FORMAT_SETS,
        default="native",
        help="candidate formats: native (stock mlx-lm loads the output, default) or extended "
        "(adds group 16/256 and compact scales; load with mint_mlx.load)",
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


def stock_line(plan: Plan, stock: Sequence[StockPoint]) -> str | None:
    """One line: the best stock mlx-lm setting of no more bytes, and how mint compares."""
    best = best_within(stock, plan.total_bytes or plan.planned_bytes)
    if best is None:
        return None
    if plan.predicted_kld is not None and best.predicted_kld:
        return (
            f"best stock setting that fits ({best.command}): predicted KLD "
            f"{best.predicted_kld:.4f}, this plan {plan.predicted_kld / best.predicted_kld:.2f}x that"
        )
    return f"best stock setting that fits ({best.command}): distortion {best.distortion:.4g}"


def print_plan(plan: Plan) -> None:
    print(distribution_table(plan))
    print()
    for line in summary_lines(plan):
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = ConvertOptions(
        budget=args.budget,
        bpw=args.bpw,
        dtype=args.dtype,
        min_sqnr=args.min_sqnr,
        dry_run=args.dry_run,
        analysis=args.analysis,
        force=args.force,
        upload_repo=args.upload_repo,
        objective=args.objective,
        calibration=args.calibration,
        scales=args.scales,
        progress=not args.quiet,
        command=list(sys.argv[1:] if argv is None else argv),
        jobs=args.jobs,
        formats=args.formats,
        sensitivity_pass=args.sensitivity_pass,
        max_memory=args.max_memory,
        exact_analysis=args.exact_analysis,
        sampler=args.sampler,
        calibration_sequences=args.calibration_sequences,
        calibration_length=args.calibration_length,
        calibration_seed=args.calibration_seed,
        equalize=args.equalize,
    )
    published = Published()
    out = Path(args.mlx_path).expanduser()
    with reported(lambda: _interrupted(out, args.upload_repo, published)) as outcome:
        result = run_conversion(args.hf_path, args.mlx_path, options, published)
    if outcome.exit_code is not None:
        return outcome.exit_code
    if result.rank != 0:
        return 0  # mlx.launch worker rank: rank 0 reports
    print_result(result)
    return 0


def _interrupted(out: Path, upload_repo: str | None, published: Published) -> str:
    """What a Ctrl-C left: the output saved (the upload to resume), or nothing but the cache."""
    if upload_repo and published.path == out.resolve():
        return (
            f"interrupted during the upload; {out} is saved, resume with "
            f"python -m mint_mlx.output.hub {shlex.quote(str(out))} --repo {upload_repo}"
        )
    if published.path == out.resolve():
        return f"interrupted; {out} was already saved complete"
    return "interrupted; no output was written (the analysis cache is kept)"


def print_result(result: ConvertResult) -> None:
    """The plan, the stock comparison, what was saved and replaced, the timings, the upload."""
    print_plan(result.plan)
    line = stock_line(result.plan, result.stock)
    if line:
        print(line)
    if result.replaced is not None:
        print(f"replaced {result.path} ({result.replaced}, as --force asked)")
    if result.path is not None:
        print(f"saved {result.path}")
    for line in closing_lines(result.seconds, result.phases):
        print(line)
    if result.url:
        print(f"uploaded {result.url}")


if __name__ == "__main__":
    raise SystemExit(main())
