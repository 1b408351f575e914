#!/usr/bin/env bash
# Runs on the GPU machine over a checkout with dist/ from scripts/device_bundle.sh: every GPU test,
# then the engine benchmark, results (JSON records, logs) under ${OUT:-out}/, a short table last.
#   scripts/device_run.sh [tests|bench|all|tp|quant|engine|fusions|sm80]
# sm80: the GPU tests of an sm_80-only build (dist-sm80/, see device_bundle.sh): the A100 code
# paths, compiled from their PTX for this GPU, held to the same references.
# engine (one GPU): every GPU test, the attention kernels' harness, the engine benchmark of
# synthetic llama-3.1-8b with the per-op micro-benchmarks (and again at 8,192 tokens of prompt and
# of context), then the served sweep of the same model (scripts/device_serving_sweep.sh bf16,
# 128/128 at concurrency 1, 16, 64, 128, 256) and the time to first token of a served 8,192-token
# prompt (8192/16 at concurrency 1 and 4; TTFT=0 skips it); a short table last.
# tp (a machine with 2+ GPUs): every GPU test (the tensor-parallel ones run there), the all-reduce
# crossover (all_reduce_bench, if bundled), then the engine benchmark of synthetic llama-3.1-70b
# over 2 GPUs.
# fusions (one GPU): the decode-step fusions behind SHARDSERVE_EARLY_KV, SHARDSERVE_FUSED_SILU and
# SHARDSERVE_FUSED_ROPE (on by default): every GPU test as shipped, the attention, kernel and
# golden tests again with all off, the attention harness (its early-KV checks and timings), then
# engine_bench at batch 1, 8, 32, 128 off / on / off / on (run-to-run noise is about 1%) and at 1
# and 32 with each alone; a short table last.
# quant (one 80 GB GPU): the transformers goldens of tests/data/tiny-quant (written there and
# packed into $OUT/golden.tgz), the quantized GPU tests, the INT4/INT8 tensor-core GEMM's harness
# (if bundled), then the engine benchmark of synthetic llama-3.1-70b in AWQ INT4 and FP8 and the
# INT4/INT8/FP8 layers against BF16 cuBLASLt.
set -uo pipefail
cd "$(dirname "$0")/.."
# dist/ may travel packed (the working tree that goes to a GPU machine is size-limited).
if [[ ! -d dist && -f ${DIST_TARBALL:-.devcarry/dist.tar.xz} ]]; then tar xJf "${DIST_TARBALL:-.devcarry/dist.tar.xz}"; fi
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
if [[ $what == sm80 ]]; then
  if [[ ! -d dist-sm80 && -f ${DIST_SM80_TARBALL:-.devcarry/dist-sm80.tar.xz} ]]; then
    tar xJf "${DIST_SM80_TARBALL:-.devcarry/dist-sm80.tar.xz}"
  fi
  # Every kernel is compiled from PTX at first use: a few minutes the first time (cached after).
  SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" LD_LIBRARY_PATH="$PWD/dist-sm80/lib:$LD_LIBRARY_PATH" \
    CUDA_CACHE_MAXSIZE=4294967296 timeout -s KILL "${TEST_SECONDS:-500}" dist-sm80/bin/gpu_tests --gtest_brief=1 \
    ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} >"$OUT/gpu_tests_sm80.log" 2>&1
  status=$?
  grep -E "^\[  (FAILED|PASSED) |tests? ran|FAILED TEST|Failure|error" "$OUT/gpu_tests_sm80.log" | head -40
fi
if [[ $what == bench || $what == all ]]; then
  dist/bin/engine_bench --micro --out "$OUT/engine_bench.jsonl" 2>&1 | tee "$OUT/engine_bench.log" | tail -25
fi
if [[ $what == tp ]]; then
  if [[ -x dist/bin/all_reduce_bench ]]; then
    dist/bin/all_reduce_bench --ranks 2 --out "$OUT/all_reduce_bench.jsonl" 2>&1 | tee "$OUT/all_reduce_bench.log" | tail -16
  fi
  dist/bin/engine_bench --model llama-3.1-70b --tp-size 2 --out "$OUT/engine_bench_tp2.jsonl" 2>&1 |
    tee "$OUT/engine_bench_tp2.log" | tail -30
