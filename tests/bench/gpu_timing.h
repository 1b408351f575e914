// GPU timing shared by the benchmarks (engine_bench) and the standalone kernel harnesses
// (tests/bench/*_harness.cu): a CUDA error check that exits, the device-to-device copy bandwidth
// (the limit bandwidth fractions are measured against, in the same run), and a timer of
// back-to-back launches. Plain CUDA runtime calls: usable from .cc and .cu files.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#define CK(x)                                                                                   \
  do {                                                                                          \
    const cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace shardserve::harness {

// Milliseconds between two events on the default stream around work().
template <typename F>
float event_ms(F&& work) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a));
  work();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms;
}

// Bytes read + written per second by a 1 GiB device-to-device copy: the median of 10, after 2
// warm-up copies.
inline double copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *x, *y;
  CK(cudaMalloc(&x, bytes));
  CK(cudaMalloc(&y, bytes));
  CK(cudaMemset(x, 1, bytes));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    const float t = event_ms([&] { CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice)); });
    if (i >= 2) ms.push_back(t);
  }
  cudaFree(x);
  cudaFree(y);
  std::sort(ms.begin(), ms.end());
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3);
}

// Microseconds per call of f(i) over `iters` back-to-back calls after 3 warm-up calls.
template <typename F>
double time_us(F&& f, int iters) {
  for (int i = 0; i < 3; ++i) f(i);
  return 1e3 * event_ms([&] {
           for (int i = 0; i < iters; ++i) f(i);
         }) /
         iters;
}

// The date of a benchmark record: YYYY-MM-DD, UTC.
inline std::string record_date() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

}  // namespace shardserve::harness
