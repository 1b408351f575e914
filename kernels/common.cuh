// Shared device helpers: loads and stores of the activation types through FP32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "worker/runtime/dtype.h"

namespace shardserve::kernels {

// Whether p is a multiple of `bytes`: the precondition of the kernels' 16-byte vector paths.
__host__ __device__ __forceinline__ bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// kVec elements of T moved as one load or store (kVec * sizeof(T) = 16: one 128-bit access).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T e[kVec];
};

// Rotate-half RoPE of kVec rotation pairs (a[e], b[e]) = (x[i + e], x[i + D/2 + e]) with their
// cos c and sin sn, rounded to T: one definition for the RoPE kernel and the decode attention
// that applies it itself, so the two give the same bits.
template <typename T, int kVec>
__device__ __forceinline__ void rope_rotate(const Pack<T, kVec>& a, const Pack<T, kVec>& b, const Pack<float, kVec>& c,
                                            const Pack<float, kVec>& sn, Pack<T, kVec>& r1, Pack<T, kVec>& r2) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float x1 = to_f32(a.e[e]), x2 = to_f32(b.e[e]);
    r1.e[e] = from_f32<T>(x1 * c.e[e] - x2 * sn.e[e]);
    r2.e[e] = from_f32<T>(x2 * c.e[e] + x1 * sn.e[e]);
  }
}

// silu(gate) * up from the two values already rounded to T, rounded as the reference model rounds
// (silu to T before the product): one definition for silu_mul and the fused gate/up epilogues, so
// they give the same bits.
template <typename T>
__device__ __forceinline__ T silu_mul_rounded(float gate, float up) {
  const float silu = to_f32(from_f32<T>(gate / (1.0f + __expf(-gate))));
  return from_f32<T>(silu * up);
}

// Calls fn.template operator()<T>() with T the CUDA type of an activation dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBF16: return fn.template operator()<__nv_bfloat16>();
    case DType::kF16: return fn.template operator()<__half>();
    case DType::kF32: return fn.template operator()<float>();
    default: return cudaErrorInvalidValue;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Programmatic dependent launch (Hopper and later): a kernel launched by launch_pdl() may be
// scheduled while the kernel before it in the stream is still finishing, so its launch latency
// and prologue hide behind that kernel's tail; at a decode step's hundreds of small kernels this
// is a good part of the step. Such a kernel calls pdl_trigger() (its own dependents may launch)
// and then pdl_wait() before it touches any memory another kernel writes or reads (pdl_wait
// returns once the previous kernel has completed and its writes are visible); only memory no
// kernel writes (weights) may be read before. On older GPUs both are no-ops and launches are
// ordinary. SHARDSERVE_PDL=0 turns it off.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool pdl_enabled() {
  static const bool on = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    const char* env = std::getenv("SHARDSERVE_PDL");
    return major >= 9 && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return on;
}

template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Raises a kernel's dynamic shared memory limit once per kernel (a host call, allowed during graph
// capture).
template <auto kKernel>
cudaError_t allow_smem(size_t bytes) {
  static const cudaError_t e =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return e;
}

// SMs of the current device (1 when it cannot be asked). The launchers ask at every eager launch,
// so each device's count is asked of the driver once and kept.
inline int num_sms() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  constexpr int kKeptDevices = 64;
  static std::atomic<int> kept[kKeptDevices];  // 0: not asked yet
  const bool keep = device >= 0 && device < kKeptDevices;
  if (keep) {
    if (const int n = kept[device].load(std::memory_order_relaxed); n > 0) return n;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  sms = std::max(sms, 1);
  if (keep) kept[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Split-K's shape (host): about ctas_per_sm CTAs an SM over n_tiles output tiles, at least 4 K
// tiles a split, the splits' FP32 partials (per_split_bytes each) within workspace_bytes (0: one
// split), a counter per tile (one split above max_tiles tiles), and no empty split.
struct SplitK {
  int64_t splits = 1;
  int64_t k_tiles_per_split = 0;
};
inline SplitK split_k(int64_t n_tiles, int64_t k_tiles, int ctas_per_sm, int num_sms, size_t workspace_bytes,
                      size_t per_split_bytes, int64_t max_tiles) {
  int64_t splits = std::clamp<int64_t>(ctas_per_sm * static_cast<int64_t>(num_sms) / n_tiles, 1,
                                       std::max<int64_t>(1, k_tiles / 4));
  splits = std::min<int64_t>(splits, static_cast<int64_t>(workspace_bytes / per_split_bytes));
  if (n_tiles > max_tiles) splits = 1;
  splits = std::max<int64_t>(splits, 1);
  SplitK out;
  out.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  out.splits = (k_tiles + out.k_tiles_per_split - 1) / out.k_tiles_per_split;
  return out;
}

// Split-K's handshake: the CTAs of one output tile each publish their partial sums, then count
// themselves on `counter`; the last to count gets true (its own and every other partial visible)
// and puts the counter back to zero for the next launch, which touches it only after its
// pdl_wait, once this grid has completed. Every thread of the CTA calls it, after its writes;
// `flag` is one int of shared memory the CTA's threads can see.
__device__ __forceinline__ bool last_split_to_arrive(int32_t* counter, int splits, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool is_last = atomicAdd(counter, 1) == splits - 1;
    if (is_last) *counter = 0;
    *flag = is_last;
  }
  __syncthreads();
  if (*flag == 0) return false;
  __threadfence();
  return true;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
  return warp_sum(v);
}

}  // namespace shardserve::kernels
