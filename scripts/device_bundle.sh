#!/usr/bin/env bash
# Builds the CUDA targets here and bundles them for a GPU machine that has the CUDA driver,
# cuBLASLt and NCCL but none of our other libraries: dist/bin holds the programs, dist/lib every
# shared library they resolve outside glibc/libstdc++/libssl/libz/CUDA/NCCL.
#   scripts/device_bundle.sh [TARGET...]     (default: the GPU tests, benchmarks and the CLI)
# Then on the GPU machine: scripts/device_run.sh (with dist/ carried along).
# The A100 path on a Hopper GPU: CUDA_ARCHS=80 BUILD_DIR=build-sm80 DIST=dist-sm80
# scripts/device_bundle.sh gpu_tests builds sm_80 code only (its PTX is compiled for the GPU at
# load), which `scripts/device_run.sh sm80` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-cuda}
ARCHS=${CUDA_ARCHS:-90a}
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(gpu_tests engine_bench)
# An existing build directory keeps its configuration (BUILD_DIR=build reuses the main build).
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DSHARDSERVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$BUILD_DIR" -j "${BUILD_JOBS:-2}" --target "${TARGETS[@]}"
DIST=${DIST:-dist}
rm -rf "$DIST" && mkdir -p "$DIST/bin" "$DIST/lib"
# Without debug sections: the working tree that travels to the GPU machine is size-limited.
for t in "${TARGETS[@]}"; do objcopy --strip-debug "$BUILD_DIR/bin/$t" "$DIST/bin/$t"; done
ldd "$DIST"/bin/* | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|libssl.so*|libcrypto.so*|libz.so*) ;;
    libcuda.so*|libcudart.so*|libcublas*.so*|libnccl.so*) ;;
    *) cp -L "$lib" "$DIST/lib/" ;;
  esac
done
du -sh "$DIST"
