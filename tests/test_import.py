"""``import mint_mlx`` changes nothing in the caller's process (the package docstring's promise):
no MLX, no mlx-lm, no BLAS; ``mint_mlx.load`` still resolves, lazily, to the loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, os, sys
before = set(sys.modules)
import mint_mlx
new = sorted(set(sys.modules) - before)
maps = "/proc/self/maps"
blas = (
    sorted({l.split()[-1] for l in open(maps) if "openblas" in l.lower()})
    if os.path.exists(maps)
    else None
)
load = mint_mlx.load  # resolved only now, by the module's __getattr__
from mint_mlx.runtime.load import load as loader
print(json.dumps({
    "new": new,
    "blas": blas,
    "is_loader": load is loader,
    "callable": callable(load),
}))
"""


def test_import_mint_mlx_loads_no_mlx_no_blas_and_load_still_resolves() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # a clean process
    out = subprocess.run(
        [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True, env=env
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    heavy = [m for m in got["new"] if m.split(".")[0] in ("mlx", "mlx_lm")]
    assert heavy == [], heavy  # mlx.core above all
    if got["blas"] is not None:  # Linux: no OpenBLAS (ours or numpy's) mapped into the process
        assert got["blas"] == [], got["blas"]
    assert got["is_loader"] and got["callable"]
