// RMSNorm, optionally fused with the residual add that precedes it. One CTA per row, each thread
// holding its elements in registers between the two passes, so the row is read once and written
// once. At decode sizes this kernel is all latency: every load is issued before any store (the
// residual is updated in place, so a store between loads would order them one after another: at
// batch 1 that made a 4096-wide row cost 7.5 us), and rows move as 16-byte vectors
// (one element at a time when a row is not a multiple of 16 bytes: hidden up to 8,192 then).
// The weight, which no kernel writes, is read before waiting for the kernel that writes x.
#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

// kPer vectors of kVec elements (16 bytes, or one element) per thread.
template <typename T, int kVec, int kPer>
__global__ void rmsnorm_kernel(const T* x, T* residual, const T* weight, int64_t hidden, float eps, T* out) {
  using V = Pack<T, kVec>;
  pdl_trigger();
  const int64_t vecs = hidden / kVec;
  V wv[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i < vecs) wv[k] = reinterpret_cast<const V*>(weight)[i];
  }
  pdl_wait();  // x and the residual are other kernels' outputs
  const int64_t row = blockIdx.x;
  const V* xr = reinterpret_cast<const V*>(x + row * hidden);
  V* rr = residual ? reinterpret_cast<V*>(residual + row * hidden) : nullptr;
  V xv[kPer], rv[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i < vecs) {
      xv[k] = xr[i];
      if (rr) rv[k] = rr[i];
    }
  }
  float vals[kPer][kVec];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i >= vecs) continue;
    const T* xe = xv[k].e;
    T* re = rv[k].e;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float v = to_f32(xe[e]);
      if (rr) {
        // The residual stream is kept in T, as the reference model keeps it.
        re[e] = from_f32<T>(v + to_f32(re[e]));
        v = to_f32(re[e]);
      }
      vals[k][e] = v;
      sum += v * v;
    }
    if (rr) rr[i] = rv[k];
  }
  const float inv = rsqrtf(block_sum(sum) / static_cast<float>(hidden) + eps);
  V* orow = reinterpret_cast<V*>(out + row * hidden);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i >= vecs) continue;
    const T* we = wv[k].e;
    V ov;
    T* oe = ov.e;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      // Hugging Face's rounding: normalise in FP32, round to T, then multiply by the weight.
      const float normed = to_f32(from_f32<T>(vals[k][e] * inv));
      oe[e] = from_f32<T>(normed * to_f32(we[e]));
    }
    orow[i] = ov;
  }
}

template <typename T, int kVec, int kPer>
cudaError_t launch(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                   void* out, int threads, cudaStream_t stream) {
  return launch_pdl(rmsnorm_kernel<T, kVec, kPer>, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream,
                    static_cast<const T*>(x), static_cast<T*>(residual), static_cast<const T*>(weight), hidden, eps,
                    static_cast<T*>(out));
}

template <typename T, int kVec>
cudaError_t launch_vec(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                       void* out, cudaStream_t stream) {
  // One vector a thread up to 1,024 threads, then 2, 4 or 8.
  const int64_t vecs = hidden / kVec;
  int per = 1;
  while (per < 8 && vecs > 1024 * per) per *= 2;
  if (vecs > 1024 * per) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(std::max<int64_t>(32, ((vecs + per - 1) / per + 31) / 32 * 32));
  switch (per) {
    case 1: return launch<T, kVec, 1>(x, residual, weight, rows, hidden, eps, out, threads, stream);
    case 2: return launch<T, kVec, 2>(x, residual, weight, rows, hidden, eps, out, threads, stream);
    case 4: return launch<T, kVec, 4>(x, residual, weight, rows, hidden, eps, out, threads, stream);
    default: return launch<T, kVec, 8>(x, residual, weight, rows, hidden, eps, out, threads, stream);
  }
}

}  // namespace

cudaError_t rmsnorm(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                    void* out, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const bool vectors = hidden % (16 / static_cast<int64_t>(dtype_size(dtype))) == 0 && aligned(x, 16) &&
                       aligned(weight, 16) && aligned(out, 16) && (residual == nullptr || aligned(residual, 16));
  return dispatch_dtype(dtype, [&]<typename T>() {
    return vectors ? launch_vec<T, 16 / sizeof(T)>(x, residual, weight, rows, hidden, eps, out, stream)
                   : launch_vec<T, 1>(x, residual, weight, rows, hidden, eps, out, stream);
  });
}

}  // namespace shardserve::kernels
