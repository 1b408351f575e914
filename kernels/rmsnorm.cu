// RMSNorm, optionally fused with the residual add that precedes it. One CTA per row: the row is
// read once into registers-through-L1, reduced in FP32, and written once.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename T>
__global__ void rmsnorm_kernel(const T* x, T* residual, const T* weight, int64_t hidden, float eps, T* out) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* rr = residual ? residual + row * hidden : nullptr;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_f32(xr[i]);
    if (rr) {
      // The residual stream is kept in T, as the reference model keeps it.
      const T r = from_f32<T>(v + to_f32(rr[i]));
      rr[i] = r;
      v = to_f32(r);
    }
    sum += v * v;
  }
  const float inv = rsqrtf(block_sum(sum) / static_cast<float>(hidden) + eps);
  const T* src = rr ? rr : xr;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float normed = to_f32(from_f32<T>(to_f32(src[i]) * inv));
    out[row * hidden + i] = from_f32<T>(normed * to_f32(weight[i]));
  }
}

}  // namespace

cudaError_t rmsnorm(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                    void* out, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = hidden >= 4096 ? 1024 : hidden >= 1024 ? 256 : 128;
  return dispatch_dtype(dtype, [&]<typename T>() {
    rmsnorm_kernel<T><<<rows, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(residual),
                                                    static_cast<const T*>(weight), hidden, eps, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace shardserve::kernels
