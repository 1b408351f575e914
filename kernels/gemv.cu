// Decode-time matrix-vector products: y[t, n] = sum_k x[t, k] * W[n, k] for up to 8 tokens.
//
// At batch 1-8 a linear layer reads its whole weight matrix to do 2-16 flops per weight: it is
// purely a matter of streaming W from HBM at full bandwidth. cuBLASLt does that well for the
// large FFN and LM-head matrices but leaves 15-30% on the table for the 4096-wide attention
// projections. Here each warp owns one output row: every lane streams 16-byte vectors of the row
// (8 BF16/F16 weights, evict-first since they are read once per step), the loop is unrolled so a
// warp keeps several vectors in flight, and x (a few KB, reused by every row) comes through the
// read-only cache. FP32 accumulation, one warp reduction per token at the end.
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kWarpsPerBlock = 8;

// kGated: W is a fused gate|up projection [2n, K] and y[t, r] = silu(gate) * up of its rows r and
// n + r, rounded as silu_mul_kernel rounds the GEMV's outputs (so bit for bit the two kernels'
// result): the first half of a CTA's warps take gate rows, the second half the same up rows, and
// they meet in shared memory.
template <typename T, typename OutT, int NT, bool kGated = false>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                 int64_t n, int64_t k, OutT* __restrict__ y) {
  static_assert(!kGated || std::is_same_v<T, OutT>, "silu_mul's rounding: T throughout");
  pdl_trigger();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  constexpr int kPairs = kWarpsPerBlock / 2;
  // Gated: the pair's row r (gate; up is n + r), clamped so that every warp reaches the barrier.
  const int64_t row = kGated ? static_cast<int64_t>(blockIdx.x) * kPairs + warp % kPairs
                             : static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const int64_t w_row = kGated ? min(row, n - 1) + (warp >= kPairs ? n : 0) : min(row, n - 1);
  const uint4* wr = reinterpret_cast<const uint4*>(w + w_row * k);
  const int64_t vecs = k / 8;
  // The first weights are read before waiting for the kernel that writes x (weights never change).
  // 8 vectors a lane: A/B on an H200, 8B BF16 decode, batch 1 223.3-223.8 tok/s against 219.3-219.6
  // with 4; 12 and 16 (87 and 127 registers a thread, 2 CTAs an SM) fell to 174-182.
  constexpr int kPre = 8;
  uint4 pre[kPre];
#pragma unroll
  for (int u = 0; u < kPre; ++u) {
    if (lane + u * 32 < vecs) pre[u] = __ldcs(wr + lane + u * 32);
  }
  pdl_wait();
  if (!kGated && row >= n) return;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  auto consume = [&](const uint4& wv, int64_t v) {
    const T* wp = reinterpret_cast<const T*>(&wv);
    float wf[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wf[j] = to_f32(wp[j]);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + t * k) + v);
      const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[t] += wf[j] * to_f32(xp[j]);
    }
  };
#pragma unroll
  for (int u = 0; u < kPre; ++u) {
    if (lane + u * 32 < vecs) consume(pre[u], lane + u * 32);
  }
#pragma unroll 4
  for (int64_t v = lane + kPre * 32; v < vecs; v += 32) consume(__ldcs(wr + v), v);
  if constexpr (kGated) {
    static_assert(std::is_same_v<T, OutT>, "silu_mul's rounding: T throughout");
    __shared__ T part[kWarpsPerBlock][NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) part[warp][t] = from_f32<T>(s);
    }
    __syncthreads();
    if (threadIdx.x < kPairs * NT) {
      const int pair = threadIdx.x % kPairs, t = threadIdx.x / kPairs;
      const int64_t r = static_cast<int64_t>(blockIdx.x) * kPairs + pair;
      if (r < n) y[t * n + r] = silu_mul_rounded<T>(to_f32(part[pair][t]), to_f32(part[kPairs + pair][t]));
    }
  } else {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) y[t * n + row] = from_f32<OutT>(s);
    }
  }
}

template <typename T, typename OutT, bool kGated = false>
cudaError_t launch(const void* x, const void* w, int64_t tokens, int64_t n, int64_t k, void* y, cudaStream_t stream) {
  const int64_t rows_per_block = kGated ? kWarpsPerBlock / 2 : kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block));
  const auto* xs = static_cast<const T*>(x);
  const auto* ws = static_cast<const T*>(w);
  auto* ys = static_cast<OutT*>(y);
  switch (tokens) {
#define SHARDSERVE_GEMV_CASE(NT)                                                                                   \
  case NT:                                                                                                         \
    return launch_pdl(gemv_kernel<T, OutT, NT, kGated>, grid, dim3(kWarpsPerBlock * 32), 0, stream, xs, ws, n, k, \
                      ys);
    SHARDSERVE_GEMV_CASE(1) SHARDSERVE_GEMV_CASE(2) SHARDSERVE_GEMV_CASE(3) SHARDSERVE_GEMV_CASE(4)
    SHARDSERVE_GEMV_CASE(5) SHARDSERVE_GEMV_CASE(6) SHARDSERVE_GEMV_CASE(7) SHARDSERVE_GEMV_CASE(8)
#undef SHARDSERVE_GEMV_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

bool gemv_supported(int64_t tokens, int64_t k, DType weight, DType x) {
  return tokens >= 1 && tokens <= kMaxGemvTokens && k % 8 == 0 && weight == x &&
         (weight == DType::kBF16 || weight == DType::kF16);
}

cudaError_t gemv(const void* x, const void* w, int64_t tokens, int64_t n, int64_t k, void* y, DType dtype,
                 DType out_dtype, cudaStream_t stream) {
  if (out_dtype == DType::kF32) {
    return dtype == DType::kBF16 ? launch<__nv_bfloat16, float>(x, w, tokens, n, k, y, stream)
                                 : launch<__half, float>(x, w, tokens, n, k, y, stream);
  }
  if (out_dtype != dtype) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? launch<__nv_bfloat16, __nv_bfloat16>(x, w, tokens, n, k, y, stream)
                               : launch<__half, __half>(x, w, tokens, n, k, y, stream);
}

cudaError_t gemv_silu_mul(const void* x, const void* w, int64_t tokens, int64_t f, int64_t k, void* y, DType dtype,
                          cudaStream_t stream) {
  if (f < 1 || !gemv_supported(tokens, k, dtype, dtype)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? launch<__nv_bfloat16, __nv_bfloat16, true>(x, w, tokens, f, k, y, stream)
                               : launch<__half, __half, true>(x, w, tokens, f, k, y, stream);
}

}  // namespace shardserve::kernels
