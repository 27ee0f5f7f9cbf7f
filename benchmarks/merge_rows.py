"""Unite the rows of frontier JSON files written by runs side by side.

Two ``frontier.py`` processes must not share one JSON file (each rewrites it from its own
state), so parallel runs write to separate ``--out`` folders. Rows are independent and keyed by
method and target, so uniting them is a union; where both files hold a row, the destination's
is kept. Settings must match (same tokens, sequence length and backend), or the rows would not
be comparable.

    python benchmarks/merge_rows.py --into benchmarks/results/32k --testbed gemma3-270m \\
        --from ~/.cache/mint_mlx/frontier-32k-b
    python benchmarks/frontier.py --report-only --out benchmarks/results/32k --testbed gemma3-270m
"""

from __future__ import annotations

from mint_mlx.blas import use_openblas

use_openblas()  # before anything imports mlx.core: OpenBLAS under its CPU matmul

import argparse
import json
from pathlib import Path

from frontier import save_state  # benchmarks/ is on sys.path when run as a script


def merge(into: Path, sources: list[Path]) -> list[str]:
    """Add to ``into`` the rows (and commands) of ``sources`` it lacks; return the new keys."""
    state = json.loads(into.read_text())
    added: list[str] = []
    for source in sources:
        other = json.loads(source.read_text())
        if other["settings"] != state["settings"]:
            raise SystemExit(
                f"{source} was measured with {other['settings']}, {into} with "
                f"{state['settings']}; merge only rows measured the same way"
            )
        for key, row in other["rows"].items():
            if key not in state["rows"]:
                state["rows"][key] = row
                added.append(key)
        for command in other.get("commands", []):
            if command not in state.setdefault("commands", []):
                state["commands"].append(command)
    save_state(into, state)
    return added


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--into", type=Path, required=True, help="results folder to add rows to")
    p.add_argument("--from", dest="sources", type=Path, nargs="+", required=True)
    p.add_argument("--testbed", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = p.parse_args()
    for testbed in args.testbed:
        sources = [s / f"{testbed}.json" for s in args.sources if (s / f"{testbed}.json").exists()]
        added = merge(args.into / f"{testbed}.json", sources)
        print(f"{testbed}: {len(added)} rows added" + (f" ({', '.join(added)})" if added else ""))


if __name__ == "__main__":
    main()
