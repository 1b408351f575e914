#!/usr/bin/env bash
# Installs what shardserve needs on Debian 12 (when missing), then configures and builds it.
#   scripts/setup.sh [extra cmake args...]      builds into ./build (binaries in build/bin)
# BUILD_DIR, BUILD_JOBS and SHARDSERVE_CUDA (AUTO|ON|OFF) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  cmake ninja-build g++ pkg-config git
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libpcre2-dev libabsl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev libyaml-cpp-dev prometheus-cpp-dev libcpp-httplib-dev
  python3-numpy python3-grpcio python3-grpc-tools
  python3-matplotlib  # scripts/plot_bench.py: the serving benchmark's plots (and tests/e2e/bench_test.py)
  prometheus curl  # curl, and node/npm below: the HTTP API's e2e test (tests/e2e/http_test.py)
  openssl python3-yaml  # tests/e2e/security_test.py: its test certificates, the rendered manifests
  clang libclang-rt-14-dev llvm-14  # sanitizer and libFuzzer builds (scripts/sanitize.sh, scripts/fuzz.sh)
)
# The deploy checks' tools (tests/deploy): Debian's package only when the command is missing, so
# a kubectl or node installed another way is used as it is.
declare -A TOOLS=([kubectl]=kubernetes-client [node]=nodejs [npm]=npm)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
for cmd in "${!TOOLS[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${TOOLS[$cmd]}")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DSHARDSERVE_CUDA="${SHARDSERVE_CUDA:-AUTO}" "$@"
cmake --build "$BUILD_DIR" -j "${BUILD_JOBS:-2}"
