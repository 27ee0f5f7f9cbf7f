"""The quality/size frontier: stock mlx-lm baselines, mint-mlx default and "paper mode".

For one testbed (a real model built by ``mint_mlx.tools.testbeds``) on ``heldout.txt``:

1. stock mlx-lm models made by mlx-lm's own convert (:mod:`mint_mlx.tools.baselines`);
2. at the exact byte size of each *target* baseline, ``mint_mlx.convert`` with the default
   objective (``mint``) and with ``objective="paper"`` (``paper``), budget = that size;
3. every model scored against the testbed's float reference on the same token windows
   (:func:`mint_mlx.tools.evaluation.build_reference_cache`: the reference runs once).

Results go to ``<out>/<testbed>.json`` after every row, so an interrupted run keeps what it
measured and a re-run skips finished rows; then ``<out>/<testbed>.md`` (tables) and
``<out>/<testbed>.png`` (mean KLD against bits per weight). Built models live in ``--work`` and
are deleted once scored.

    python benchmarks/frontier.py --testbed smollm2-135m --tokens 8192 \\
        --baselines affine-4-g64 mxfp4 --targets affine-4-g64
"""

from __future__ import annotations

from mint_mlx.blas import openblas_active, use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

from mint_mlx.tools import evaluation as ev

# isort: split
import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mint_mlx.errors import MintError
from mint_mlx.paths import cache_root
from mint_mlx.sensitivity.calibrate import DEFAULT_SEQUENCES, SEQ_LEN
from mint_mlx.tools.baselines import (
    baseline_by_name,
    build_baseline,
    safetensors_bytes,
    stock_baselines,
)

#: Matched methods: (objective, scales, formats). "mint" is the default of convert; "paper" the
#: published method; "nrmse" and "fisher-rtn" are the ablation steps between them (issue 7): the
#: native candidate set with a weight-error objective, then output-aware weighting, then fitted
#: scales. "mint-ext" is the default with ``--formats extended`` (issue 4): the same objective
#: over the native and the extended formats, at the same bytes as "mint". "mint-hqq" is the
#: default with ``--scales hqq`` (issue 22): same objective and candidates, HQQ's scales instead
#: of the fitted ones (its RTN counterpart, ``--scales rtn``, is "fisher-rtn").
MATCHED = {
    "mint": ("fisher", "optimized", "native"),
    "paper": ("paper", "rtn", "native"),
    "nrmse": ("nrmse", "rtn", "native"),
    "fisher-rtn": ("fisher", "rtn", "native"),
    "mint-ext": ("fisher", "optimized", "extended"),
    "mint-hqq": ("fisher", "hqq", "native"),
    "mint-gptq": ("fisher", "gptq", "native"),
    "mint-eq": ("fisher", "optimized", "native"),
    "mint-gptq-eq": ("fisher", "gptq", "native"),
    "mint-cal": ("fisher", "optimized", "native"),
    "mint-r32x64": ("fisher", "optimized", "native"),
    "mint-r64x32": ("fisher", "optimized", "native"),
    "mint-r32x32": ("fisher", "optimized", "native"),
    "mint-seed1": ("fisher", "optimized", "native"),
    "mint-seed2": ("fisher", "optimized", "native"),
}
#: The matched methods that add ``--equalize`` (equivalent scaling, issue 18's AWQ lever).
EQUALIZED = ("mint-eq", "mint-gptq-eq")
#: The matched methods calibrated on the wiki-text testbed's ``tune.txt`` (``--calibration``)
#: instead of text the model samples itself: issue 18's data-free against calibration ablation
#: (the text the mlx-lm tools get in benchmarks/peers.py).
TUNE_CALIBRATED = ("mint-cal",)
#: The matched methods with another self-sampled calibration recipe, (sequences, tokens each):
#: issue 17's faster sensitivity pass (sampling takes one decode step per token of a sequence,
#: so more, shorter sequences of the same total tokens sample in fewer, larger steps).
RECIPES = {"mint-r32x64": (32, 64), "mint-r64x32": (64, 32), "mint-r32x32": (32, 32)}
#: The default recipe with another sample of text (``--calibration-seed``): how much a plan's
#: KLD moves with the sample alone, the yardstick for the recipes above.
SEEDS = {"mint-seed1": 1, "mint-seed2": 2}
#: The scale-method rows of issue 22, run at ``--scale-targets``: mint with HQQ's and with
#: MLX's round-to-nearest scales, beside the default (fitted scales).
SCALE_ROWS = (
    "mint-hqq",
    "fisher-rtn",
    "mint-gptq",
    "mint-eq",
    "mint-gptq-eq",
    "mint-cal",
    *RECIPES,
    *SEEDS,
)
ABLATIONS = ("nrmse", "fisher-rtn")
PLOT_LABELS = {
    "mint": "mint-mlx default",
    "paper": "paper mode (MINT)",
    "nrmse": "ablation: native formats, NRMSE objective, RTN",
    "fisher-rtn": "ablation: + Fisher weighting, RTN",
    "mint-ext": "mint-mlx --formats extended",
    "mint-hqq": "mint-mlx --scales hqq",
    "mint-gptq": "mint-mlx --scales gptq",
    "mint-eq": "mint-mlx --equalize",
    "mint-gptq-eq": "mint-mlx --scales gptq --equalize",
    "mint-cal": "mint-mlx --calibration tune.txt",
    "mint-r32x64": "mint-mlx, calibration 32 x 64 sampled tokens",
    "mint-r64x32": "mint-mlx, calibration 64 x 32 sampled tokens",
    "mint-r32x32": "mint-mlx, calibration 32 x 32 sampled tokens",
    "mint-seed1": "mint-mlx, calibration seed 1",
    "mint-seed2": "mint-mlx, calibration seed 2",
    "hqq": "uniform, HQQ scales (stock layout)",
}
#: "hqq": a stock row re-quantized with HQQ's scales (same layers, bits, groups and bytes as
#: mlx-lm's convert; no allocation, no calibration), the stock-style HQQ baseline of issue 22.
METHODS = ("stock", "hqq", *MATCHED)
ISSUE_TARGETS = ("affine-3-g64", "affine-4-g64", "affine-4-g32", "mixed_3_6-g64")
#: Line colours by family (the stock affine and mixed lines by group size), distinct from
#: mint's red and paper mode's purple.
COLORS = {"g32": "C1", "g64": "C0", "g128": "C7"}
#: A paired difference of mean KLD within this many standard errors counts as "level".
LEVEL_SE = 2.0


