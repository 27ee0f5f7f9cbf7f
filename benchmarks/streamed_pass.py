"""The streamed sensitivity pass against the in-memory one, on a real testbed (issue 16).

Each stage runs as its own child process (wall time and the kernel's peak RSS of exactly that
process), on the same calibration tokens:

1. ``sample``: the default 8 x 256 tokens the model samples itself, with the whole float32
   model in memory; ``sample-streamed``: the same with one block resident (must be identical);
2. ``pass in-memory`` / ``pass streamed`` / ``pass streamed --on-disk``: the column Fisher;
3. in this process: the analysis with each pass's columns (separate caches, nothing shared)
   and the plans at the four goal sizes (the bytes of stock affine-3-g64, mixed_3_6-g64,
   affine-4-g64 and affine-4-g32, read from the frontier of record), compared format by format.

The FLOP rate counts the matmul weights only, 6 x weights x tokens for both passes: the
in-memory pass runs the forward and the backward to inputs and to weights; the streamed pass
runs the forward, each block's forward again in the backward walk and the backward to inputs,
but no weight gradient (its probes sum the squared gradient from two token x token products).
It is printed beside this machine's float32 matmul rate, measured in the same run.
``--report-only`` re-renders the markdown from the JSON (rates recomputed from the seconds).

    python benchmarks/streamed_pass.py --testbed gemma3-270m
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import version
from math import prod
from pathlib import Path
from typing import Any

from cost import matmul_gflops, run_measured  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
TARGETS = ("affine-3-g64", "mixed_3_6-g64", "affine-4-g64", "affine-4-g32")


def _stage(args: argparse.Namespace) -> int:
    """One measured stage, in a child process."""
    import mlx.core as mx
    import numpy as np

    from mint_mlx.sensitivity.calibrate import CalibrationConfig, column_fisher, load_float32_model
    from mint_mlx.sensitivity.sampling import sample_sequences, start_token
    from mint_mlx.sensitivity.streamed import streamed_column_fisher, streamed_sample
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed

    source = open_source(ensure_testbed(args.testbed))
    config = CalibrationConfig()
    work = Path(args.work)
    start = time.perf_counter()
    if args.stage in ("sample", "sample-streamed"):
        n, length, seed = config.sequences, config.seq_len, config.seed
        if args.stage == "sample":
            model = load_float32_model(source)
            seqs = sample_sequences(model, start_token(source), n, length, seed, True)
        else:
            seqs = streamed_sample(source, start_token(source), n, length, seed, True)
        np.save(work / f"{args.stage}.npy", np.array(seqs))
    else:
        seqs = mx.array(np.load(work / "sample.npy"))
        keys = [t.key for t in source.quantizable]
        if args.kind == "in-memory":
            columns = column_fisher(load_float32_model(source), seqs, keys, True)
        else:
            columns = streamed_column_fisher(source, seqs, keys, args.on_disk, True)
        name = args.kind + ("-disk" if args.on_disk else "")
        mx.save_safetensors(str(work / f"columns-{name}.safetensors"), columns)
    print(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


def _child(argv: list[str], work: Path, log: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--work", str(work)]
    result = run_measured(cmd, work / log)
    inner = json.loads(result["output_tail"].strip().splitlines()[-1])
    return {
        "seconds": round(inner["seconds"], 1),
        "wall_seconds": round(result["wall_seconds"], 1),
        "peak_rss_mib": round(result["peak_rss_mib"], 1),
        "load_average_1min": result["load_average_1min"],
    }


def _matmul_weights(source: Any) -> int:
    """Weights that take part in matmuls (the embedding lookup does not, a tied head does)."""
    total = sum(prod(t.shape) for t in source.quantizable if t.role != "embedding")
    if source.tied_embeddings:
        total += sum(prod(t.shape) for t in source.quantizable if t.role == "embedding")
    return total


def _plans(source: Any, columns: Any, budgets: dict[str, int], cache: Path) -> dict[str, Any]:
    from mint_mlx.allocation.allocate import DEFAULT_MIN_SQNR
    from mint_mlx.allocation.prepare import Prepared, output_dtype
    from mint_mlx.analysis.analyze import analyze
    from mint_mlx.formats import formats_for
    from mint_mlx.sensitivity.calibrate import CalibrationConfig

    dtype = output_dtype(source, None)
    start = time.perf_counter()
    key = CalibrationConfig().key(source)
    candidates = formats_for("fisher", "optimized", "native")
    curves = analyze(
        source,
        candidates,
        dtype,
        cache,
        progress=True,
        columns=columns,
        calibration=key,
        scale_method="optimized",
        jobs=1,
    )
    prepared = Prepared(
        source, dtype, "fisher", "optimized", DEFAULT_MIN_SQNR, curves, columns, cache
    )
    plans = {t: prepared.plan(b) for t, b in budgets.items()}
    return {
        "analysis_seconds": round(time.perf_counter() - start, 1),
        "plans": {
            t: {
                "formats": {k: f.name for k, f in p.formats.items()},
                "predicted_kld": p.predicted_kld,
                "total_bytes": p.total_bytes,
            }
            for t, p in plans.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", default="gemma3-270m")
    p.add_argument("--stage", choices=["sample", "sample-streamed", "pass"])
    p.add_argument("--kind", choices=["in-memory", "streamed"], default="streamed")
    p.add_argument("--on-disk", action="store_true")
    p.add_argument("--work", help="(internal) the run's scratch directory")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report-only", action="store_true", help="re-render from the JSON")
    args = p.parse_args(argv)
    if args.stage:
        return _stage(args)
    if args.report_only:
        path = args.out / f"streamed-pass-{args.testbed}.json"
        write_report(json.loads(path.read_text()), args.out)
        return 0

    import mlx.core as mx

    from mint_mlx.blas import openblas_active
    from mint_mlx.source.model import open_source
    from mint_mlx.tools.testbeds import ensure_testbed

    source = open_source(ensure_testbed(args.testbed))
    frontier = json.loads((HERE / "results" / "32k" / f"{args.testbed}.json").read_text())
    budgets = {t: int(frontier["rows"][f"stock:{t}"]["bytes"]) for t in TARGETS}
    tokens = 8 * 255
    weights = _matmul_weights(source)
    report: dict[str, Any] = {
        "testbed": args.testbed,
        "parameters": source.total_parameters,
        "matmul_weights": weights,
        "tokens": tokens,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
            "openblas": openblas_active(),
            "fp32_matmul_gflops": round(matmul_gflops(2048, 5), 1),
        },
        "stages": {},
    }
    with tempfile.TemporaryDirectory(prefix="mint-streamed-bench-") as tmp:
        work = Path(tmp)
        stages = report["stages"]
        stages["sample in-memory"] = _child(
            ["--testbed", args.testbed, "--stage", "sample"], work, "s1.log"
        )
        stages["sample streamed"] = _child(
            ["--testbed", args.testbed, "--stage", "sample-streamed"], work, "s2.log"
        )
        import numpy as np

        same = bool(
            np.array_equal(np.load(work / "sample.npy"), np.load(work / "sample-streamed.npy"))
        )
        report["samplers_identical"] = same
        for kind, extra in (("in-memory", []), ("streamed", []), ("streamed-disk", ["--on-disk"])):
            base = kind.split("-disk")[0]
            stages[f"pass {kind}"] = _child(
                ["--testbed", args.testbed, "--stage", "pass", "--kind", base, *extra],
                work,
                f"p-{kind}.log",
            )
        loaded = {
            k: mx.load(str(work / f"columns-{k}.safetensors"))
            for k in ("in-memory", "streamed", "streamed-disk")
        }
        ref = loaded["in-memory"]
        report["max_relative_difference"] = {
            k: max((mx.abs(ref[t] - v[t]).max() / mx.abs(ref[t]).max()).item() for t in ref)
            for k, v in loaded.items()
            if k != "in-memory"
        }
        plans = {
            k: _plans(source, loaded[k], budgets, work / f"analysis-{k}.json")
            for k in ("in-memory", "streamed")
        }
    report["analysis_seconds"] = {k: v["analysis_seconds"] for k, v in plans.items()}
    report["plans"] = {}
    for target, budget in budgets.items():
        a, b = plans["in-memory"]["plans"][target], plans["streamed"]["plans"][target]
        differ = sorted(k for k in a["formats"] if a["formats"][k] != b["formats"][k])
        report["plans"][target] = {
            "budget": budget,
            "identical": not differ,
            "tensors_that_differ": differ,
            "predicted_kld": [a["predicted_kld"], b["predicted_kld"]],
            "total_bytes": [a["total_bytes"], b["total_bytes"]],
        }
    report["command"] = f"python benchmarks/streamed_pass.py --testbed {args.testbed}"
    write_report(report, args.out)
    return 0


def write_report(report: dict[str, Any], out: Path) -> None:
    """The JSON and markdown, each pass's FLOP rate derived from its seconds."""
    for name, stage in report["stages"].items():
        if name.startswith("pass "):
            flops = 6 * report["matmul_weights"] * report["tokens"]
            stage["gflops"] = round(flops / stage["seconds"] / 1e9, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"streamed-pass-{report['testbed']}.json").write_text(json.dumps(report, indent=1))
    (out / f"streamed-pass-{report['testbed']}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# Streamed vs in-memory sensitivity pass: {r['testbed']}",
        "",
        f"`{r['command']}` on {m['processor']} ({m['platform']}), MLX {m['mlx']}, mlx-lm "
        f"{m['mlx_lm']}, OpenBLAS {'on' if m['openblas'] else 'off'}; float32 matmul "
        f"(2048^3) measured in the same run: {m['fp32_matmul_gflops']} GFLOP/s.",
        f"{r['parameters']:,} parameters ({r['matmul_weights']:,} in matmuls), "
        f"{r['tokens']:,} calibration tokens (8 x 255).",
        "",
        "| stage | seconds | peak RSS (MiB) | GFLOP/s (6 x matmul weights x tokens) |",
        "|---|---:|---:|---:|",
    ]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['seconds']} | {s['peak_rss_mib']} | {s.get('gflops', '')} |")
    lines += [
        "",
        f"Samplers give identical tokens: {r['samplers_identical']}. Largest relative "
        "difference of a column weight from the in-memory pass's: "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["max_relative_difference"].items())
        + ".",
        "",
        "| goal size | budget (bytes) | plans identical | predicted KLD in-memory / streamed |",
        "|---|---:|---|---|",
    ]
    for t, p in r["plans"].items():
        kld = " / ".join(f"{x:.4f}" for x in p["predicted_kld"])
        lines.append(f"| {t} | {p['budget']:,} | {p['identical']} | {kld} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