fi
if [[ $what == quant ]]; then
  timeout -s KILL 90 python3 scripts/make_golden.py tests/data/tiny-quant/*/dequantized >"$OUT/make_golden.log" 2>&1 ||
    { echo "make_golden failed:"; tail -20 "$OUT/make_golden.log"; }
  # One archive (few files come back from a GPU machine): unpack over the checkout to commit them.
  tar czf "$OUT/golden.tgz" tests/data/tiny-quant/*/dequantized/golden* 2>/dev/null
  SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" timeout -s KILL "${QUANT_TEST_SECONDS:-240}" dist/bin/gpu_tests --gtest_brief=1 \
    --gtest_filter="${GTEST_FILTER:-Quant*:TinyQuant/QuantCuda*}" >"$OUT/gpu_tests_quant.log" 2>&1
  status=$?
  grep -E "^\[  (FAILED|PASSED) |tests? ran|FAILED TEST|Failure|\[ cuda quant|\[ fp8" "$OUT/gpu_tests_quant.log" | head -40
  # The INT4/INT8 tensor-core GEMM: every configuration against its CPU reference, then 8B/70B
  # shapes against BF16 cuBLASLt (records on the "record:" lines).
  if [[ -x dist/bin/quant_gemm_harness ]]; then
    timeout -s KILL "${QUANT_GEMM_SECONDS:-300}" dist/bin/quant_gemm_harness >"$OUT/quant_gemm_harness.log" 2>&1 ||
      echo "quant_gemm_harness failed ($?)"
    grep -E "^FAIL|^PASS|^int[48] " "$OUT/quant_gemm_harness.log" | head -120
  fi
  for q in ${QUANT_FORMATS:-awq fp8}; do
    timeout -s KILL "${QUANT_BENCH_SECONDS:-70}" stdbuf -oL dist/bin/engine_bench --model llama-3.1-70b --quantization "$q" \
      --batches 1,8,32,64 --steps 10 --prefill 1024 --out "$OUT/engine_bench_quant.jsonl" >"$OUT/engine_bench_$q.log" 2>&1
    echo "== $q" && tail -7 "$OUT/engine_bench_$q.log"
    cat "$OUT/engine_bench_$q.log" >>"$OUT/engine_bench_quant.log" && rm "$OUT/engine_bench_$q.log"
  done
  if [[ ${QUANT_MICRO:-0} != 0 ]]; then
    timeout -s KILL "${QUANT_MICRO_SECONDS:-60}" stdbuf -oL dist/bin/engine_bench --model llama-3.1-70b --quant-micro --batches 1 --steps 1 \
      --out "$OUT/engine_bench_quant.jsonl" >"$OUT/quant_micro.log" 2>&1
    grep -E "int4|int8|fp8" "$OUT/quant_micro.log" | head -80
  fi
fi
if [[ $what == fusions ]]; then
  SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" timeout -s KILL "${TEST_SECONDS:-200}" dist/bin/gpu_tests --gtest_brief=1 \
    >"$OUT/gpu_tests.log" 2>&1
  status=$?
  grep -E "^\[  (FAILED|PASSED) |tests? ran|FAILED TEST|Failure" "$OUT/gpu_tests.log" | head -30
  SHARDSERVE_EARLY_KV=0 SHARDSERVE_FUSED_SILU=0 SHARDSERVE_FUSED_ROPE=0 SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" \
    timeout -s KILL "${TEST_SECONDS:-200}" dist/bin/gpu_tests --gtest_brief=1 \
    --gtest_filter='KernelsTest*:Shapes/AttentionTest*:CudaGolden*:*Golden*' >"$OUT/gpu_tests_fusions.log" 2>&1
  fused_status=$?
  [[ $status == 0 ]] && status=$fused_status
  echo "== with SHARDSERVE_EARLY_KV=0 SHARDSERVE_FUSED_SILU=0 SHARDSERVE_FUSED_ROPE=0"
  grep -E "^\[  (FAILED|PASSED) |tests? ran|FAILED TEST|Failure" "$OUT/gpu_tests_fusions.log" | head -30
  if [[ -x dist/bin/attention_harness ]]; then
    timeout -s KILL 200 dist/bin/attention_harness >"$OUT/attention_harness.log" 2>&1 || echo "attention_harness failed ($?)"
    grep -E "FAIL|PASS|early|after_wait" "$OUT/attention_harness.log" | grep -v "^ok" | head -20
  fi
  all_off="SHARDSERVE_EARLY_KV=0 SHARDSERVE_FUSED_SILU=0 SHARDSERVE_FUSED_ROPE=0"
  for run in off on off on early silu rope; do
    batches=${BATCHES:-1,8,32,128}
    case $run in
      on) flags="" ;;
      early) flags="SHARDSERVE_FUSED_SILU=0 SHARDSERVE_FUSED_ROPE=0" batches=1,32 ;;
      silu) flags="SHARDSERVE_EARLY_KV=0 SHARDSERVE_FUSED_ROPE=0" batches=1,32 ;;
      rope) flags="SHARDSERVE_EARLY_KV=0 SHARDSERVE_FUSED_SILU=0" batches=1,32 ;;
      *) flags=$all_off ;;
    esac
    echo "== fusions $run: $flags" >>"$OUT/engine_bench_fusions.log"
    env $flags timeout -s KILL "${BENCH_SECONDS:-100}" stdbuf -oL dist/bin/engine_bench --batches "$batches" \
      --out "$OUT/engine_bench_fusions_$run.jsonl" >>"$OUT/engine_bench_fusions.log" 2>&1 || echo "engine_bench ($run) failed ($?)"
  done
  for run in off on early silu rope; do
    echo "== fusions $run (off and on: two runs each)"
    python3 - "$OUT/engine_bench_fusions_$run.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("bench") == "decode":
        print("  batch %4s  %9.1f tok/s  bw %.3f" % (r.get("batch"), r.get("tokens_per_s", 0), r.get("bandwidth_fraction", 0)))