# ----------------------------------------------------------------------------- state


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "openblas": openblas_active(),
    }


def load_state(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file, or a fresh one. Rows measured under other settings are not mixed in."""
    if path.is_file():
        state: dict[str, Any] = json.loads(path.read_text())
        if state.get("settings") != settings:
            raise SystemExit(
                f"error: {path} holds results for {state.get('settings')}, not {settings}; "
                "use another --out or delete it"
            )
        return state
    return {"settings": settings, "rows": {}}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a run killed mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _row(key: str, method: str, result: ev.EvalResult, nbytes: int, params: int) -> dict:
    return {
        "key": key,
        "method": method,
        "bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / params,
        "ppl": result.ppl,
        "ppl_stderr": result.ppl_stderr,
        "kld_mean": result.kld_mean,
        "kld_median": result.kld_median,
        "kld_p99": result.kld_p99,
        "top1": result.top1_agreement,
        "n_tokens": result.n_tokens,
        "eval_seconds": result.seconds,
        "kld_windows": result.kld_windows,
    }


def score_cached(
    testbed: str, cache: Any, key: str, path: Path
) -> tuple[ev.EvalResult, list[float]]:
    """Score ``path`` against the cached reference, printing progress; with the load average
    when scoring began (the machine is shared, so rows record it)."""
    load = os.getloadavg()
    print(f"[{testbed}] {key}: evaluating (load {load[0]:.1f})", flush=True)
    r = ev.evaluate_cached(path, cache, None, progress=True, per_window=True)
    print(f"[{testbed}] {key}: PPL {r.ppl:.3f}  KLD {r.kld_mean:.4f}  ({r.seconds:.0f} s)")
    return r, list(load)


def mint_at_bytes(
    testbed: str, ref: Path, work: Path, key: str, budget: int, params: int, cache: Any
) -> dict[str, Any]:
    """mint-mlx's default conversion at exactly ``budget`` bytes (another tool's output size),
    scored against the cached reference: the row a benchmark puts beside that tool's row, or an
    error row when the budget is infeasible. The converted model is deleted once scored."""
    from mint_mlx.convert import convert

    mkey = f"mint@{key}"
    mpath = work / mkey.replace("@", "-at-").replace(":", "-")
    print(f"[{testbed}] {mkey}: convert at {budget} bytes", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        res = convert(ref, mpath, budget=budget, force=True)
    except MintError as e:
        return {"key": mkey, "method": "mint", "target": key, "error": str(e)}
    build_seconds = time.perf_counter() - start
    build_load = [list(load_before), list(os.getloadavg())]
    r, load = score_cached(testbed, cache, mkey, mpath)
    row = _row(mkey, "mint", r, safetensors_bytes(mpath), params)
    row.update(
        name=f"mint @ {key}",
        target=key,
        budget=budget,
        plan_total_bytes=res.plan.total_bytes,
        predicted_kld=res.plan.predicted_kld,
        build_seconds=build_seconds,
        phase_seconds=dict(res.seconds),
        build_loadavg=build_load,
        eval_loadavg=load,
        command=f"python -m mint_mlx.convert --hf-path {ref} --budget {budget}",
        formats=plan_distribution(res.plan),
    )
    shutil.rmtree(mpath)
    return row


def plan_distribution(plan: Any) -> str:
    """The plan's formats by share of parameters, largest first (1% and up), for tables; shared
    by the benchmarks that put a mint row beside another tool's (peers, llamacpp)."""
    rows = sorted(plan.distribution(), key=lambda r: -r["pct_params"])
    return ", ".join(f"{r['format']} {r['pct_params']:.0f}%" for r in rows if r["pct_params"] >= 1)


