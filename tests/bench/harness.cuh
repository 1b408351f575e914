// What the standalone kernel harnesses (tests/bench/*_harness.cu) share: a CUDA error check that
// exits, the device-to-device copy bandwidth (the limit the bandwidth fractions are measured
// against, in the same run), and a timer of back-to-back launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                                   \
  do {                                                                                          \
    const cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace shardserve::harness {

// Bytes read + written per second by 1 GiB device-to-device copies.
inline double copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *x, *y;
  CK(cudaMalloc(&x, bytes));
  CK(cudaMalloc(&y, bytes));
  CK(cudaMemset(x, 1, bytes));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaMemcpy(y, x, bytes, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(a));
  for (int i = 0; i < 10; ++i) CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(x);
  cudaFree(y);
  return 2.0 * bytes * 10 / (ms * 1e-3);
}

// Microseconds per call of f(i) over `iters` back-to-back calls after 3 warm-up calls.
template <typename F>
double time_us(F&& f, int iters) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i);
  CK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) f(i);
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return 1e3 * ms / iters;
}

}  // namespace shardserve::harness