PY
  done
fi
if [[ $what == engine ]]; then
  SHARDSERVE_TEST_DATA_DIR="$PWD/tests/data" timeout -s KILL "${TEST_SECONDS:-300}" dist/bin/gpu_tests --gtest_brief=1 \
    ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} >"$OUT/gpu_tests.log" 2>&1
  status=$?
  grep -E "^\[  (FAILED|PASSED) |tests? ran|FAILED TEST|Failure|error" "$OUT/gpu_tests.log" | head -40
  # The one-shot all-reduce's own cost (two ranks on this one GPU: launch, flags, copies; no NVLink).
  if [[ -x dist/bin/all_reduce_bench ]]; then
    timeout -s KILL 60 dist/bin/all_reduce_bench --one-gpu --max-bytes 1048576 --out "$OUT/all_reduce_bench.jsonl" \
      >"$OUT/all_reduce_bench.log" 2>&1 || echo "all_reduce_bench failed ($?)"
    tail -11 "$OUT/all_reduce_bench.log"
  fi
  if [[ -x dist/bin/attention_harness ]]; then
    timeout -s KILL 200 dist/bin/attention_harness >"$OUT/attention_harness.log" 2>&1 || echo "attention_harness failed ($?)"
    grep -E "FAIL|PASS|prefill|decode b" "$OUT/attention_harness.log" | grep -v "^ok" | head -30
  fi
  timeout -s KILL "${BENCH_SECONDS:-240}" stdbuf -oL dist/bin/engine_bench ${MICRO---micro} --batches "${BATCHES:-1,8,32,128}" \
    --out "$OUT/engine_bench.jsonl" >"$OUT/engine_bench.log" 2>&1 || echo "engine_bench failed ($?)"
  # Long prompts and long contexts (the attention-bound shapes), appended to the same records.
  if [[ ${LONG:-1} != 0 ]]; then
    timeout -s KILL "${LONG_SECONDS:-150}" stdbuf -oL dist/bin/engine_bench --prefill 8192 --context 8192 --batches 1,32 \
      --steps 10 --out "$OUT/engine_bench.jsonl" >>"$OUT/engine_bench.log" 2>&1 || echo "engine_bench (long) failed ($?)"
  fi
  if [[ ${SWEEP:-1} != 0 ]]; then
    SYNTHETIC=llama-3.1-8b timeout -s KILL "${SWEEP_SECONDS:-300}" bash scripts/device_serving_sweep.sh bf16 \
      "${LENGTHS:-128/128}" "${CONCURRENCIES:-1,16,64,128,256}" >"$OUT/sweep.log" 2>&1 || echo "sweep failed ($?)"
    # Packed now, and again with the TTFT set below: the sweep comes back should the call be cut.
    (cd "$OUT" && tar czf serving.tgz serving 2>/dev/null)
    grep -E "error|Error|exhausted|restarting" "$OUT/serve-bf16.log" | head -10
    tail -5 "$OUT/sweep.log"
    # Time to first token of a served 8,192-token prompt (8192/16 at concurrency 1 and 4, its own
    # server and set under ttft/, packed with the sweep's).
    if [[ ${TTFT:-1} != 0 ]]; then
      SYNTHETIC=llama-3.1-8b KV_MAX=0 OUT="$OUT/ttft" timeout -s KILL "${TTFT_SECONDS:-240}" \
        bash scripts/device_serving_sweep.sh bf16 "${TTFT_LENGTHS:-8192/16}" "${TTFT_CONCURRENCIES:-1,4}" \
        >"$OUT/ttft.log" 2>&1 || echo "ttft sweep failed ($?)"
      (cd "$OUT" && tar czf serving.tgz serving ttft 2>/dev/null)
    fi
    for f in "$OUT"/serving/*/*.json "$OUT"/ttft/serving/*/*.json; do
      [[ -f $f && $f != */run.json ]] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('served %s/%s c=%s: %s req, %s errors, %.0f out tok/s, TTFT p50 %.0f ms p99 %.0f ms' % (r.get('input_len'), r.get('output_len'), r.get('concurrency'), r.get('completed'), r.get('errors'), r.get('output_tokens_per_s', 0), 1e3 * r.get('ttft_p50_s', 0), 1e3 * r.get('ttft_p99_s', 0)))" "$f" 2>/dev/null
    done
    rm -rf "$OUT/serving" "$OUT/ttft"  # in serving.tgz: at most 8 files come back
  fi
  sed -n '/tp_size/,$p' "$OUT/engine_bench.log"
fi
exit "$status"
