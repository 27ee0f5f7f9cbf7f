"""Predicted against measured KLD for the stock mlx-lm rows (issue 20).

``plan`` and the model card price every stock ``mlx_lm convert`` setting from mint's own
analysis (:mod:`mint_mlx.allocation.stock`): each tensor's error with MLX's own scales, mlx-lm's own
layer rules, the same second-order KLD prediction as mint's plans. This checks that
prediction against the stock rows the frontier measured (32k tokens of held-out text, the
16-bit testbed as reference; ``benchmarks/results/32k/<testbed>.json``), and the predicted
bytes against the bytes of the files mlx-lm wrote.

    python benchmarks/stock_prediction.py --testbed smollm2-135m gemma3-270m

The analysis is the default one (fisher, fitted scales, row-sampled), from the cache when the
testbed was analyzed before.
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mint_mlx.allocation.prepare import output_dtype, prepare
from mint_mlx.paths import cache_root
from mint_mlx.source.model import open_source

HERE = Path(__file__).resolve().parent


def run_testbed(testbed: str, frontier: Path) -> dict[str, Any]:
    source = open_source(cache_root() / "testbeds" / testbed)
    start = time.perf_counter()
    prepared = prepare(
        source, output_dtype(source, None), objective="fisher", scale_method="optimized"
    )
    prepare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    points = prepared.stock
    stock_seconds = time.perf_counter() - start
    measured = json.loads((frontier / f"{testbed}.json").read_text())["rows"]
    rows = []
    for p in points:
        m = measured.get(f"stock:{p.name}")
        rows.append(
            {
                "name": p.name,
                "predicted_bytes": p.bytes,
                "measured_bytes": None if m is None else m["bytes"],
                "bits_per_weight": p.bits_per_weight,
                "predicted_kld": p.predicted_kld,
                "measured_kld": None if m is None else m["kld_mean"],
            }
        )
    return {
        "testbed": testbed,
        "parameters": source.total_parameters,
        "prepare_seconds": prepare_seconds,
        "stock_seconds": stock_seconds,
        "rows": rows,
    }


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    ratios = [
        r["predicted_kld"] / r["measured_kld"]
        for r in rows
        if r["measured_kld"] and r["predicted_kld"] is not None
    ]
    if not ratios:
        return "no measured rows"
    logs = sorted(math.log(x) for x in ratios)
    median = math.exp(logs[len(logs) // 2])
    return (
        f"{len(ratios)} rows; predicted/measured median {median:.2f}, range "
        f"{min(ratios):.2f}-{max(ratios):.2f}"
    )


def markdown(state: dict[str, Any]) -> str:
    m = state["machine"]
    lines = [
        "### Stock rows: predicted against measured KLD",
        "",
        "Predicted by `plan` from the default analysis (fitted-scales analysis, MLX's own scales "
        "for the stock price, mlx-lm's own layer rules); measured by the frontier (32k tokens "
        f"of held-out text). Machine: {m['platform']}, {m['cpus']} CPUs, MLX {m['mlx']}, "
        f"mlx-lm {m['mlx_lm']}.",
        "",
    ]
    for testbed, t in state["testbeds"].items():
        lines += [
            f"#### {testbed}",
            "",
            f"{_summary(t['rows'])}; analysis {t['prepare_seconds']:.1f} s (cache reads "
            f"included), pricing every stock setting {t['stock_seconds']:.2f} s.",
            "",
            "| stock setting | bits/weight | bytes predicted | bytes written by mlx-lm | "
            "predicted KLD | measured KLD | predicted / measured |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["rows"]:
            mb = "" if r["measured_bytes"] is None else f"{r['measured_bytes']:,}"
            mk = "not measured" if r["measured_kld"] is None else f"{r['measured_kld']:.4f}"
            ratio = (
                ""
                if r["measured_kld"] is None or r["predicted_kld"] is None
                else f"{r['predicted_kld'] / r['measured_kld']:.2f}"
            )
            lines.append(
                f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['predicted_bytes']:,} | {mb} | "
                f"{r['predicted_kld']:.4f} | {mk} | {ratio} |"
            )
        lines.append("")
    lines += ["```", *state["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--frontier", type=Path, default=HERE / "results" / "32k")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    out_json = args.out / "stock-prediction.json"
    if args.report_only:
        state = json.loads(out_json.read_text())
    else:
        state = json.loads(out_json.read_text()) if out_json.is_file() else {"testbeds": {}}
        state["machine"] = {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
        }
        state["commands"] = [
            "python benchmarks/stock_prediction.py --testbed " + " ".join(args.testbed)
        ]
        for testbed in args.testbed:
            state["testbeds"][testbed] = run_testbed(testbed, args.frontier)
            args.out.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(state, indent=1))
    (args.out / "stock-prediction.md").write_text(markdown(state))
    print(markdown(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
