// RMSNorm, optionally fused with the residual add that precedes it. One CTA per row. Each thread
// keeps its elements of the row in registers between the two passes, so the row is read once and
// written once, with every load of the first pass independent of the others: at decode sizes
// this kernel is all latency, and one round trip instead of several is what counts.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kMaxPerThread = 16;

template <typename T>
__global__ void rmsnorm_kernel(const T* x, T* residual, const T* weight, int64_t hidden, float eps, T* out) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* rr = residual ? residual + row * hidden : nullptr;
  float vals[kMaxPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    vals[k] = 0.0f;
    if (i < hidden) {
      float v = to_f32(xr[i]);
      if (rr) {
        // The residual stream is kept in T, as the reference model keeps it.
        const T r = from_f32<T>(v + to_f32(rr[i]));
        rr[i] = r;
        v = to_f32(r);
      }
      vals[k] = v;
      sum += v * v;
    }
  }
  const float inv = rsqrtf(block_sum(sum) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i < hidden) {
      // Hugging Face's rounding: normalise in FP32, round to T, then multiply by the weight.
      const float normed = to_f32(from_f32<T>(vals[k] * inv));
      out[row * hidden + i] = from_f32<T>(normed * to_f32(weight[i]));
    }
  }
}

}  // namespace

cudaError_t rmsnorm(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                    void* out, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  // Enough threads that each holds at most kMaxPerThread elements (up to hidden 16384).
  int threads = 128;
  while (threads < 1024 && threads * kMaxPerThread / 2 < hidden) threads *= 2;
  if (static_cast<int64_t>(threads) * kMaxPerThread < hidden) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch_pdl(rmsnorm_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream,
                      static_cast<const T*>(x), static_cast<T*>(residual), static_cast<const T*>(weight), hidden, eps,
                      static_cast<T*>(out));
  });
}

}  // namespace shardserve::kernels
