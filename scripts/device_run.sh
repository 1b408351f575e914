#!/usr/bin/env bash
# Runs on the GPU machine over a checkout with dist/ from scripts/device_bundle.sh: every GPU test,
# then the engine benchmark, results (JSON records, logs) under ${OUT:-out}/, a short table last.
#   scripts/device_run.sh [tests|bench|all|tp]
# tp (a machine with 2+ GPUs): every GPU test (the tensor-parallel ones run there), then the
# engine benchmark of synthetic llama-3.1-70b over 2 GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-out}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
if [[ $what == tests || $what == all || $what == tp ]]; then
  SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" dist/bin/gpu_tests --gtest_brief=1 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  dist/bin/engine_bench --micro --out "$OUT/engine_bench.jsonl" 2>&1 | tee "$OUT/engine_bench.log" | tail -25
fi
if [[ $what == tp ]]; then
  dist/bin/engine_bench --model llama-3.1-70b --tp-size 2 --out "$OUT/engine_bench_tp2.jsonl" 2>&1 |
    tee "$OUT/engine_bench_tp2.log" | tail -30
fi
exit "$status"
