// Decode-sized GEMM on tensor cores: y[T, N] = x[T, K] * W^T for 9..128 tokens, W [N, K].
//
// At these sizes the weight is the cost (T x K of activations is a few MB at most, read from L2),
// and a GEMM tiled for throughput leaves most SMs idle: N / 128 tiles of 4096 outputs are 32 CTAs
// on 132 SMs. Here a CTA owns 64 outputs and a slice of K (split-K, sized from the CTAs per SM the
// caller asks for), streams its W tile [64 x 64] and the matching x tile [T x 64] through a ring
// of cp.async stages (4, 6 or 8: how many bytes each CTA keeps in flight), and multiplies with
// mma.sync (each warp 16 outputs, all T rows). With one split the CTA writes y; with more, each
// writes its FP32 partial to a workspace and the last split of each 64-output tile to finish (a
// counter per tile, back to zero after) sums them in split order (deterministic whichever finishes
// last) and writes y: no second kernel. sm_80 instructions only, so the A100 path is the same code.
//
// Gated (skinny_gemm_silu_mul): W is a fused gate|up projection [2F, K] and a CTA's 64 rows are
// gate rows 32t .. 32t + 31 and the same up rows (F + 32t ...); the final sums (the CTA's own, or
// the last split's) meet in shared memory and y[T, F] = silu(gate) * up, rounded as silu_mul
// rounds the plain GEMM's output, so bit for bit the two kernels' result.
#include <algorithm>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"
#include "kernels/mma.cuh"

namespace shardserve::kernels {
namespace {

using namespace mma;

constexpr int kBN = 64;  // outputs per CTA
constexpr int kBK = 64;  // K per stage
constexpr int kThreads = 128;

constexpr size_t stage_bytes(int bm) { return static_cast<size_t>(bm + kBN) * kBK * 2; }

template <typename T, typename OutT, int BM, int kStages, bool kGated = false>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                               int tokens, int n, int k, int k_per_split,
                                                               OutT* __restrict__ y, float* __restrict__ partials,
                                                               int32_t* __restrict__ counters) {
  static_assert(!kGated || std::is_same_v<T, OutT>, "silu_mul's rounding: T throughout");
  constexpr int kMFrags = BM / 16;
  constexpr uint32_t kXBytes = BM * kBK * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, mi = lane / 8;
  const int n0 = blockIdx.x * kBN;
  const int split = blockIdx.y;
  const int k_begin = split * k_per_split;
  const int k_tiles = (min(k, k_begin + k_per_split) - k_begin) / kBK;
  const uint32_t base = smem_addr(smem);

  auto load_x = [&](int stage, int kt) {
    const uint32_t xs = base + stage * static_cast<uint32_t>(stage_bytes(BM));
    const int64_t kk = k_begin + static_cast<int64_t>(kt) * kBK;
#pragma unroll
    for (int i = 0; i < BM * 8 / kThreads + (BM * 8 % kThreads != 0); ++i) {
      const int idx = tid + i * kThreads;
      if (idx < BM * 8) {
        const int r = idx / 8, c = idx % 8;
        const bool valid = r < tokens;
        cp_async16(xs + swizzle<kBK>(r, c), x + (valid ? r * static_cast<int64_t>(k) + kk + c * 8 : 0), valid);
      }
    }
  };
  auto load_w = [&](int stage, int kt) {
    const uint32_t xs = base + stage * static_cast<uint32_t>(stage_bytes(BM));
    const int64_t kk = k_begin + static_cast<int64_t>(kt) * kBK;
#pragma unroll
    for (int i = 0; i < kBN * 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / 8, c = idx % 8;
      // Gated: rows 0-31 of the tile are gate rows n0 / 2 + r, rows 32-63 the same up rows.
      const int64_t w_row = kGated ? (r < kBN / 2 ? n0 / 2 + r : n / 2 + n0 / 2 + r - kBN / 2) : n0 + r;
      cp_async16(xs + kXBytes + swizzle<kBK>(r, c), w + w_row * k + kk + c * 8, true);
    }
  };

  // The weight is no kernel's output: its first tiles are in flight before the wait for the
  // previous kernel (programmatic dependent launch), x's after.
  pdl_trigger();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_w(s, s);
  }
  pdl_wait();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_x(s, s);
    cp_async_commit();
  }
  float acc[kMFrags][2][4];
