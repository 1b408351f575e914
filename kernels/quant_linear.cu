// Quantized linear layers: the INT4 (AWQ/GPTQ), INT8 weight-only and FP8 formats of
// worker/runtime/backend.h's LinearWeight, each read exactly as the CPU oracle defines it.
//
// Decode (<= 8 tokens): the layer is a matter of streaming the packed weights from HBM, so each
// warp owns one output row and dequantizes in registers as the bytes arrive: INT4 reads 16-byte
// vectors (32 weights, one group's scale and zero point unless act-order g_idx says otherwise),
// INT8/FP8 16-byte vectors of 16 weights with the row's one scale applied at the end. No
// activation quantization here: at batch 1-8 the activations are a few KB and the weights'
// bytes are the whole cost, so FP8 weights are multiplied against the 16-bit activations.
//
// Larger batches: dequantize() expands the weight to the activation type for cuBLASLt (INT4,
// INT8, and FP8 where the GPU has no FP8 tensor cores), or FP8 W8A8 runs on cuBLASLt with
// quantize_fp8_rows() (per-token or static activation scales) before it and scale_fp8_output()
// (activation scale x weight scale) after it.
#include <cuda_fp8.h>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr float kFp8Max = 448.0f;  // largest finite E4M3 (OCP "fn")

__device__ __forceinline__ float fp8_to_f32(uint8_t bits) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(h));
}

__device__ __forceinline__ float scale_at(const void* scales, bool f16, int64_t i) {
  return f16 ? __half2float(static_cast<const __half*>(scales)[i]) : static_cast<const float*>(scales)[i];
}

// x [NT, K] of T, a vector of 8 consecutive features starting at k (a multiple of 8).
template <typename T>
__device__ __forceinline__ void load8(const T* x, int64_t k, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + k));
  const T* p = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = to_f32(p[j]);
}

// One warp per output row; each lane takes 32 consecutive input features (one uint4 of packed
// words) per step. K % 32 == 0.
template <typename T, typename OutT, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    int4_gemv_kernel(const T* __restrict__ x, QuantWeightView w, OutT* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= w.n) return;
  const int64_t k_all = w.k;
  const auto* words = reinterpret_cast<const uint4*>(static_cast<const uint32_t*>(w.weight) + row * (k_all / 8));
  const bool f16 = w.scales_f16;
  const uint8_t* zeros = w.zeros + row * w.num_groups;
  const int64_t scale_base = row * w.num_groups;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  for (int64_t v = lane; v < k_all / 32; v += 32) {
    const uint4 packed = __ldcs(words + v);
    const uint32_t word[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k0 = v * 32 + i * 8;
      float wf[8];
      if (w.g_idx == nullptr) {
        // group_size is a multiple of 8: the word's 8 features share one group.
        const int64_t g = k0 / w.group_size;
        const float s = scale_at(w.scales, f16, scale_base + g);
        const int z = zeros[g];
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = static_cast<float>(static_cast<int>((word[i] >> (4 * j)) & 0xFu) - z) * s;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int64_t g = __ldg(w.g_idx + k0 + j);
          wf[j] = static_cast<float>(static_cast<int>((word[i] >> (4 * j)) & 0xFu) - zeros[g]) *
                  scale_at(w.scales, f16, scale_base + g);
        }
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float xf[8];
        load8(x + t * k_all, k0, xf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[t] += wf[j] * xf[j];
      }
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == 0) y[t * w.n + row] = from_f32<OutT>(s);
  }
}

// INT8 or FP8 weights, one scale per row. K % 16 == 0. As the 16-bit GEMV (gemv.cu): the first
// weights are requested before the programmatic-dependent-launch wait (weights never change), and
// the loop is unrolled so that a warp keeps several 16-byte vectors in flight.
template <typename T, typename OutT, int NT, bool kFp8>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    w8_gemv_kernel(const T* __restrict__ x, QuantWeightView w, OutT* __restrict__ y) {
  pdl_trigger();
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t k_all = w.k;
  const auto* vecs = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(w.weight) + min(row, w.n - 1) * k_all);
  const int64_t n_vecs = k_all / 16;
  constexpr int kPre = 2;
  uint4 pre[kPre];
