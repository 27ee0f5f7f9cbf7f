"""What each objective's analysis costs (issue 7): sensitivity pass and RD analysis, timed apart.

For each allocation mode (paper mode, the two ablation steps, the default) on one testbed,
a child process with a fresh, empty ``MINT_MLX_CACHE`` opens the model, runs the sensitivity
pass if the mode has one, then the analysis of every candidate format, timing each; with
``--jobs 1`` (one core, the fair comparison of work) and with all cores. Ratios are taken
against paper mode measured in the same run.

    python benchmarks/analysis_cost.py --testbed smollm2-135m
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

#: (label, objective, scales) in ablation order: paper mode first, the default last.
MODES = (
    ("paper mode", "paper", "rtn"),
    ("native formats, nrmse, RTN", "nrmse", "rtn"),
    ("+ Fisher weighting, RTN", "fisher", "rtn"),
    ("default: + optimized scales", "fisher", "optimized"),
)

CHILD = r"""
import json, sys, time
from mint_mlx.blas import use_openblas; use_openblas()  # OpenBLAS under MLX first
import mlx.core as mx
from mint_mlx.analysis.analyze import analyze, default_cache_path
from mint_mlx.formats import formats_for
from mint_mlx.source.model import open_source
path, objective, scales, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
source = open_source(path)
dtype = mx.bfloat16
columns, key, calib = None, "", 0.0
if objective == "fisher":
    from mint_mlx.sensitivity.calibrate import CalibrationConfig, calibrate
    t = time.perf_counter()
    config = CalibrationConfig()
    key = config.key(source)
    columns = calibrate(source, config)
    calib = time.perf_counter() - t
formats = formats_for(objective, scales)
t = time.perf_counter()
curves = analyze(source, formats, dtype, default_cache_path(source, formats, dtype, key, scales),
                 columns=columns, calibration=key, scale_method=scales, jobs=jobs)
analysis = time.perf_counter() - t
print(json.dumps({"calibration_seconds": calib, "analysis_seconds": analysis,
                  "candidates": len(formats), "tensors": len(curves),
                  "parameters": source.total_parameters,
                  "total_seconds": time.perf_counter() - t0}))
"""


def measure(path: Path, objective: str, scales: str, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mint-cost-") as cache:
        env = dict(os.environ, MINT_MLX_CACHE=cache)
        load = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), objective, scales, str(jobs)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(
                f"error: the {objective}/{scales} analysis failed:\n{out.stderr[-2000:]}"
            )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["load_average_1min"] = [load, os.getloadavg()[0]]
        return result


def markdown(state: dict[str, Any]) -> str:
    rows = state["rows"]
    params = rows[0]["parameters"]
    lines = [
        f"### Analysis cost on {state['testbed']} ({params:,} parameters; "
        f"{state['machine']['cpus']} CPUs, MLX {state['machine']['mlx']} on the CPU)",
        "",
        "Fresh cache per row. *sensitivity* = the Fisher pass (8 x 256 self-sampled tokens); "
        "*analysis* = every candidate format of every tensor. Ratio = analysis wall time / paper "
        "mode's at the same --jobs.",
        "",
        "| mode | objective | scales | candidates | --jobs | sensitivity s | analysis s "
        "| analysis / paper | analysis s per 1B params | load avg |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper = next(
            p["analysis_seconds"]
            for p in rows
            if p["objective"] == "paper" and p["jobs"] == r["jobs"]
        )
        lines.append(
            f"| {r['label']} | {r['objective']} | {r['scales']} | {r['candidates']} | {r['jobs']} "
            f"| {r['calibration_seconds']:.1f} | {r['analysis_seconds']:.1f} "
            f"| {r['analysis_seconds'] / paper:.1f}x "
            f"| {r['analysis_seconds'] / params * 1e9:.0f} "
            f"| {r['load_average_1min'][0]:.1f} / {r['load_average_1min'][1]:.1f} |"
        )
    lines += ["", "```", *state["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/analysis_cost.py", description=__doc__)
    p.add_argument("--testbed", default="smollm2-135m")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    from mint_mlx.tools.testbeds import ensure_testbed

    path = ensure_testbed(args.testbed, progress=True)
    rows = []
    for jobs in dict.fromkeys(args.jobs):
        for label, objective, scales in MODES:
            r = measure(path, objective, scales, jobs)
            r.update(label=label, objective=objective, scales=scales, jobs=jobs)
            print(
                f"{label:32s} jobs {jobs}: sensitivity {r['calibration_seconds']:.1f} s, "
                f"analysis {r['analysis_seconds']:.1f} s",
                flush=True,
            )
            rows.append(r)
    state = {
        "testbed": args.testbed,
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mlx": version("mlx"),
        },
        "commands": ["python benchmarks/analysis_cost.py " + " ".join(sys.argv[1:])],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"analysis-cost-{args.testbed}.json").write_text(json.dumps(state, indent=1))
    (args.out / f"analysis-cost-{args.testbed}.md").write_text(markdown(state))
    print(markdown(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
