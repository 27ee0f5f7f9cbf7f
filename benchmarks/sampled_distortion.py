"""Sampled distortion against the full measurement (issue 17): accuracy, plan changes, time.

For each testbed, the default analysis (fisher objective, optimized scales, native formats) is
run with every weight measured and with row samples of 2^k weights per tensor
(:mod:`mint_mlx.analysis.row_sample`), each into its own cache file, on the same Fisher columns. Then:

- **accuracy**: each candidate's estimated weighted (and plain) squared error against the full
  measurement, as relative errors, by tensor size (tensors measured whole are left out);
- **plans**: at the four goal sizes (the bytes of stock affine-3-g64, mixed_3_6-g64,
  affine-4-g64 and affine-4-g32, from the 32k frontier of record), how many tensors get another
  format, and the sampled plan's distortion computed from the *full* curves against the full
  plan's (what the sample costs in the allocator's own objective);
- **time**: each analysis's wall time, in this process, one after the other.

    python benchmarks/sampled_distortion.py --testbed smollm2-135m gemma3-270m

A re-run reuses the cache files in ``--work`` (the times recorded then are kept).
``--report-only`` re-renders the markdown from the JSON.
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mint_mlx.analysis.row_sample import SAMPLE_ELEMENTS

HERE = Path(__file__).resolve().parent
TARGETS = ("affine-3-g64", "mixed_3_6-g64", "affine-4-g64", "affine-4-g32")
#: Tensor-size buckets (elements) for the accuracy table.
BUCKETS = (
    (0, 1 << 18),
    (1 << 18, 1 << 20),
    (1 << 20, 1 << 22),
    (1 << 22, 1 << 24),
    (1 << 24, 1 << 40),
)


def _bucket(numel: int) -> str:
    for low, high in BUCKETS:
        if low <= numel < high:
            return (
                f"{_elements(low)}-{_elements(high)}" if high < 1 << 40 else f">={_elements(low)}"
            )
    raise AssertionError(numel)


def _elements(n: int) -> str:
    return "0" if n == 0 else f"2^{n.bit_length() - 1}"


def _quantiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.abs(np.array(values))
    return {
        "n": int(a.size),
        "median": float(np.median(a)),
        "p95": float(np.quantile(a, 0.95)),
        "max": float(a.max()),
    }


def run_testbed(testbed: str, samples: list[int | None], work: Path, jobs: int) -> dict[str, Any]:
    from mint_mlx.allocation.allocate import DEFAULT_MIN_SQNR, weighted_distortion
    from mint_mlx.allocation.prepare import Prepared, output_dtype
    from mint_mlx.analysis.analyze import analyze
    from mint_mlx.formats import formats_for
    from mint_mlx.sensitivity.calibrate import CalibrationConfig, sensitivity
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed

    source = open_source(ensure_testbed(testbed))
    dtype = output_dtype(source, None)
    frontier = json.loads((HERE / "results" / "32k" / f"{testbed}.json").read_text())
    budgets = {t: int(frontier["rows"][f"stock:{t}"]["bytes"]) for t in TARGETS}
    config = CalibrationConfig()
    found = sensitivity(source, config, True, "auto", None)
    key = config.key(source)
    candidates = formats_for("fisher", "optimized", "native")
    out_json = work / f"{testbed}.json"
    state: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    state.setdefault("seconds", {})
    curves: dict[str, Any] = {}
    plans: dict[str, dict[str, Any]] = {}
    for sample in samples:
        name = "all" if sample is None else f"2^{sample.bit_length() - 1}"
        cache = work / f"{testbed}-{name}.jsonl"
        start = time.perf_counter()
        got = analyze(
            source,
            candidates,
            dtype,
            cache,
            progress=True,
            columns=found.columns,
            calibration=key,
            scale_method="optimized",
            jobs=jobs,
            sample_elements=sample,
        )
        seconds = time.perf_counter() - start
        state["seconds"].setdefault(name, round(seconds, 1))
        curves[name] = got
        prepared = Prepared(
            source, dtype, "fisher", "optimized", DEFAULT_MIN_SQNR, got, found.columns, cache
        )
        plans[name] = {t: prepared.plan(b) for t, b in budgets.items()}
        out_json.write_text(json.dumps(state, indent=1))

    full = {c.path: c for c in curves["all"]}
    layers = source.num_layers

    def true_distortion(plan: Any) -> float:
        total = 0.0
        for a in plan.assignments:
            curve = full[a.path]
            cand = next(c for c in curve.candidates if c.format == a.format)
            total += weighted_distortion(curve, cand, layers, "fisher")
        return total

    rows: dict[str, Any] = {}
    for name, got in curves.items():
        if name == "all":
            continue
        by_bucket: dict[str, dict[str, list[float]]] = {}
        by_format: dict[str, list[float]] = {}
        sampled = 0
        for c in got:
            if not c.sampled_rows:
                continue
            sampled += 1
            ref = {x.format: x for x in full[c.path].candidates}
            b = by_bucket.setdefault(_bucket(c.numel), {"weighted": [], "plain": []})
            for x in c.candidates:
                r = ref[x.format]
                if r.wsse and x.wsse is not None:
                    b["weighted"].append(x.wsse / r.wsse - 1.0)
                    by_format.setdefault(x.format, []).append(x.wsse / r.wsse - 1.0)
                if r.sse:
                    b["plain"].append(x.sse / r.sse - 1.0)
        plan_rows = {}
        for t in TARGETS:
            mine, theirs = plans[name][t], plans["all"][t]
            changed = [p for p, f in mine.formats.items() if theirs.formats[p] != f]
            params = {a.path: a.numel for a in theirs.assignments}
            true_mine, true_full = true_distortion(mine), true_distortion(theirs)
            plan_rows[t] = {
                "tensors_changed": len(changed),
                "params_changed_pct": 100.0
                * sum(params[p] for p in changed)
                / sum(params.values()),
                "distortion_full_plan": true_full,
                "distortion_sampled_plan_on_full_curves": true_mine,
                "distortion_excess_pct": 100.0 * (true_mine / true_full - 1.0),
                "predicted_kld_sampled": mine.predicted_kld,
                "predicted_kld_full": theirs.predicted_kld,
                "predicted_kld_diff_pct": 100.0 * (mine.predicted_kld / theirs.predicted_kld - 1.0),
            }
        rows[name] = {
            "tensors_sampled": sampled,
            "tensors": len(got),
            "accuracy": {
                bucket: {kind: _quantiles(v) for kind, v in d.items() if v}
                for bucket, d in sorted(by_bucket.items())
            },
            "plans": plan_rows,
            "weighted_by_format": {f: _quantiles(v) for f, v in sorted(by_format.items())},
        }
    state.update(
        testbed=testbed,
        parameters=source.total_parameters,
        tensors=len(curves["all"]),
        budgets=budgets,
        jobs=jobs,
        rows=rows,
    )
    out_json.write_text(json.dumps(state, indent=1))
    return state


def markdown(states: list[dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    lines = [
        "# Sampled distortion against the full measurement (issue 17)",
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs; MLX {machine['mlx']} on the "
        f"CPU; load average at the end {machine['load']}.",
        "",
        "```",
        command,
        "```",
        "",
    ]
    for s in states:
        lines += [
            f"## {s['testbed']} ({s['parameters']:,} parameters, {s['tensors']} tensors)",
            "",
            "Analysis wall time (`--jobs "
            f"{s['jobs']}`): " + ", ".join(f"{k}: {v:.1f} s" for k, v in s["seconds"].items()),
            "",
            "Relative error of each candidate's estimate against the full measurement "
            "(|estimate / full - 1| over every sampled tensor and candidate; weighted = the "
            "Fisher-weighted error the objective uses):",
            "",
            "| sample | tensor size | tensors sampled / all | estimates | weighted median | "
            "weighted p95 | weighted max | plain median | plain p95 | plain max |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in s["rows"].items():
            for bucket, acc in row["accuracy"].items():
                w, p = acc.get("weighted"), acc.get("plain")
                cells = [
                    f"{100 * q[k]:.2f}%" if q else "-"
                    for q in (w, p)
                    for k in ("median", "p95", "max")
                ]
                lines.append(
                    f"| {name} | {bucket} | {row['tensors_sampled']} / {row['tensors']} | "
                    f"{w['n'] if w else 0} | " + " | ".join(cells) + " |"
                )
        default = f"2^{SAMPLE_ELEMENTS.bit_length() - 1}"
        if default in s["rows"]:
            per = s["rows"][default]["weighted_by_format"]
            lines += [
                "",
                f"At the default sample ({default} weights), the weighted error's relative error "
                "by format (every sampled tensor):",
                "",
                "| format | median | p95 | max |",
                "|---|---:|---:|---:|",
                *[
                    f"| {f} | {100 * q['median']:.2f}% | {100 * q['p95']:.2f}% | "
                    f"{100 * q['max']:.2f}% |"
                    for f, q in per.items()
                ],
            ]
        lines += [
            "",
            "Plans at the goal sizes: tensors given another format than the full measurement's "
            "plan, and the sampled plan's distortion computed from the full curves against the "
            "full plan's (the allocator's own objective; positive = worse):",
            "",
            "| sample | goal size | budget bytes | tensors changed | params changed | "
            "distortion excess | predicted KLD sampled / full |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for name, row in s["rows"].items():
            for t, pr in row["plans"].items():
                lines.append(
                    f"| {name} | {t} | {s['budgets'][t]:,} | {pr['tensors_changed']} | "
                    f"{pr['params_changed_pct']:.1f}% | {pr['distortion_excess_pct']:+.2f}% | "
                    f"{pr['predicted_kld_sampled']:.4f} / {pr['predicted_kld_full']:.4f} "
                    f"({pr['predicted_kld_diff_pct']:+.2f}%) |"
                )
        lines.append("")
    return "\n".join(lines)


def kld_rows(testbed: str, new_dir: Path) -> list[str]:
    """The sampled analysis's plans against the exact analysis's, measured: the mint rows of a
    frontier run made with this code (``new_dir``) against the 32k frontier of record, paired by
    window on the same 32k tokens."""
    from frontier import paired

    old = json.loads((HERE / "results" / "32k" / f"{testbed}.json").read_text())["rows"]
    path = new_dir / f"{testbed}.json"
    new = json.loads(path.read_text())["rows"] if path.exists() else {}
    if not any("kld_mean" in new.get(f"mint@{t}", {}) for t in TARGETS):
        return []
    lines = [
        f"### {testbed}: measured KLD, sampled against exact analysis (32k tokens)",
        "",
        "| goal size | exact: KLD | sampled: KLD | difference (paired) | verdict | "
        "predicted KLD exact / sampled | formats (sampled) |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for t in TARGETS:
        a, b = new.get(f"mint@{t}"), old.get(f"mint@{t}")
        if a is None or b is None or "kld_mean" not in a:
            continue
        p = paired(a, b)
        assert p is not None
        diff, se = p
        verdict = "level" if abs(diff) <= 2 * se else ("better" if diff < 0 else "worse")
        lines.append(
            f"| {t} | {b['kld_mean']:.4f} | {a['kld_mean']:.4f} | {diff:+.4f} ± {se:.4f} | "
            f"{verdict} | {b['predicted_kld']:.4f} / {a['predicted_kld']:.4f} "
            f"({100 * (a['predicted_kld'] / b['predicted_kld'] - 1):+.2f}%) | {a['formats']} |"
        )
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument(
        "--samples", nargs="+", type=int, default=[15, 16, 17, 18], help="log2 sample sizes"
    )
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--work", type=Path, help="cache files and per-testbed JSON (default: cache)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--kld-from",
        type=Path,
        help="with --report-only: a frontier.py --out folder whose mint rows were made with "
        "the sampled analysis; adds their paired KLD against the rows of record",
    )
    args = p.parse_args(argv)
    from mint_mlx.paths import cache_root

    out_json = args.out / "sampled-distortion.json"
    if args.report_only:
        d = json.loads(out_json.read_text())
        text = markdown(d["testbeds"], d["machine"], d["command"])
        if args.kld_from:
            for s in d["testbeds"]:
                text += "\n" + "\n".join(kld_rows(s["testbed"], args.kld_from))
        (args.out / "sampled-distortion.md").write_text(text)
        print(text)
        return 0
    work = args.work or cache_root() / "sampled-distortion"
    work.mkdir(parents=True, exist_ok=True)
    samples: list[int | None] = [None, *(1 << k for k in args.samples)]
    states = [run_testbed(t, samples, work, args.jobs) for t in args.testbed]
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "mlx": version("mlx"),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    import shlex
    import sys

    command = "python benchmarks/sampled_distortion.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        json.dumps({"testbeds": states, "machine": machine, "command": command}, indent=1)
    )
    (args.out / "sampled-distortion.md").write_text(markdown(states, machine, command))
    print((args.out / "sampled-distortion.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
