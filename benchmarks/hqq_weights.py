"""HQQ scales in weight space (issue 22): the Fisher-weighted error of each scale method per
format, summed over a testbed's tensors, and what each method's analysis costs.

For each scale method (rtn, hqq, optimized) the analysis of the fitted candidate set (18
native affine formats + passthrough, the default's) runs from a fresh cache, timed, with the
same Fisher column weights (from the calibration cache) and the same row sample; the curves'
weighted and plain squared errors are summed per format over all tensors. Then, exactly over
every tensor at 4-bit g64 and 3-bit g64: how often HQQ's own (scale, bias) was kept (not
MLX's, the incumbent) and how many groups are wide enough for HQQ's shrink to act at all
(|error| <= step / 2 must exceed beta^(-1/(2-p)) for shrink_p to be nonzero).

    python benchmarks/hqq_weights.py --testbed smollm2-135m --jobs 1
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

METHODS = ("rtn", "hqq", "optimized")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/hqq_weights.py", description=__doc__)
    p.add_argument("--testbed", default="smollm2-135m")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mint_mlx.analysis.analyze import analyze
    from mint_mlx.formats import formats_for
    from mint_mlx.quant.hqq import BETA, LP_NORM, hqq_fit
    from mint_mlx.sensitivity.calibrate import CalibrationConfig, calibrate
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed

    source = open_source(ensure_testbed(args.testbed, progress=True))
    dtype = mx.bfloat16
    config = CalibrationConfig()
    key = config.key(source)
    t = time.perf_counter()
    columns = calibrate(source, config)
    calib_s = time.perf_counter() - t
    formats = formats_for("fisher", "optimized")
    rows: list[dict[str, Any]] = []
    for method in METHODS:
        with tempfile.TemporaryDirectory(prefix="mint-hqq-") as tmp:
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            curves = analyze(
                source,
                formats,
                dtype,
                Path(tmp) / "analysis.jsonl",
                columns=columns,
                calibration=key,
                scale_method=method,
                jobs=args.jobs,
            )
            seconds = time.perf_counter() - t
        per_format: dict[str, dict[str, float]] = {}
        for c in curves:
            for cand in c.candidates:
                e = per_format.setdefault(cand.format, {"sse": 0.0, "wsse": 0.0})
                e["sse"] += cand.sse
                e["wsse"] += cand.wsse or 0.0
        rows.append(
            {
                "scales": method,
                "analysis_seconds": seconds,
                "tensors": len(curves),
                "load_average_1min": [load0, os.getloadavg()[0]],
                "per_format": per_format,
            }
        )
        print(f"{method:10s} analysis {seconds:.1f} s (load {load0:.1f})", flush=True)

    # exact, every tensor: how often HQQ's own values are kept, and whether the shrink can act
    threshold = BETA ** (-1.0 / (2.0 - LP_NORM))
    diag: dict[str, dict[str, float]] = {}
    for bits in (4, 3):
        kept = groups = wide = 0
        fit_s = 0.0
        for info in source.quantizable:
            if info.fixed is not None or len(info.shape) != 2 or info.shape[-1] % 64:
                continue
            w = source.tensor(info.key).astype(mx.float32)
            cols = columns[info.key].astype(mx.float32)
            t = time.perf_counter()
            fit = hqq_fit(w, bits, 64, dtype, cols)
            fit_s += time.perf_counter() - t
            _, s_mlx, _ = mx.quantize(w.astype(dtype), group_size=64, bits=bits)
            s_hqq = np.array(fit.scales)[..., 0]
            kept += int((s_hqq != np.array(s_mlx.astype(mx.float32))).sum())
            groups += s_hqq.size
            wide += int((np.abs(s_hqq) / 2 > threshold).sum())
        diag[f"affine-{bits}-g64"] = {
            "groups": groups,
            "hqq_kept_fraction": kept / groups,
            "shrink_possible_fraction": wide / groups,
            "exact_fit_seconds": fit_s,
        }
        print(f"affine-{bits}-g64: {diag[f'affine-{bits}-g64']}", flush=True)

    state = {
        "testbed": args.testbed,
        "calibration_seconds_cached": calib_s,
        "formats": [f.name for f in formats],
        "rows": rows,
        "hqq_diagnostics": diag,
        "shrink_threshold": threshold,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mlx": version("mlx"),
        },
        "commands": ["python benchmarks/hqq_weights.py " + " ".join(sys.argv[1:])],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"hqq-weights-{args.testbed}.json").write_text(json.dumps(state, indent=1))
    (args.out / f"hqq-weights-{args.testbed}.md").write_text(markdown(state))
    print(markdown(state))
    return 0


def markdown(state: dict[str, Any]) -> str:
    rows = {r["scales"]: r for r in state["rows"]}
    lines = [
        f"### Weight-space error per scale method on {state['testbed']}",
        "",
        "Sum over all tensors of the analysis's Fisher-weighted squared error (row-sampled, the "
        "same rows for every method), per format; ratios against RTN (MLX's rule).",
        "",
        "| format | rtn wsse | hqq / rtn | optimized / rtn | hqq plain / rtn | "
        "optimized plain / rtn |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in state["formats"]:
        r = rows["rtn"]["per_format"].get(name)
        if not r or r["wsse"] <= 0:
            continue
        h, o = rows["hqq"]["per_format"][name], rows["optimized"]["per_format"][name]
        lines.append(
            f"| {name} | {r['wsse']:.4g} | {h['wsse'] / r['wsse']:.3f} | "
            f"{o['wsse'] / r['wsse']:.3f} | {h['sse'] / r['sse']:.3f} | {o['sse'] / r['sse']:.3f} |"
        )
    lines += [
        "",
        "| scales | analysis s | load avg (1 min, start / end) |",
        "|---|---:|---|",
    ]
    for r in state["rows"]:
        la = r["load_average_1min"]
        lines.append(f"| {r['scales']} | {r['analysis_seconds']:.1f} | {la[0]:.1f} / {la[1]:.1f} |")
    lines += ["", "| format | groups | HQQ's values kept | groups where the shrink can act |"]
    lines += ["|---|---:|---:|---:|"]
    for name, d in state["hqq_diagnostics"].items():
        lines.append(
            f"| {name} | {d['groups']:,} | {d['hqq_kept_fraction']:.1%} "
            f"| {d['shrink_possible_fraction']:.2%} |"
        )
    lines += ["", "```", *state["commands"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
