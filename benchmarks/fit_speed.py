"""Speed and agreement of the numpy affine scale fit against the pure-MLX one it replaced.

Two measurements in one run, on the same inputs and machine:

1. Speed: the analysis path (fit + error, ``optimized_affine_error``) and the save path
   (fit + codes + packing, ``optimized_affine``) of :mod:`mint_mlx.quant.scales`, against the same
   calls of :mod:`mint_mlx.tools.scales_reference`, on random-normal bf16 weights with a few outlier
   columns, with and without column weights; best of ``--repeats`` timings each (the machine
   may be shared: the load average is recorded before and after).
2. Agreement: on a real testbed's 2-D weights (the first ``--rows`` rows of each), the summed
   plain and column-weighted squared error per (tensor, format) of both paths, over every
   native affine format. Column weights are seeded gamma(0.5) draws per tensor (a stand-in for
   Fisher: heavy-tailed, some near zero).

    python benchmarks/fit_speed.py --testbed smollm2-135m

Writes ``benchmarks/results/fit-speed.{json,md}``.
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.quant import scales
from mint_mlx.tools import scales_reference

SHAPES = ((576, 1536), (1536, 576), (3072, 8192))
#: (bits, group) timed per shape; the big shape gets the first two only (the old path takes
#: seconds per call there).
FORMATS = ((4, 64), (2, 32), (3, 128), (8, 32))


def synthetic(shape: tuple[int, int], seed: int) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    w[:, rng.choice(shape[1], 8, replace=False)] *= 20.0  # outlier input columns
    cols = rng.gamma(0.5, size=shape[1]).astype(np.float32)
    return mx.array(w).astype(mx.bfloat16), mx.array(cols)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t)
    return min(times)


def speed(repeats: int, old_repeats: int) -> list[dict[str, Any]]:
    rows = []
    for i, shape in enumerate(SHAPES):
        w, cols = synthetic(shape, i)
        w32 = w.astype(mx.float32)  # the analysis hands the fit float32 row blocks
        mx.eval(w, w32, cols)
        fmts = FORMATS[:2] if shape[0] * shape[1] > 1 << 22 else FORMATS
        for bits, group in fmts:
            if shape[1] % group:
                continue
            for c in (None, cols):
                r: dict[str, Any] = {
                    "shape": list(shape),
                    "bits": bits,
                    "group": group,
                    "weighted": c is not None,
                }
                for label, new, old, arg in (
                    (
                        "fit+error",
                        scales.optimized_affine_error,
                        scales_reference.optimized_affine_error_reference,
                        w32,
                    ),
                    (
                        "fit+pack",
                        scales.optimized_affine,
                        scales_reference.optimized_affine_reference,
                        w,
                    ),
                ):
                    call = (bits, group, mx.bfloat16, c)
                    t_old = best_of(lambda f=old, a=arg, k=call: f(a, *k), old_repeats)
                    t_new = best_of(lambda f=new, a=arg, k=call: f(a, *k), repeats)
                    r[label] = {"old_s": t_old, "new_s": t_new, "speedup": t_old / t_new}
                rows.append(r)
                print(json.dumps(r), flush=True)
    return rows


def agreement(testbed: Path, rows: int) -> dict[str, Any]:
    weights = mx.load(str(testbed / "model.safetensors"))
    names = sorted(k for k, v in weights.items() if v.ndim == 2 and v.shape[-1] % 32 == 0)
    devs: dict[str, list[float]] = {"plain": [], "weighted": []}
    worst: dict[str, Any] = {}
    t_old = t_new = 0.0
    pairs = 0
    for i, name in enumerate(names):
        w = weights[name][:rows].astype(mx.float32)
        cols = mx.array(np.random.default_rng(i).gamma(0.5, size=w.shape[-1]).astype(np.float32))
        mx.eval(w, cols)
        for bits in (2, 3, 4, 5, 6, 8):
            for group in (32, 64, 128):
                if w.shape[-1] % group:
                    continue
                t = time.perf_counter()
                new = scales.optimized_affine_error(w, bits, group, mx.bfloat16, cols)
                mx.eval(new)
                t_new += time.perf_counter() - t
                t = time.perf_counter()
                old = scales_reference.optimized_affine_error_reference(
                    w, bits, group, mx.bfloat16, cols
                )
                mx.eval(old)
                t_old += time.perf_counter() - t
                pairs += 1
                for k, a, b in (("plain", new[0], old[0]), ("weighted", new[1], old[1])):
                    assert a is not None and b is not None
                    x, y = float(a.item()), float(b.item())  # type: ignore[arg-type]
                    dev = abs(x - y) / max(abs(y), 1e-30)
                    devs[k].append(dev)
                    if dev >= worst.get(k, {}).get("relative_deviation", -1.0):
                        worst[k] = {
                            "tensor": name,
                            "format": f"affine-{bits}-g{group}",
                            "new": x,
                            "old": y,
                            "relative_deviation": dev,
                        }
    return {
        "testbed": str(testbed),
        "tensors": len(names),
        "rows_per_tensor": rows,
        "pairs": pairs,
        "max_relative_deviation": {k: max(v) for k, v in devs.items()},
        "mean_relative_deviation": {k: float(np.mean(v)) for k, v in devs.items()},
        "worst": worst,
        "seconds": {"old": t_old, "new": t_new},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Affine scale fit: numpy path vs the pure-MLX reference",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; threads {result['threads']}; load average "
        f"{result['load_before']} before, {result['load_after']} after.",
        "",
        "Best of several timings per cell (seconds; old = `scales_reference`, new = `scales`).",
        "",
        "| shape | bits | group | weighted | fit+error old | new | speedup "
        "| fit+pack old | new | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["speed"]:
        e, p = r["fit+error"], r["fit+pack"]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['group']} | {r['weighted']} "
            f"| {e['old_s']:.3f} | {e['new_s']:.3f} | {e['speedup']:.1f}x "
            f"| {p['old_s']:.3f} | {p['new_s']:.3f} | {p['speedup']:.1f}x |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Total over the table: fit+error {s['fit+error']['old_s']:.2f} s -> "
        f"{s['fit+error']['new_s']:.2f} s ({s['fit+error']['speedup']:.1f}x), fit+pack "
        f"{s['fit+pack']['old_s']:.2f} s -> {s['fit+pack']['new_s']:.2f} s "
        f"({s['fit+pack']['speedup']:.1f}x).",
    ]
    a = result.get("agreement")
    if a:
        lines += [
            "",
            f"## Error agreement on {a['testbed']}",
            "",
            f"{a['pairs']} (tensor, format) pairs: {a['tensors']} 2-D tensors (first "
            f"{a['rows_per_tensor']} rows each) x every native affine format, bf16 scales, "
            "seeded gamma(0.5) column weights.",
            "",
            "| error | max relative deviation | mean relative deviation |",
            "|---|---|---|",
        ]
        for k in ("plain", "weighted"):
            lines.append(
                f"| {k} | {a['max_relative_deviation'][k]:.2e} "
                f"| {a['mean_relative_deviation'][k]:.2e} |"
            )
        lines += [
            "",
            f"Worst: {json.dumps(a['worst'])}",
            "",
            f"Time for these fits: old {a['seconds']['old']:.1f} s, new {a['seconds']['new']:.1f} s.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", default="smollm2-135m", help="testbed name or directory")
    p.add_argument("--rows", type=int, default=128, help="rows per tensor for the agreement")
    p.add_argument("--repeats", type=int, default=5, help="timings per cell, new path")
    p.add_argument("--old-repeats", type=int, default=2, help="timings per cell, old path")
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    testbed = Path(args.testbed)
    if not testbed.is_dir():
        testbed = Path.home() / ".cache" / "mint_mlx" / "testbeds" / args.testbed
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}, numpy {np.__version__}, mlx {mx.__version__}",
        "threads": scales.THREADS,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    result["speed"] = speed(args.repeats, args.old_repeats)
    result["summary"] = {
        k: {
            "old_s": sum(r[k]["old_s"] for r in result["speed"]),
            "new_s": sum(r[k]["new_s"] for r in result["speed"]),
        }
        for k in ("fit+error", "fit+pack")
    }
    for v in result["summary"].values():
        v["speedup"] = v["old_s"] / v["new_s"]
    if not args.no_agreement:
        if not (testbed / "model.safetensors").is_file():
            raise SystemExit(f"error: no testbed at {testbed}; build it or pass --no-agreement")
        result["agreement"] = agreement(testbed, args.rows)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit-speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fit-speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
