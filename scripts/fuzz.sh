#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, ASan + UBSan, CUDA off; the build folder of
# scripts/sanitize.sh asan, so one build serves both) and runs each, one at a time, for N seconds
# from its seed corpus. Prints each target's executions, coverage (cov: code edges, ft: features)
# and corpus; fails on any crash, sanitizer report, leak, timeout (-timeout s per input) or
# out-of-memory (-rss_limit_mb), leaving the input in $BUILD_DIR/fuzz/artifacts/ to replay with
#   $BUILD_DIR/bin/<name>_fuzz <input>
# New inputs go to $BUILD_DIR/fuzz/corpus/<name> (kept between runs); tests/fuzz/corpus is read only.
#   scripts/fuzz.sh [seconds-per-target] [name...]    default 25 s, every target (tests/fuzz/*_fuzz.cc)
# FUZZ_BUILD_DIR (default build-asan), FUZZ_TIMEOUT (s per input, default 10), FUZZ_RSS_MB
# (default 2048) and BUILD_JOBS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-25}
shift || true
BUILD_DIR=${FUZZ_BUILD_DIR:-build-asan}
TIMEOUT=${FUZZ_TIMEOUT:-10}
RSS_MB=${FUZZ_RSS_MB:-2048}

if (($#)); then
  NAMES=("$@")
else
  NAMES=()
  for f in tests/fuzz/*_fuzz.cc; do
    f=${f##*/}
    NAMES+=("${f%_fuzz.cc}")
  done
fi

ASAN_BUILD_DIR=$BUILD_DIR bash scripts/sanitize.sh build-asan

# Inputs longer than this are cut; tokenizer.json needs room for its 256 byte tokens.
max_len() {
  case "$1" in
    tokenizer_json) echo 16384 ;;
    *) echo 4096 ;;
  esac
}

WORK=$BUILD_DIR/fuzz
mkdir -p "$WORK/artifacts"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
summary=()
for name in "${NAMES[@]}"; do
  bin=$BUILD_DIR/bin/${name}_fuzz
  seeds=tests/fuzz/corpus/$name
  corpus=$WORK/corpus/$name
  log=$WORK/$name.log
  mkdir -p "$corpus"
  args=(-max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$name")" -timeout="$TIMEOUT"
        -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" -print_final_stats=1
        -artifact_prefix="$WORK/artifacts/$name-")
  [ -f "tests/fuzz/$name.dict" ] && args+=(-dict="tests/fuzz/$name.dict")
  echo "fuzz: $name for ${SECONDS_PER_TARGET}s"
  status=0
  "$bin" "${args[@]}" "$corpus" "$seeds" >"$log" 2>&1 || status=$?
  done_line=$(grep -aE '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\) .*/\1/p' <<<"$done_line")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$done_line")
  if ((status != 0)) || [ -z "$done_line" ]; then
    failed+=("$name")
    summary+=("$(printf '%-18s FAILED (exit %s): see %s' "$name" "$status" "$log")")
    echo "fuzz: $name FAILED (exit $status); the end of $log:"
    tail -n 60 "$log"
  else
    summary+=("$(printf '%-18s %10s execs %7s/s  cov %6s  ft %7s  corpus %5s' "$name" "$execs" "$rate" "$cov" "$ft" "$corp")")
  fi
done

echo "fuzz: ${SECONDS_PER_TARGET}s per target"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]} (inputs in $WORK/artifacts/)"
  exit 1
fi