def _extended_share(plan: Any) -> float:
    """Percent of the parameters stored in formats stock MLX lacks."""
    from mint_mlx.formats import format_by_name

    return sum(
        r["pct_params"] for r in plan.distribution() if not format_by_name(r["format"]).native
    )


# ----------------------------------------------------------------------------- run


def run_testbed(args: argparse.Namespace, testbed: str) -> dict[str, Any]:
    from mint_mlx.convert import convert
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed, ensure_wiki_text

    ref = ensure_testbed(testbed, progress=True)
    text = ensure_wiki_text() / "heldout.txt"
    tune = ensure_wiki_text() / "tune.txt"
    settings = {"tokens": args.tokens, "seq_len": args.seq_len, "backend": args.backend}
    out_json = args.out / f"{testbed}.json"
    state = load_state(out_json, settings)
    work = (args.work or cache_root() / "frontier") / testbed
    work.mkdir(parents=True, exist_ok=True)
    params = open_source(ref).total_parameters

    print(f"[{testbed}] reference forward over {args.tokens} tokens (cached in {work})")
    cache = ev.build_reference_cache(
        ref,
        text,
        work / "reference",
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        backend=args.backend,
        progress=True,
    )
    ref_bytes = safetensors_bytes(ref)
    state["testbed"] = testbed
    state["text"] = str(text)
    state["machine"] = _machine()
    state.setdefault("reference", {})
    state["reference"].update(
        {
            "path": str(ref),
            "bytes": ref_bytes,
            "bits_per_weight": 8.0 * ref_bytes / params,
            "parameters": params,
            "ppl": cache.ppl,
            "n_tokens": int(cache.nll.size),
            "n_windows": cache.n_windows,
            "reference_cache_bytes": cache.nbytes,
        }
    )
    if cache.seconds:
        state["reference"]["seconds"] = cache.seconds
    state.setdefault("commands", [])
    command = "python benchmarks/frontier.py " + shlex.join(sys.argv[1:])
    if command not in state["commands"]:
        state["commands"].append(command)
    save_state(out_json, state)
    rows: dict[str, dict[str, Any]] = state["rows"]

    def score(key: str, path: Path) -> ev.EvalResult:
        print(f"[{testbed}] {key}: evaluating", flush=True)
        r = ev.evaluate_cached(path, cache, args.batch_size, progress=True, per_window=True)
        print(
            f"[{testbed}] {key}: PPL {r.ppl:.3f}  KLD {r.kld_mean:.4f}  "
            f"top-1 {r.top1_agreement:.3f}  ({r.seconds:.0f} s)",
            flush=True,
        )
        return r

    def stock_row(name: str) -> None:
        key = f"stock:{name}"
        if key in rows:
            return
        path = work / key.replace(":", "-")
        print(f"[{testbed}] {key}: building with mlx_lm.convert", flush=True)
        b = build_baseline(ref, path, name, force=True, total_parameters=params)
        r = score(key, path)
        row = _row(key, "stock", r, b.total_bytes, params)
        row.update(
            name=name,
            build_seconds=b.seconds,
            command=b.command,
            float_layers=len(b.float_layers),
            float_layer_reasons=sorted({f["reason"] for f in b.float_layers}),
            float_parameters_note=(
                f"{len(b.float_layers)} of {b.quantized_layers + len(b.float_layers)} "
                "quantizable layers left in 16-bit"
                if b.float_layers
                else ""
            ),
        )
        rows[key] = row
        save_state(out_json, state)
        shutil.rmtree(path)
        write_reports(args.out, state)

    def hqq_row(name: str) -> None:
        key = f"hqq:{name}"
        if key in rows:
            return
        path = work / key.replace(":", "-")
        print(f"[{testbed}] {key}: stock layout, HQQ scales", flush=True)
        start = time.perf_counter()
        b = build_baseline(ref, path, name, force=True, total_parameters=params)
        stock_bytes = safetensors_bytes(path)
        requantized = requantize_hqq(path, ref)
        build_seconds = time.perf_counter() - start
        nbytes = safetensors_bytes(path)
        # the same tensors, shapes and dtypes (requantize_hqq checks each); only the safetensors
        # header may differ by a few bytes (MLX lays the tensors out in its own order, so the
        # offsets in the header have other digits)
        if abs(nbytes - stock_bytes) > 1024:
            raise SystemExit(f"error: {key} is {nbytes} bytes, the stock layout {stock_bytes}")
        r = score(key, path)
        row = _row(key, "hqq", r, nbytes, params)
        row.update(
            name=f"{name} (HQQ)",
            target=name,
            build_seconds=build_seconds,
            requantized_layers=requantized,
            stock_bytes=stock_bytes,
            command=f"{b.command}; then every affine layer re-quantized with "
            "mint_mlx.quant.hqq.hqq_affine (no columns), same bits and group size",
        )
        rows[key] = row
        save_state(out_json, state)
        shutil.rmtree(path)
        write_reports(args.out, state)

    def matched_row(method: str, target: str) -> None:
        key = f"{method}@{target}"
        if key in rows:
            return
        budget = rows[f"stock:{target}"]["bytes"]
        path = work / key.replace("@", "-at-")
        print(f"[{testbed}] {key}: convert at {budget} bytes", flush=True)
        start = time.perf_counter()
        objective, scales, formats = MATCHED[method]
        sequences, length = RECIPES.get(method, (DEFAULT_SEQUENCES, SEQ_LEN))
        try:
            res = convert(
                ref,
                path,
                budget=budget,
                objective=objective,
                scales=scales,
                formats=formats,
                force=True,
                equalize=method in EQUALIZED,
                calibration=tune if method in TUNE_CALIBRATED else None,
                calibration_sequences=sequences,
                calibration_length=length,
                calibration_seed=SEEDS.get(method, 0),
            )
        except MintError as e:  # e.g. below the smallest feasible size: say so in the table
            rows[key] = {"key": key, "method": method, "target": target, "error": str(e)}
            save_state(out_json, state)
            print(f"[{testbed}] {key}: {e}", flush=True)
            return
        build_seconds = time.perf_counter() - start
        r = score(key, path)
        row = _row(key, method, r, safetensors_bytes(path), params)
        row.update(
            name=f"{method} @ {target}",
            target=target,
            budget=budget,
            plan_total_bytes=res.plan.total_bytes,
            predicted_kld=res.plan.predicted_kld,
            raw_distortion=res.plan.distortion,
            objective=objective,
            scales=scales,
            formats_set=formats,
            build_seconds=build_seconds,
            command=(
                f"python -m mint_mlx.convert --hf-path {ref} --budget {budget}"
                + ("" if method == "mint" else f" --objective {objective} --scales {scales}")
                + ("" if formats == "native" else f" --formats {formats}")
                + (" --equalize" if method in EQUALIZED else "")
                + (f" --calibration {tune}" if method in TUNE_CALIBRATED else "")
                + (
                    f" --calibration-sequences {sequences} --calibration-length {length}"
                    if method in RECIPES
                    else ""
                )
                + (f" --calibration-seed {SEEDS[method]}" if method in SEEDS else "")
            ),
            formats=plan_distribution(res.plan),
            extended_pct_params=_extended_share(res.plan),
        )
        rows[key] = row
        save_state(out_json, state)
        shutil.rmtree(path)
        write_reports(args.out, state)

    # Targets first, each followed by mint and paper at its size, so that a run cut short has the
    # matched comparisons; the targets' stock rows are needed for their sizes in any case.
    order = [
        *args.targets,
        *args.ablation_targets,
        *args.extended_targets,
        *args.scale_targets,
        *args.hqq_baselines,
        *(args.baselines if "stock" in args.methods else []),
    ]
    for name in dict.fromkeys(order):
        stock_row(name)
        if name in args.targets:
            for method in ("mint", "paper"):
                if method in args.methods:
                    matched_row(method, name)
        if name in args.ablation_targets:
            for method in ABLATIONS:
                if method in args.methods:
                    matched_row(method, name)
        if name in args.extended_targets and "mint-ext" in args.methods:
            matched_row("mint-ext", name)
        if name in args.scale_targets:
            for method in SCALE_ROWS:
                if method in args.methods:
                    matched_row(method, name)
        if name in args.hqq_baselines and "hqq" in args.methods:
            hqq_row(name)

    write_reports(args.out, state)
    if not args.keep_reference_cache:
        shutil.rmtree(cache.directory, ignore_errors=True)
    return state


