#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), then runs every test. GPU tests skip without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "${BUILD_JOBS:-2}" --timeout 600
# SHARDSERVE_SANITIZERS=1: then the CPU tests under ASan + UBSan and TSan, and each fuzz target for
# FUZZ_SECONDS (default 25): scripts/sanitize.sh, scripts/fuzz.sh. Off by default until their time
# on a fresh 2-core machine is measured to fit beside the main suite.
if [ "${SHARDSERVE_SANITIZERS:-0}" != 0 ]; then
  bash scripts/sanitize.sh asan
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-25}"
  bash scripts/sanitize.sh tsan
fi
