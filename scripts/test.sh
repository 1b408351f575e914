#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), then runs every test. GPU tests skip without a device.
# Then the sanitizer and fuzz jobs (SHARDSERVE_SANITIZERS=0 skips them): the CPU tests under
# ASan + UBSan, each fuzz target for FUZZ_SECONDS (default 25), the threaded tests under TSan
# (scripts/sanitize.sh, scripts/fuzz.sh). Each job runs even if an earlier one failed, so that one
# run reports every finding; any failure fails the whole.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "${BUILD_JOBS:-2}" --timeout 600
if [ "${SHARDSERVE_SANITIZERS:-1}" != 0 ]; then
  status=0
  bash scripts/sanitize.sh asan || status=1
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-25}" || status=1
  bash scripts/sanitize.sh tsan || status=1
  exit $status
fi