#pragma unroll
  for (int m = 0; m < kMFrags; ++m) {
#pragma unroll
    for (int j = 0; j < 2; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (kt + kStages - 1 < k_tiles) {
      load_w((kt + kStages - 1) % kStages, kt + kStages - 1);
      load_x((kt + kStages - 1) % kStages, kt + kStages - 1);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    const uint32_t xs = base + (kt % kStages) * static_cast<uint32_t>(stage_bytes(BM));
    const uint32_t ws = xs + kXBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, ws + swizzle<kBK>(warp * 16 + (mi >> 1) * 8 + (lane & 7), 2 * kk + (mi & 1)));
#pragma unroll
      for (int m = 0; m < kMFrags; ++m) {
        uint32_t a[4];
        ldmatrix_x4(a, xs + swizzle<kBK>(m * 16 + (mi & 1) * 8 + (lane & 7), 2 * kk + (mi >> 1)));
        mma_16816<T>(acc[m][0], a, b[0], b[1]);
        mma_16816<T>(acc[m][1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the stage just read is reloaded next iteration
  }
  cp_async_wait<0>();

  // Gated: the tile's FP32 sums [BM][kBN] (+1 column against bank conflicts) in shared memory
  // (the stages' bytes, free now), then y = silu(gate) * up of its 32 outputs per token.
  constexpr int kTileCols = kBN + 1;
  float* tile = reinterpret_cast<float*>(smem);
  auto gated_out = [&]() {
    __syncthreads();
    const int f = n / 2;
    for (int idx = tid; idx < BM * (kBN / 2); idx += kThreads) {
      const int row = idx / (kBN / 2), c = idx % (kBN / 2);
      if (row >= tokens) break;
      const float g = to_f32(from_f32<T>(tile[row * kTileCols + c]));
      const float up = to_f32(from_f32<T>(tile[row * kTileCols + kBN / 2 + c]));
      y[static_cast<int64_t>(row) * f + n0 / 2 + c] = silu_mul_rounded<T>(g, up);
    }
  };
  if constexpr (kGated) {
    if (partials == nullptr) {
      __syncthreads();  // every warp is done with the stages
#pragma unroll
      for (int m = 0; m < kMFrags; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int row = m * 16 + lane / 4 + 8 * h, col = warp * 16 + j * 8 + (lane % 4) * 2;
            tile[row * kTileCols + col] = acc[m][j][2 * h];
            tile[row * kTileCols + col + 1] = acc[m][j][2 * h + 1];
          }
        }
      }
      gated_out();
      return;
    }
  }

  // Thread (lane) holds rows m * 16 + lane / 4 (+ 8), columns warp * 16 + j * 8 + (lane % 4) * 2 (+ 1).
#pragma unroll
  for (int m = 0; m < kMFrags; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m * 16 + lane / 4 + 8 * h;
      if (row >= tokens) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = n0 + warp * 16 + j * 8 + (lane % 4) * 2;
        const float v0 = acc[m][j][2 * h], v1 = acc[m][j][2 * h + 1];
        if (partials != nullptr) {
          *reinterpret_cast<float2*>(partials + (static_cast<int64_t>(split) * tokens + row) * n + col) =
              make_float2(v0, v1);
        } else if constexpr (std::is_same_v<OutT, float>) {
          *reinterpret_cast<float2*>(y + static_cast<int64_t>(row) * n + col) = make_float2(v0, v1);
        } else {
          *reinterpret_cast<uint32_t*>(y + static_cast<int64_t>(row) * n + col) = pack2<OutT>(v0, v1);
        }
      }
    }
  }
  if (partials == nullptr) return;

  // The last split of this tile to finish sums them all.
  __shared__ int last;
  if (!last_split_to_arrive(counters + blockIdx.x, static_cast<int>(gridDim.y), &last)) return;
  // Four outputs a thread and float4 loads, a split's loads all in flight together (L2 round trips
  // otherwise), splits added in order.
  constexpr int kPer = (BM * kBN / 4 + kThreads - 1) / kThreads;
  const int splits = gridDim.y;
  const int64_t split_stride = static_cast<int64_t>(tokens) * n;
  float4 sum[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) sum[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int p = 0; p < splits; ++p) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads, row = idx / (kBN / 4);
      if (row < tokens) {
        const float4 v =
            __ldcg(reinterpret_cast<const float4*>(partials + p * split_stride + static_cast<int64_t>(row) * n + n0) +
                   idx % (kBN / 4));
        sum[i].x += v.x;
        sum[i].y += v.y;
        sum[i].z += v.z;
        sum[i].w += v.w;
      }
    }
  }
  if constexpr (kGated) {
    __syncthreads();  // every warp is done with the stages
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads, row = idx / (kBN / 4);
      if (row >= BM) continue;
      float* t = tile + row * kTileCols + (idx % (kBN / 4)) * 4;
      t[0] = sum[i].x, t[1] = sum[i].y, t[2] = sum[i].z, t[3] = sum[i].w;
    }
    gated_out();
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads, row = idx / (kBN / 4);
      if (row >= tokens) continue;
      OutT* out = y + static_cast<int64_t>(row) * n + n0 + (idx % (kBN / 4)) * 4;
      if constexpr (std::is_same_v<OutT, float>) {
        *reinterpret_cast<float4*>(out) = sum[i];
      } else {
        *reinterpret_cast<uint2*>(out) = make_uint2(pack2<OutT>(sum[i].x, sum[i].y), pack2<OutT>(sum[i].z, sum[i].w));
      }
    }
  }
}

