"""What fewer calibration sequences cost (issue 20: the demo passes --calibration-sequences 4).

Converts the SmolLM2 testbed at 4.5 bits per weight with the sensitivity pass on N sequences of
256 self-sampled tokens for each N, then scores every output against the dithered reference on
the same held-out windows (the reference's distributions cached once) and compares each N with
the default 8 window by window (mean difference and its standard error).

    python benchmarks/calibration_sequences.py --out /tmp/calib-seq --windows 16
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mint_mlx.convert import convert
from mint_mlx.sensitivity.calibrate import DEFAULT_SEQUENCES
from mint_mlx.tools.evaluation import build_reference_cache, evaluate_cached
from mint_mlx.tools.testbeds import ensure_testbed, ensure_wiki_text


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--testbed", default="smollm2-135m")
    p.add_argument("--bpw", type=float, default=4.5)
    p.add_argument("--sequences", type=int, nargs="+", default=[DEFAULT_SEQUENCES, 4, 2])
    p.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    args = p.parse_args()
    src = ensure_testbed(args.testbed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    for n in args.sequences:
        start = time.perf_counter()
        result = convert(
            src, args.out / f"seq{n}", bpw=args.bpw, force=True, calibration_sequences=n
        )
        rows[n] = {"convert_seconds": round(time.perf_counter() - start, 1)}
        rows[n]["phase_seconds"] = {k: round(v, 1) for k, v in result.seconds.items()}
        print(f"convert, {n} sequences: {rows[n]} (load {_load()})", flush=True)
    cache = build_reference_cache(
        src, ensure_wiki_text() / "heldout.txt", args.out / "reference", tokens=args.windows * 512
    )
    for n in args.sequences:
        r = evaluate_cached(args.out / f"seq{n}", cache, per_window=True)
        rows[n].update(r.to_json(), kld_windows=r.kld_windows)
        print(f"{n} sequences: KLD {r.kld_mean:.5f}, PPL {r.ppl:.3f}", flush=True)
    if DEFAULT_SEQUENCES in rows:
        base = np.array(rows[DEFAULT_SEQUENCES]["kld_windows"])
        for n in args.sequences:
            d = np.array(rows[n]["kld_windows"]) - base
            se = float(d.std(ddof=1) / len(d) ** 0.5) if len(d) > 1 else float("nan")
            rows[n]["kld_vs_default"] = {"mean": float(d.mean()), "stderr": se}
            print(f"{n} vs {DEFAULT_SEQUENCES}: {d.mean():+.5f} +- {se:.5f}", flush=True)
    (args.out / "calibration_sequences.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
