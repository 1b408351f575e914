#!/usr/bin/env bash
# The CPU tests under sanitizers: clang, CUDA off, each build in its own folder.
#   asan  build-asan: AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer) on the
#         ctest suite: the unit tests, the replay of the fuzz corpora, and the functional e2e
#         tests (cluster, http, security, ...), whose coordinator and workers are instrumented
#         too. Left out: the deploy checks (no code of ours runs there) and the e2e tests whose
#         assertions are deadlines, speeds or memory bounds tuned for a normal build (load,
#         bench, failover, fault): ASan's 2-3x slowdown and shadow memory fail them, not a bug.
#         The same build holds the fuzz targets (scripts/fuzz.sh).
#   tsan  build-tsan: ThreadSanitizer on the tests of our code that runs threads (TSAN_TESTS
#         below): the CPU backend's threaded matmul, the in-process communicator and the TP
#         executor's rank threads, the engine, the worker's engine loop, the coordinator's
#         registry and its health thread, the tokenizer's shared cache. Not the e2e tests: there
#         most threads belong to gRPC, which Debian builds without TSan (false reports).
# Any report fails the run. Reports go to files (ASAN_OPTIONS/UBSAN_OPTIONS/TSAN_OPTIONS
# log_path), so that one from a child process (an e2e test's worker) cannot be missed; they are
# printed at the end.
#   scripts/sanitize.sh [asan|tsan|all|build-asan]   default all; build-asan only builds
# Needs scripts/setup.sh's packages (clang, libclang-rt-14-dev, llvm-14). ASAN_BUILD_DIR,
# TSAN_BUILD_DIR, BUILD_JOBS and TEST_JOBS (ctest -j) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ASAN_BUILD_DIR=${ASAN_BUILD_DIR:-build-asan}
TSAN_BUILD_DIR=${TSAN_BUILD_DIR:-build-tsan}
JOBS=${BUILD_JOBS:-2}
TEST_JOBS=${TEST_JOBS:-2}
MODE=${1:-all}

# binary:gtest filter. TpCommandLine* runs the `shardserve` CLI, which this build does not make.
TSAN_TESTS=(
  runtime_tests:*
  tp_tests:-*TpCommandLine*
  engine_tests:*
  engine_loop_tests:*
  registry_tests:*
  coordinator_tests:*
  tokenizer_tests:Tokenizer.ConcurrentEncodesAgree
)

export ASAN_SYMBOLIZER_PATH=${ASAN_SYMBOLIZER_PATH:-$(command -v llvm-symbolizer-14 || command -v llvm-symbolizer || true)}
export TSAN_SYMBOLIZER_PATH=${TSAN_SYMBOLIZER_PATH:-$ASAN_SYMBOLIZER_PATH}

# -O1: fast enough to run the suite, still precise stacks; assertions of the standard library on.
configure() {  # dir, sanitizers, extra cmake args...
  local dir=$1 sanitizers=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja -DSHARDSERVE_CUDA=OFF -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only -D_GLIBCXX_ASSERTIONS" \
    -DSHARDSERVE_SANITIZE="$sanitizers" "$@" >/dev/null
}

# Prints the reports written under $1 and fails when there is any.
check_reports() {
  local dir=$1 what=$2
  shopt -s nullglob
  local reports=("$dir"/*)
  shopt -u nullglob
  if ((${#reports[@]})); then
    echo "sanitize: ${#reports[@]} $what report(s):"
    for r in "${reports[@]}"; do
      echo "---- $r"
      cat "$r"
    done
    return 1
  fi
  echo "sanitize: no $what reports"
}

build_asan() {
  local t0=$SECONDS
  configure "$ASAN_BUILD_DIR" address,undefined -DSHARDSERVE_FUZZ=ON
  cmake --build "$ASAN_BUILD_DIR" -j "$JOBS"
  echo "sanitize: built $ASAN_BUILD_DIR in $((SECONDS - t0)) s"
}

run_asan() {
  build_asan
  local t0=$SECONDS reports="$ROOT/$ASAN_BUILD_DIR/sanitizer-reports"
  rm -rf "$reports" && mkdir -p "$reports"
  local status=0
  ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1" \
  UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1:halt_on_error=1" \
    ctest --test-dir "$ASAN_BUILD_DIR" --output-on-failure -j "$TEST_JOBS" --timeout 900 -LE 'deploy|load' \
      -E '^e2e_(bench|failover|fault)_test$' || status=$?
  check_reports "$reports" "ASan/UBSan/LSan" || status=1
  echo "sanitize: asan tests in $((SECONDS - t0)) s"
  return $status
}

run_tsan() {
  local t0=$SECONDS targets=()
  for t in "${TSAN_TESTS[@]}"; do targets+=("${t%%:*}"); done
  configure "$TSAN_BUILD_DIR" thread
  cmake --build "$TSAN_BUILD_DIR" -j "$JOBS" --target "${targets[@]}"
  echo "sanitize: built $TSAN_BUILD_DIR in $((SECONDS - t0)) s"
  t0=$SECONDS
  local reports="$ROOT/$TSAN_BUILD_DIR/sanitizer-reports" status=0
  rm -rf "$reports" && mkdir -p "$reports"
  for t in "${TSAN_TESTS[@]}"; do
    local bin=${t%%:*} filter=${t#*:}
    echo "sanitize: tsan $bin --gtest_filter=$filter"
    # setarch -R: ThreadSanitizer's fixed memory layout does not fit every randomised one.
    TSAN_OPTIONS="log_path=$reports/tsan:halt_on_error=1:second_deadlock_stack=1:suppressions=$ROOT/tests/tsan.supp" \
      setarch "$(uname -m)" -R "$TSAN_BUILD_DIR/bin/$bin" --gtest_filter="$filter" --gtest_brief=1 || status=1
  done
  check_reports "$reports" "TSan" || status=1
  echo "sanitize: tsan tests in $((SECONDS - t0)) s"
  return $status
}

case "$MODE" in
  asan) run_asan ;;
  tsan) run_tsan ;;
  build-asan) build_asan ;;
  all)
    status=0
    run_asan || status=1
    run_tsan || status=1
    exit $status
    ;;
  *)
    echo "usage: scripts/sanitize.sh [asan|tsan|all|build-asan]" >&2
    exit 2
    ;;
esac