template <typename T, typename OutT, int BM, int kStages, bool kGated>
cudaError_t launch(const SkinnyGemmShape& s, const void* x, const void* w, void* y, float* workspace,
                   int32_t* counters, cudaStream_t stream) {
  constexpr auto kernel = skinny_gemm_kernel<T, OutT, BM, kStages, kGated>;
  static_assert(BM * (kBN + 1) * sizeof(float) <= kStages * stage_bytes(BM), "the gated tile fits the stages");
  const size_t smem = kStages * stage_bytes(BM);
  if (const cudaError_t e = allow_smem<kernel>(smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(s.n / kBN), static_cast<unsigned>(s.splits));
  return launch_pdl(kernel, grid, dim3(kThreads), smem, stream, static_cast<const T*>(x), static_cast<const T*>(w),
                    static_cast<int>(s.tokens), static_cast<int>(s.n), static_cast<int>(s.k),
                    static_cast<int>(s.k_per_split), static_cast<OutT*>(y), s.splits > 1 ? workspace : nullptr,
                    counters);
}

template <typename T, typename OutT, int BM, bool kGated>
cudaError_t launch_stages(const SkinnyGemmShape& s, const void* x, const void* w, void* y, float* workspace,
                          int32_t* counters, cudaStream_t stream) {
  if constexpr (BM <= 64) {
    if (s.stages == 8) return launch<T, OutT, BM, 8, kGated>(s, x, w, y, workspace, counters, stream);
  }
  return s.stages == 6 ? launch<T, OutT, BM, 6, kGated>(s, x, w, y, workspace, counters, stream)
                       : launch<T, OutT, BM, 4, kGated>(s, x, w, y, workspace, counters, stream);
}

template <typename T, typename OutT, bool kGated = false>
cudaError_t launch_rows(const SkinnyGemmShape& s, const void* x, const void* w, void* y, float* workspace,
                        int32_t* counters, cudaStream_t stream) {
  if (s.tokens <= 16) return launch_stages<T, OutT, 16, kGated>(s, x, w, y, workspace, counters, stream);
  if (s.tokens <= 32) return launch_stages<T, OutT, 32, kGated>(s, x, w, y, workspace, counters, stream);
  if (s.tokens <= 64) return launch_stages<T, OutT, 64, kGated>(s, x, w, y, workspace, counters, stream);
  return launch_stages<T, OutT, 128, kGated>(s, x, w, y, workspace, counters, stream);
}

}  // namespace

SkinnyGemmShape skinny_gemm_shape(int64_t tokens, int64_t n, int64_t k, int num_sms, size_t workspace_bytes,
                                  int ctas_per_sm, int stages) {
  SkinnyGemmShape s;
  if (tokens < 1 || tokens > kMaxSkinnyGemmTokens || n % kBN != 0 || k % kBK != 0 || n <= 0 || k <= 0 ||
      ctas_per_sm < 1 || (stages != 4 && stages != 6 && stages != 8)) {
    return s;
  }
  // Eight stages of 128 token rows would need 192 KB of shared memory, more than an A100 has.
  if (stages == 8 && tokens > 64) return s;
  s.tokens = tokens;
  s.n = n;
  s.k = k;
  s.stages = stages;
  const SplitK split = split_k(n / kBN, k / kBK, ctas_per_sm, num_sms, workspace_bytes,
                               static_cast<size_t>(tokens * n) * sizeof(float), kSkinnyGemmCounters);
  s.k_per_split = split.k_tiles_per_split * kBK;
  s.splits = split.splits;
  s.valid = true;
  return s;
}

cudaError_t skinny_gemm(const SkinnyGemmShape& s, const void* x, const void* w, void* y, DType dtype, DType out_dtype,
                        float* workspace, int32_t* counters, cudaStream_t stream) {
  if (!s.valid || (dtype != DType::kBF16 && dtype != DType::kF16) || (out_dtype != dtype && out_dtype != DType::kF32) ||
      (s.splits > 1 && (workspace == nullptr || counters == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (dtype == DType::kBF16) {
    return out_dtype == DType::kF32 ? launch_rows<__nv_bfloat16, float>(s, x, w, y, workspace, counters, stream)
                                    : launch_rows<__nv_bfloat16, __nv_bfloat16>(s, x, w, y, workspace, counters, stream);
  }
  return out_dtype == DType::kF32 ? launch_rows<__half, float>(s, x, w, y, workspace, counters, stream)
                                  : launch_rows<__half, __half>(s, x, w, y, workspace, counters, stream);
}

cudaError_t skinny_gemm_silu_mul(const SkinnyGemmShape& s, const void* x, const void* w, void* y, DType dtype,
                                 float* workspace, int32_t* counters, cudaStream_t stream) {
  if (!s.valid || (dtype != DType::kBF16 && dtype != DType::kF16) ||
      (s.splits > 1 && (workspace == nullptr || counters == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return dtype == DType::kBF16
             ? launch_rows<__nv_bfloat16, __nv_bfloat16, true>(s, x, w, y, workspace, counters, stream)
             : launch_rows<__half, __half, true>(s, x, w, y, workspace, counters, stream);
}

}  // namespace shardserve::kernels