#pragma unroll
  for (int u = 0; u < kPre; ++u) {
    if (lane + u * 32 < n_vecs) pre[u] = __ldcs(vecs + lane + u * 32);
  }
  pdl_wait();
  if (row >= w.n) return;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  auto consume = [&](const uint4& packed, int64_t v) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(&packed);
    float wf[16];
    if constexpr (kFp8) {
      const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&packed);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const __half2 h(__nv_cvt_fp8x2_to_halfraw2(pairs[j], __NV_E4M3));
        const float2 f = __half22float2(h);
        wf[2 * j] = f.x;
        wf[2 * j + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) wf[j] = static_cast<float>(static_cast<int8_t>(bytes[j]));
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      float xf[8];
      load8(x + t * k_all, v * 16, xf);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[t] += wf[j] * xf[j];
      load8(x + t * k_all, v * 16 + 8, xf);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[t] += wf[8 + j] * xf[j];
    }
  };
#pragma unroll
  for (int u = 0; u < kPre; ++u) {
    if (lane + u * 32 < n_vecs) consume(pre[u], lane + u * 32);
  }
#pragma unroll 4
  for (int64_t v = lane + kPre * 32; v < n_vecs; v += 32) consume(__ldcs(vecs + v), v);
  const float scale = static_cast<const float*>(w.scales)[row];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == 0) y[t * w.n + row] = from_f32<OutT>(s * scale);
  }
}

template <typename T, typename OutT>
cudaError_t launch_gemv(const QuantWeightView& w, const void* x, int64_t tokens, void* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  const auto* xs = static_cast<const T*>(x);
  auto* ys = static_cast<OutT*>(y);
  switch (tokens) {
#define SHARDSERVE_QGEMV_CASE(NT)                                                                                 \
  case NT:                                                                                                       \
    if (w.format == QuantFormat::kInt4) {                                                                       \
      int4_gemv_kernel<T, OutT, NT><<<grid, block, 0, stream>>>(xs, w, ys);                                      \
    } else if (w.format == QuantFormat::kInt8) {                                                                \
      return launch_pdl(w8_gemv_kernel<T, OutT, NT, false>, grid, block, 0, stream, xs, w, ys);                  \
    } else {                                                                                                     \
      return launch_pdl(w8_gemv_kernel<T, OutT, NT, true>, grid, block, 0, stream, xs, w, ys);                   \
    }                                                                                                            \
    break;
    SHARDSERVE_QGEMV_CASE(1) SHARDSERVE_QGEMV_CASE(2) SHARDSERVE_QGEMV_CASE(3) SHARDSERVE_QGEMV_CASE(4)
    SHARDSERVE_QGEMV_CASE(5) SHARDSERVE_QGEMV_CASE(6) SHARDSERVE_QGEMV_CASE(7) SHARDSERVE_QGEMV_CASE(8)
#undef SHARDSERVE_QGEMV_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// out [N, K] of T = the dequantized weight, one thread per 8 consecutive features of a row.
template <typename T>
__global__ void dequantize_kernel(QuantWeightView w, T* __restrict__ out) {
  const int64_t per_row = w.k / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= w.n * per_row) return;
  const int64_t row = i / per_row;
  const int64_t k0 = (i % per_row) * 8;
  float wf[8];
  if (w.format == QuantFormat::kInt4) {
    const uint32_t word = static_cast<const uint32_t*>(w.weight)[row * per_row + k0 / 8];
    for (int j = 0; j < 8; ++j) {
      const int64_t g = w.g_idx ? w.g_idx[k0 + j] : (k0 + j) / w.group_size;
      wf[j] = static_cast<float>(static_cast<int>((word >> (4 * j)) & 0xFu) - w.zeros[row * w.num_groups + g]) *
              scale_at(w.scales, w.scales_f16, row * w.num_groups + g);
    }
  } else {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.weight) + row * w.k + k0;
    const float s = static_cast<const float*>(w.scales)[row];
    for (int j = 0; j < 8; ++j) {
      wf[j] = (w.format == QuantFormat::kFp8 ? fp8_to_f32(bytes[j]) : static_cast<float>(static_cast<int8_t>(bytes[j]))) * s;
    }
  }
  T* o = out + row * w.k + k0;
  for (int j = 0; j < 8; ++j) o[j] = from_f32<T>(wf[j]);
}

