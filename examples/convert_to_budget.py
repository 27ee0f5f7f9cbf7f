"""Convert a model to fit a budget from Python, then inspect the plan.

    python examples/convert_to_budget.py SRC OUT 4.5

SRC is an HF-format directory or hub id; the last argument is bits per weight.
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import sys

from mint_mlx.convert import convert
from mint_mlx.output.card import distribution_table, summary_lines


def main() -> None:
    src, out, bpw = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = convert(src, out, bpw=bpw, force=True, progress=True)
    print(distribution_table(result.plan))
    print("\n".join(summary_lines(result.plan)))
    worst = sorted(result.plan.assignments, key=lambda a: a.sqnr_db)[:5]
    print("lowest-SQNR tensors:")
    for a in worst:
        print(f"  {a.path:50s} {a.format:14s} {a.sqnr_db:6.2f} dB")


if __name__ == "__main__":
    main()
