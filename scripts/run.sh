#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), then generates from a checkpoint on the CPU backend.
#   scripts/run.sh [MODEL_DIR] [PROMPT_IDS]
# With no model, the bundled tiny checkpoint tests/data/tiny/llama3-gqa-bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/data/tiny/llama3-gqa-bf16}
PROMPT_IDS=${2:-0,17,42,300,12}
bash scripts/setup.sh >/dev/null
build/bin/shardserve generate --model "$MODEL" --prompt-ids "$PROMPT_IDS" --max-tokens 16 \
  --temperature 0 --backend cpu --output json
