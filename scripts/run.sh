#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), serves a model on this machine (shardserve serve: a
# coordinator and its workers, CPU backend), sends it one request with the client (text in, text
# out), and stops the server.
#   scripts/run.sh [MODEL_DIR] [PROMPT]
# With no model, the bundled tiny checkpoint with the real Llama 3.1 tokenizer
# (tests/data/tiny/llama3-tokenizer-bf16: random weights, so the text is fluent nonsense).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/data/tiny/llama3-tokenizer-bf16}
PROMPT=${2:-"The capital of France is"}
PORT=${PORT:-50051}
BIN=${BUILD_DIR:-build}/bin
bash scripts/setup.sh >/dev/null

LOG=$(mktemp /tmp/shardserve-run-XXXXXX.log)
"$BIN/shardserve" serve --model "$MODEL" --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1200); do  # up to 2 minutes for the model to load
  grep -q "serving model" "$LOG" && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.1
done
grep "serving model" "$LOG" || { cat "$LOG"; exit 1; }
echo "\$ shardserve client --prompt \"$PROMPT\" --max-tokens 32 --temperature 0"
"$BIN/shardserve" client --address "127.0.0.1:$PORT" --prompt "$PROMPT" --max-tokens 32 --temperature 0
