#!/usr/bin/env bash
# The serving benchmarks of docs/benchmarks.md: a whole cluster (`shardserve serve`: coordinator +
# workers) on synthetic Llama-3.1-70B weights, swept by `scripts/bench_report.py sweep` over
# input/output lengths and concurrencies, the largest concurrency being what the KV cache holds.
#   scripts/device_serving_sweep.sh LAYOUT [LENGTHS] [CONCURRENCIES]
# LAYOUT: bf16 (one GPU; with SYNTHETIC=llama-3.1-8b the engine issue's sweep), bf16-tp2 (2 GPUs),
# awq-int4, int8 or fp8-h100 (one GPU). LENGTHS default
# 128/128,128/2048,2048/128; CONCURRENCIES default 1,8,64 (the KV cache's maximum is added).
# Runs where scripts/device_bundle.sh shardserve shardserve-coordinator shardserve-worker made
# dist/. Results: ${OUT:-out}/serving/<LAYOUT>-<gpu>/ (bench_report.py's set folder; copy it under
# docs/benchmarks/serving/ and run `scripts/bench_report.py render` to update the report) and the
# server's log. SYNTHETIC (default llama-3.1-70b) and BACKEND (default cuda) change the model and
# backend: BACKEND=cpu SYNTHETIC=tests/data/tiny/llama3-gqa-bf16/config.json runs the same path
# on a CPU. KV_MAX=0 leaves out the KV cache's maximum concurrency (for long prompts timed at a
# few concurrencies, e.g. the time to first token of 8192/16). The quantized layouts need the
# quantized kernels' GPU tests to pass first; they run here, and a failure stops the sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-out}
BIN=${BIN:-dist/bin}
LAYOUT=${1:?usage: scripts/device_serving_sweep.sh LAYOUT [LENGTHS] [CONCURRENCIES]}
LENGTHS=${2:-128/128,128/2048,2048/128}
CONCURRENCIES=${3:-1,8,64}
MODEL=${SYNTHETIC:-llama-3.1-70b}
BACKEND=${BACKEND:-cuda}
MAX_SEQS=${MAX_SEQS:-256}
read -ra SERVE_EXTRA <<<"${SERVE_ARGS:-}"  # more serve arguments, e.g. "--max-model-len 4096"
mkdir -p "$OUT"

case $LAYOUT in
  bf16) ARGS=(); WHAT="BF16, 1 GPU"; DEPLOYMENT="" ;;
  bf16-tp2) ARGS=(--tp-size 2); WHAT="BF16, tensor parallel over 2 GPUs"; DEPLOYMENT=fp16-tp2 ;;
  awq-int4) ARGS=(--quantization awq); WHAT="AWQ INT4 (group 128), 1 GPU"; DEPLOYMENT=awq-int4 ;;
  int8) ARGS=(--quantization int8); WHAT="INT8 weight-only, 1 GPU"; DEPLOYMENT=int8 ;;
  fp8-h100) ARGS=(--quantization fp8); WHAT="FP8 W8A8, 1 GPU"; DEPLOYMENT=fp8-h100 ;;
  *) echo "unknown layout '$LAYOUT' (bf16, bf16-tp2, awq-int4, int8, fp8-h100)" >&2; exit 2 ;;
esac

GPU=cpu
if [[ $BACKEND == cuda ]]; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
  if [[ $LAYOUT != bf16* ]]; then
    SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" "$BIN/gpu_tests" --gtest_brief=1 \
      --gtest_filter='Quant*:TinyQuant/QuantCuda*' >"$OUT/gpu_tests_quant.log" 2>&1 ||
      { echo "the quantized kernels' GPU tests failed: no sweep ($OUT/gpu_tests_quant.log)"; tail -20 "$OUT/gpu_tests_quant.log"; exit 1; }
  fi
fi

PORT=${PORT:-50151}
SERVE=("$BIN/shardserve" serve --synthetic "$MODEL" --served-model-name bench --backend "$BACKEND" "${ARGS[@]}"
       --port "$PORT" --max-num-seqs "$MAX_SEQS" --shutdown-timeout 5)
LOG=$OUT/serve-$LAYOUT.log
"${SERVE[@]}" "${SERVE_EXTRA[@]}" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1200); do
  grep -q "serving model" "$LOG" && break
  kill -0 $SERVER 2>/dev/null || { echo "shardserve serve exited:"; tail -30 "$LOG"; exit 1; }
  sleep 0.5  # waiting for the model to load
done
grep -q "serving model" "$LOG" || { echo "shardserve serve did not start within 10 minutes"; tail -30 "$LOG"; exit 1; }

# The KV cache's capacity in tokens, from the worker's start-up memory plan (measured column).
KV_TOKENS=$(awk '/KV tokens/ {print $NF; exit}' "$LOG")
echo "serving $MODEL ($WHAT) on $GPU; KV cache ${KV_TOKENS:-?} tokens"

status=0
IFS=, read -ra PAIRS <<<"$LENGTHS"
for pair in "${PAIRS[@]}"; do
  in=${pair%/*} out=${pair#*/}
  conc=$CONCURRENCIES
  if [[ ${KV_MAX:-1} != 0 && -n ${KV_TOKENS:-} ]]; then
    most=$((KV_TOKENS / (in + out)))
    ((most > MAX_SEQS)) && most=$MAX_SEQS
    [[ ",$conc," == *",$most,"* ]] || conc="$conc,$most"
  fi
  /usr/bin/env python3 scripts/bench_report.py sweep --results-dir "$OUT/serving" --doc "$OUT/benchmarks.md" \
    --target "127.0.0.1:$PORT" --model bench --name "$LAYOUT-$GPU" --setup "synthetic $MODEL, $WHAT, $GPU" \
    ${DEPLOYMENT:+--deployment "$DEPLOYMENT"} --server-command "shardserve ${SERVE[*]:1}" --bench "$BIN/shardserve" \
    --lengths "$pair" --concurrencies "$conc" --rounds "${ROUNDS:-3}" --no-render || status=1
done
exit $status
