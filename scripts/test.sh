#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), then runs every test. GPU tests skip without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "${BUILD_JOBS:-2}" --timeout 600