// One block per row: scale = amax / 448 (or the static scale), q = satfinite(x / scale).
template <typename T>
__global__ void quantize_fp8_rows_kernel(const T* __restrict__ x, int64_t k, const float* __restrict__ static_scale,
                                         __nv_fp8_storage_t* __restrict__ q, float* __restrict__ row_scales) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  float scale;
  if (static_scale != nullptr) {
    scale = *static_scale;
  } else {
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(xr[i])));
    // Warp maxima, then warp 0 takes the maximum of those and shares it with every thread (each
    // thread quantizes its own elements with the row's one scale).
    __shared__ float partial[32];
    __shared__ float row_amax;
    amax = warp_max(amax);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
    __syncthreads();
    if (threadIdx.x < 32) {
      amax = warp_max(threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f);
      if (threadIdx.x == 0) row_amax = amax;
    }
    __syncthreads();
    amax = row_amax;
    // A row of zeros keeps a finite, positive scale (its codes are then all zero).
    scale = fmaxf(amax, 1e-12f) / kFp8Max;
  }
  const float inv = 1.0f / scale;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    q[row * k + i] = __nv_cvt_float_to_fp8(to_f32(xr[i]) * inv, __NV_SATFINITE, __NV_E4M3);
  }
  if (threadIdx.x == 0) row_scales[row] = scale;
}

template <typename OutT>
__global__ void scale_fp8_output_kernel(const float* __restrict__ acc, const float* __restrict__ row_scales,
                                        const float* __restrict__ col_scales, int64_t rows, int64_t cols,
                                        OutT* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols;
  const int64_t c = i % cols;
  out[i] = from_f32<OutT>(acc[i] * row_scales[r] * col_scales[c]);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

bool quant_gemv_supported(const QuantWeightView& w, int64_t tokens, DType x) {
  if (tokens < 1 || tokens > kMaxGemvTokens || (x != DType::kBF16 && x != DType::kF16)) return false;
  if (w.format == QuantFormat::kInt4) {
    return w.k % 32 == 0 && (w.g_idx != nullptr || (w.group_size > 0 && w.group_size % 8 == 0));
  }
  return w.k % 16 == 0;
}

cudaError_t quant_gemv(const QuantWeightView& w, const void* x, int64_t tokens, void* y, DType dtype, DType out_dtype,
                       cudaStream_t stream) {
  if (!quant_gemv_supported(w, tokens, dtype)) return cudaErrorInvalidValue;
  if (out_dtype == DType::kF32) {
    return dtype == DType::kBF16 ? launch_gemv<__nv_bfloat16, float>(w, x, tokens, y, stream)
                                 : launch_gemv<__half, float>(w, x, tokens, y, stream);
  }
  if (out_dtype != dtype) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? launch_gemv<__nv_bfloat16, __nv_bfloat16>(w, x, tokens, y, stream)
                               : launch_gemv<__half, __half>(w, x, tokens, y, stream);
}

cudaError_t dequantize(const QuantWeightView& w, void* out, DType dtype, cudaStream_t stream) {
  if (w.k % 8 != 0) return cudaErrorInvalidValue;
  if (w.format == QuantFormat::kInt4 && w.g_idx == nullptr && w.group_size <= 0) return cudaErrorInvalidValue;
  const int64_t threads_total = w.n * (w.k / 8);
  if (threads_total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    dequantize_kernel<T><<<blocks_for(threads_total, 256), 256, 0, stream>>>(w, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t quantize_fp8_rows(const void* x, int64_t rows, int64_t k, const float* static_scale, uint8_t* q,
                              float* row_scales, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    quantize_fp8_rows_kernel<T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        static_cast<const T*>(x), k, static_scale, reinterpret_cast<__nv_fp8_storage_t*>(q), row_scales);
    return cudaGetLastError();
  });
}

cudaError_t scale_fp8_output(const float* acc, const float* row_scales, const float* col_scales, int64_t rows,
                             int64_t cols, void* out, DType out_dtype, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch_dtype(out_dtype, [&]<typename T>() {
    scale_fp8_output_kernel<T><<<blocks_for(rows * cols, 256), 256, 0, stream>>>(acc, row_scales, col_scales, rows,
                                                                                cols, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace shardserve::kernels
