#!/usr/bin/env bash
# Create .venv and install mint-mlx with its test extras. Idempotent: re-running is cheap.
# MINT_EXTRAS picks the extras (default "test": what scripts/test.sh and CI need); the demo
# installs "testbed" only (gguf, to read the testbed's GGUF), without pytest, mypy and ruff.
# On Debian/Ubuntu as root it also installs OpenBLAS, which makes MLX's CPU fp32 matmul
# ~15x faster for evaluation (see DESIGN notes in README); without it everything still works.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
EXTRAS=${MINT_EXTRAS-test}
.venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
   && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
      || echo "note: could not install libopenblas0-pthread; CPU evaluation will be slower" >&2
  else
    echo "note: 'sudo apt-get install libopenblas0-pthread' makes CPU evaluation much faster" >&2
  fi
fi
