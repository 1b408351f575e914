// RoPE (rotate-half pairing, precomputed FP32 cos/sin including llama3 scaling) fused with the
// paged KV-cache write. One thread per rotation pair (i, i + D/2) of one head of one token: the
// q and k pairs are rotated in place, the rotated k pair and the v pair (copied as they are) go
// straight to the token's slot. Grid (token, chunk of 256 pairs). Each thread loads everything
// before it stores: at decode sizes the kernel is all latency, and one CTA per token walking its
// heads in a loop (the layout before) took 10-12 us a layer at batch 1 to 128.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kv_kernel(T* qkv, int num_q_heads, int num_kv_heads, int head_dim,
                                                            const int32_t* positions, const float* cos_sin,
                                                            const int32_t* slot_mapping, T* k_cache, T* v_cache) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int pair = blockIdx.y * kThreads + threadIdx.x;
  if (pair >= (num_q_heads + 2 * num_kv_heads) * half) return;
  const int head = pair / half;  // q heads, then k heads, then v heads
  const int i = pair % half;
  T* x = qkv + t * (num_q_heads + 2 * num_kv_heads) * static_cast<int64_t>(head_dim) + head * head_dim;
  const T a = x[i], b = x[i + half];
  const int64_t slot = slot_mapping[t];
  const int64_t kv_row = static_cast<int64_t>(num_kv_heads) * head_dim;
  if (head < num_q_heads + num_kv_heads) {
    const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
    const float c = cs[i], s = cs[half + i];
    const float x1 = to_f32(a), x2 = to_f32(b);
    const T r1 = from_f32<T>(x1 * c - x2 * s);
    const T r2 = from_f32<T>(x2 * c + x1 * s);
    x[i] = r1;
    x[i + half] = r2;
    if (head >= num_q_heads && slot >= 0) {
      T* k = k_cache + slot * kv_row + (head - num_q_heads) * head_dim;
      k[i] = r1;
      k[i + half] = r2;
    }
  } else if (slot >= 0) {
    T* v = v_cache + slot * kv_row + (head - num_q_heads - num_kv_heads) * head_dim;
    v[i] = a;
    v[i + half] = b;
  }
}

}  // namespace

cudaError_t rope_and_store_kv(void* qkv, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, const int32_t* positions, const float* cos_sin,
                              const int32_t* slot_mapping, void* k_cache, void* v_cache, DType dtype,
                              cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (head_dim % 2 != 0 || num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t pairs = (num_q_heads + 2 * num_kv_heads) * (head_dim / 2);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>((pairs + kThreads - 1) / kThreads));
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch_pdl(rope_kv_kernel<T>, grid, dim3(kThreads), 0, stream, static_cast<T*>(qkv),
                      static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_dim),
                      positions, cos_sin, slot_mapping, static_cast<T*>(k_cache), static_cast<T*>(v_cache));
  });
}

}  // namespace shardserve::kernels