# ----------------------------------------------------------------------------- reports


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """Mean KLD difference a - b over the same windows and its standard error (paired by
    window), or None without per-window data."""
    wa, wb = a.get("kld_windows"), b.get("kld_windows")
    if not wa or not wb or len(wa) != len(wb):
        return None
    d = [x - y for x, y in zip(wa, wb, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def verdict(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """ahead / level / behind on mean KLD, paired by window, at 2 standard errors."""
    p = paired(ours, theirs)
    if p is None:
        return "?"
    diff, se = p
    if abs(diff) <= LEVEL_SE * se:
        return "level"
    return "ahead" if diff < 0 else "behind"


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _label(row: dict[str, Any]) -> str:
    return row.get("name") or row["key"]


def markdown(state: dict[str, Any]) -> str:
    """The tables of one testbed: all rows by size, then mint and paper against their target."""
    ref = state["reference"]
    s = state["settings"]
    rows = [r for r in state["rows"].values() if "error" not in r]
    lines = [
        f"### {state['testbed']}",
        "",
        f"{ref['n_tokens']} scored tokens ({ref['n_windows']} windows of {s['seq_len']}) of "
        f"`heldout.txt`; reference (dithered 16-bit testbed, {ref['bytes']} bytes, "
        f"{ref['bits_per_weight']:.2f} bits/weight) PPL **{ref['ppl']:.3f}**. KLD is "
        "KL(reference || model) in nats per token; bits per weight = 8 x all .safetensors "
        f"bytes / {ref['parameters']} parameters. Backend {s['backend']}.",
        "",
        "| method | model | bytes | bits/weight | PPL | mean KLD | median KLD | p99 KLD "
        "| same top-1 | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["method"])):
        note = r.get("float_parameters_note") or r.get("formats", "")
        lines.append(
            f"| {r['method']} | {_label(r)} | {r['bytes']} | {r['bits_per_weight']:.3f} "
            f"| {r['ppl']:.3f} | {_fmt(r['kld_mean'], '.4f')} | {_fmt(r['kld_median'], '.4f')} "
            f"| {_fmt(r['kld_p99'], '.3f')} | {_fmt(r['top1'], '.3f')} | {note} |"
        )
    errors = [r for r in state["rows"].values() if "error" in r]
    for r in errors:
        lines.append(f"| {r['method']} | {r['key']} | — | — | — | — | — | — | — | {r['error']} |")
    matched = [r for r in rows if r.get("target")]
    if matched:
        lines += [
            "",
            "Same size (budget = the baseline's exact bytes). Ratio = mean KLD / the baseline's; "
            f"verdict from the per-window paired difference of mean KLD: within {LEVEL_SE:g} "
            "standard errors is *level*.",
            "",
            "| baseline | bytes | baseline KLD | method | bytes | KLD | ratio | PPL (base -> method) "
            "| verdict |",
            "|---|---:|---:|---|---:|---:|---:|---|---|",
        ]
        for r in sorted(matched, key=lambda r: (r["bits_per_weight"], r["method"])):
            b = state["rows"].get(f"stock:{r['target']}")
            if b is None:
                continue
            lines.append(
                f"| {r['target']} | {b['bytes']} | {b['kld_mean']:.4f} | {r['method']} "
                f"| {r['bytes']} | {r['kld_mean']:.4f} | {_ratio(r['kld_mean'] / b['kld_mean'])} "
                f"| {b['ppl']:.3f} -> {r['ppl']:.3f} | {verdict(r, b)} |"
            )
    lines += vs_every_baseline(state)
    lines += extended_vs_native(state)
    lines += scale_methods(state)
    return "\n".join(lines) + "\n"


def extended_vs_native(state: dict[str, Any]) -> list[str]:
    """Issue 4: ``--formats extended`` against native-only mint at the same budget, with the
    extended formats' share of the parameters (what the allocator bought with them)."""
    pairs = []
    for r in state["rows"].values():
        if r.get("method") == "mint-ext" and "error" not in r:
            native = state["rows"].get(f"mint@{r['target']}")
            if native and "error" not in native:
                pairs.append((native, r))
    if not pairs:
        return []
    out = [
        "",
        "Extended formats (issue 4): mint-mlx with `--formats extended` against native-only "
        "mint-mlx at the same budget. Ratio = extended KLD / native KLD; verdict from the "
        f"per-window paired difference (within {LEVEL_SE:g} standard errors is *level*).",
        "",
        "| budget of | native bytes | native KLD | extended bytes | extended KLD | ratio "
        "| PPL (native -> extended) | verdict | params in extended formats | largest of them |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for native, ext in sorted(pairs, key=lambda p: p[0]["bytes"]):
        chosen = ", ".join(
            part.strip()
            for part in ext.get("formats", "").split(",")
            if "-g16" in part or "-g256" in part or "-cs" in part
        )
        out.append(
            f"| {ext['target']} | {native['bytes']:,} | {native['kld_mean']:.4f} "
            f"| {ext['bytes']:,} | {ext['kld_mean']:.4f} "
            f"| {ext['kld_mean'] / native['kld_mean']:.2f} "
            f"| {native['ppl']:.3f} -> {ext['ppl']:.3f} | {verdict(ext, native)} "
            f"| {ext.get('extended_pct_params', 0.0):.1f}% | {chosen or '—'} |"
        )
    return out


def scale_methods(state: dict[str, Any]) -> list[str]:
    """Issue 22: at each target, mint with fitted (default), HQQ and RTN scales, each paired
    against the default; and uniform HQQ against uniform RTN (stock) at the same bytes."""
    rows = {k: r for k, r in state["rows"].items() if "error" not in r}
    targets = sorted(
        {r["target"] for r in rows.values() if r["method"] in (*SCALE_ROWS, "hqq")},
        key=lambda t: rows[f"stock:{t}"]["bytes"] if f"stock:{t}" in rows else 0,
    )
    if not targets:
        return []
    out = [
        "",
        "Scale methods (issue 22): mint-mlx with its fitted scales (default), `--scales hqq` "
        "and `--scales rtn` (fisher-rtn) at the same budget, each against the default "
        "(ratio = KLD / default's, verdict paired by window); and mlx-lm's uniform layout with "
        "HQQ's scales against stock RTN at the same bytes.",
        "",
        "| budget of | default KLD | hqq KLD | hqq / default | verdict | rtn KLD | rtn / default "
        "| verdict | stock RTN KLD | uniform HQQ KLD | HQQ / RTN | verdict |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]

    def cell(r: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
        if r is None:
            return "not run | — | —"
        if base is None:
            return f"{r['kld_mean']:.4f} | — | —"
        return f"{r['kld_mean']:.4f} | {r['kld_mean'] / base['kld_mean']:.2f} | {verdict(r, base)}"

    for t in targets:
        mint = rows.get(f"mint@{t}")
        stock = rows.get(f"stock:{t}")
        hqq_u = rows.get(f"hqq:{t}")
        uniform = (
            "— | not run | — | —"
            if hqq_u is None
            else f"{stock['kld_mean']:.4f} | {cell(hqq_u, stock)}"
            if stock
            else f"— | {cell(hqq_u, None)}"
        )
        out.append(
            f"| {t} | {_fmt(mint and mint['kld_mean'], '.4f')} "
            f"| {cell(rows.get(f'mint-hqq@{t}'), mint)} "
            f"| {cell(rows.get(f'fisher-rtn@{t}'), mint)} | {uniform} |"
        )
    return out


def requantize_hqq(path: Path, ref: Path) -> int:
    """Replace every affine layer of the mlx-lm model at ``path`` by HQQ's quantization of the
    same source weight at the same bits and group size (no column weights: HQQ needs no data),
    in place; returns the number of layers. Float-mode layers (no biases) are left alone."""
    import mlx.core as mx

    from mint_mlx.quant.hqq import hqq_affine
    from mint_mlx.source.model import open_source

    source = open_source(ref)
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization", {})
    done = 0
    for shard in sorted(path.glob("*.safetensors")):
        arrays = mx.load(str(shard))
        for k in [k for k in arrays if k.endswith(".scales")]:
            module = k[: -len(".scales")]
            if f"{module}.biases" not in arrays:
                continue
            entry = quant.get(module)
            entry = entry if isinstance(entry, dict) else quant
            bits, group = int(entry["bits"]), int(entry["group_size"])
            w = source.tensor(f"{module}.weight")
            wq, s, b = hqq_affine(w, bits, group, arrays[k].dtype)
            for suffix, new in (("weight", wq), ("scales", s), ("biases", b)):
                old = arrays[f"{module}.{suffix}"]
                if old.shape != new.shape or old.dtype != new.dtype:
                    raise SystemExit(f"error: {module}.{suffix}: {new.shape} vs {old.shape}")
                arrays[f"{module}.{suffix}"] = new
            done += 1
        mx.eval(arrays)
        tmp = shard.with_suffix(".tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx"})
        tmp.replace(shard)
    return done


def _ratio(x: float) -> str:
    """Two decimals, or two significant digits below 0.01 (near-lossless rows would read 0.00)."""
    return f"{x:.2f}" if x >= 0.01 else f"{x:.2g}"


def vs_every_baseline(state: dict[str, Any], method: str = "mint") -> list[str]:
    """``method`` against every stock row: measured at the same size where it was run; else by
    dominance (a ``method`` row no larger and with lower KLD, or no smaller and with higher
    KLD); else by log-linear interpolation of its KLD between the two measured sizes around
    the baseline's (labelled as such: an estimate, not a measurement)."""
    rows = [r for r in state["rows"].values() if "error" not in r]
    refused = {
        r["target"]: r["error"]
        for r in state["rows"].values()
        if "error" in r and r["method"] == method and "target" in r
    }
    ours = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"])
    stock = sorted((r for r in rows if r["method"] == "stock"), key=lambda r: r["bytes"])
    if not ours or not stock:
        return []
    out = [
        "",
        f"{method} against every stock baseline: *measured* where it was run at the baseline's "
        "size; *dominance* where a measured point is no larger and better (or no smaller and "
        "worse); otherwise *interpolated* (log KLD linear in bits per weight between the two "
        "nearest measured points; an estimate) or *no data* outside the measured range.",
        "",
        f"| baseline | bits/weight | baseline KLD | {method} KLD | ratio | verdict | how |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for b in stock:
        same = next((r for r in ours if r.get("target") == b["name"]), None)
        if same is not None:
            k, how, v = same["kld_mean"], "measured, same size", verdict(same, b)
        else:
            smaller_better = [
                r for r in ours if r["bytes"] <= b["bytes"] and r["kld_mean"] < b["kld_mean"]
            ]
            larger_worse = [
                r for r in ours if r["bytes"] >= b["bytes"] and r["kld_mean"] > b["kld_mean"]
            ]
            lo = [r for r in ours if r["bytes"] <= b["bytes"]]
            hi = [r for r in ours if r["bytes"] >= b["bytes"]]
            if smaller_better:
                r = smaller_better[-1]
                k, how, v = r["kld_mean"], f"dominance: {r['name']} is smaller", "ahead"
            elif larger_worse:
                r = larger_worse[0]
                k, how, v = r["kld_mean"], f"dominance: {r['name']} is larger", "behind"
            elif lo and hi:
                a, c = lo[-1], hi[0]
                t = (b["bytes"] - a["bytes"]) / max(c["bytes"] - a["bytes"], 1)
                k = math.exp((1 - t) * math.log(a["kld_mean"]) + t * math.log(c["kld_mean"]))
                how = f"interpolated between {a['name']} and {c['name']}"
                v = "ahead" if k < b["kld_mean"] else "behind"
            else:
                why = "outside the measured range"
                verdict_text = "no data"
                if b["name"] in refused:  # e.g. below the smallest size the method can build
                    verdict_text = f"no {method} model this small"
                    floor = re.search(r"\((\d+) bytes\)", refused[b["name"]])
                    if floor:  # bits per weight scale with bytes (same parameter count)
                        least = int(floor[1])
                        bpw = b["bits_per_weight"] * least / b["bytes"]
                        why = f"its smallest is {least:,} bytes ({bpw:.2f} bits/weight)"
                    else:
                        why = refused[b["name"]]
                out.append(
                    f"| {b['name']} | {b['bits_per_weight']:.3f} | {b['kld_mean']:.4f} | — | — "
                    f"| {verdict_text} | {why} |"
                )
                continue
        out.append(
            f"| {b['name']} | {b['bits_per_weight']:.3f} | {b['kld_mean']:.4f} | {k:.4f} "
            f"| {_ratio(k / b['kld_mean'])} | {v} | {how} |"
        )
    return out


def plot(state: dict[str, Any], path: Path) -> None:
    """Mean KLD (log) against bits per weight, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in state["rows"].values() if "error" not in r and r.get("kld_mean")]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "stock":
            label = PLOT_LABELS[r["method"]]
        elif r["name"].startswith("affine-"):
            label = f"stock affine {r['name'].rsplit('-', 1)[1]}"
        elif r["name"].startswith("mixed_"):
            label = f"stock mixed_3_6/4_6 {r['name'].rsplit('-', 1)[1]}"
        else:
            label = "stock mxfp4 / nvfp4 / mxfp8"
        series.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {"mint-mlx default": dict(color="C3", lw=2.5, marker="o", ms=7)}
    styles["paper mode (MINT)"] = dict(color="C4", lw=1.5, marker="s", ls="--")
    styles[PLOT_LABELS["nrmse"]] = dict(color="C8", marker="^", ms=8, ls="none")
    styles[PLOT_LABELS["fisher-rtn"]] = dict(color="C9", marker="v", ms=8, ls="none")
    styles[PLOT_LABELS["mint-ext"]] = dict(color="C6", lw=1.5, marker="*", ms=10, ls="-.")
    styles[PLOT_LABELS["mint-hqq"]] = dict(color="C5", lw=1.5, marker="P", ms=8, ls="--")
    styles[PLOT_LABELS["hqq"]] = dict(color="k", marker="X", ms=8, ls="none")
    for label in sorted(series):
        pts = sorted(series[label], key=lambda r: r["bits_per_weight"])
        x = [r["bits_per_weight"] for r in pts]
        y = [r["kld_mean"] for r in pts]
        color = COLORS.get(label.split()[-1] if label.startswith("stock") else label, "C5")
        style = styles.get(label, dict(marker=".", ms=8, color=color))
        if label.startswith("stock mxfp4"):
            ax.scatter(x, y, label=label, marker="D", color="C2", zorder=3)
        else:
            if label.startswith("stock mixed"):
                style.update(ls=":", marker="x")  # same colour as its group size, dotted
            ax.plot(x, y, label=label, **style)  # type: ignore[arg-type]
        if label.startswith("stock"):
            for r in pts:
                ax.annotate(
                    r["name"],
                    (r["bits_per_weight"], r["kld_mean"]),
                    fontsize=6,
                    alpha=0.7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ref = state["reference"]
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all .safetensors bytes x 8 / parameters)")
    ax.set_ylabel("mean KL(reference || model), nats/token (log)")
    ax.set_title(
        f"{state['testbed']}: {ref['n_tokens']} tokens of heldout.txt; "
        f"fp reference PPL {ref['ppl']:.3f}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out: Path, state: dict[str, Any]) -> None:
    if not state.get("rows"):
        return
    (out / f"{state['testbed']}.md").write_text(markdown(state))
    plot(state, out / f"{state['testbed']}.png")


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    names = [b.name for b in stock_baselines()]
    p = argparse.ArgumentParser(
        prog="python benchmarks/frontier.py",
        description="Quality/size frontier: stock mlx-lm vs mint-mlx default vs paper mode.",
    )
    p.add_argument("--testbed", nargs="+", default=["smollm2-135m"], help="testbed names")
    p.add_argument("--tokens", type=int, default=32768, help="tokens of heldout.txt to score")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (auto)")
    p.add_argument("--backend", default="auto", choices=ev.BACKENDS)
    p.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="what to run"
    )
    p.add_argument(
        "--baselines", nargs="+", default=names, metavar="NAME", help=f"stock rows: {names}"
    )
    p.add_argument(
        "--targets",
        nargs="*",
        default=None,
        metavar="NAME",
        help="baselines whose byte size mint and paper mode are run at (default: every "
        f"baseline; the issue's goal points are {' '.join(ISSUE_TARGETS)})",
    )
    p.add_argument(
        "--ablation-targets",
        nargs="*",
        default=["affine-4-g64"],
        metavar="NAME",
        help="baselines whose byte size the ablation rows (nrmse, fisher-rtn) are run at",
    )
    p.add_argument(
        "--extended-targets",
        nargs="*",
        default=[],
        metavar="NAME",
        help="baselines whose byte size mint-mlx --formats extended is run at (method mint-ext)",
    )
    p.add_argument(
        "--scale-targets",
        nargs="*",
        default=[],
        metavar="NAME",
        help="baselines whose byte size mint with --scales hqq (mint-hqq) and --scales rtn "
        "(fisher-rtn) are run at (issue 22)",
    )
    p.add_argument(
        "--hqq-baselines",
        nargs="*",
        default=[],
        metavar="NAME",
        help="stock affine rows re-quantized with HQQ's scales (method hqq)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work", type=Path, help="where models are built (default: cache/frontier)")
    p.add_argument(
        "--keep-reference-cache",
        action="store_true",
        help="keep the reference's cached distributions (GBs) for a later run",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite .md/.png from the JSON")
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = args.baselines if {"mint", "paper"} & set(args.methods) else []
    if not {"mint", "paper"} & set(args.methods):
        args.targets = []
    for n in [
        *args.baselines,
        *args.targets,
        *args.ablation_targets,
        *args.extended_targets,
        *args.scale_targets,
        *args.hqq_baselines,
    ]:
        baseline_by_name(n)
    args.out.mkdir(parents=True, exist_ok=True)
    for testbed in args.testbed:
        if args.report_only:
            write_reports(args.out, json.loads((args.out / f"{testbed}.json").read_text()))
            continue
        try:
            run_testbed(args, testbed)
        except MintError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
