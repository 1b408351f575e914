// RoPE (rotate-half pairing, precomputed FP32 cos/sin including llama3 scaling) fused with the
// paged KV-cache write: one pass over the token's q and k heads, then k and v go straight to
// their slot. One CTA per token; thread i handles rotation pair i of one head at a time.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename T>
__global__ void rope_kv_kernel(T* qkv, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                               const int32_t* positions, const float* cos_sin, const int32_t* slot_mapping,
                               T* k_cache, T* v_cache) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t t = blockIdx.x;
  const int64_t half = head_dim / 2;
  const int64_t stride = (num_q_heads + 2 * num_kv_heads) * head_dim;
  T* row = qkv + t * stride;
  const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
  const int64_t pairs = (num_q_heads + num_kv_heads) * half;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t head = p / half;
    const int64_t i = p % half;
    T* x = row + head * head_dim;
    const float x1 = to_f32(x[i]);
    const float x2 = to_f32(x[i + half]);
    x[i] = from_f32<T>(x1 * cs[i] - x2 * cs[half + i]);
    x[i + half] = from_f32<T>(x2 * cs[i] + x1 * cs[half + i]);
  }
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  __syncthreads();  // the rotated k must be complete before it is copied
  const int64_t kv_row = num_kv_heads * head_dim;
  const T* k = row + num_q_heads * head_dim;
  for (int64_t i = threadIdx.x; i < kv_row; i += blockDim.x) {
    k_cache[slot * kv_row + i] = k[i];
    v_cache[slot * kv_row + i] = k[kv_row + i];
  }
}

}  // namespace

cudaError_t rope_and_store_kv(void* qkv, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, const int32_t* positions, const float* cos_sin,
                              const int32_t* slot_mapping, void* k_cache, void* v_cache, DType dtype,
                              cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch_pdl(rope_kv_kernel<T>, dim3(static_cast<unsigned>(num_tokens)), dim3(128), 0, stream,
                      static_cast<T*>(qkv), num_q_heads, num_kv_heads, head_dim, positions, cos_sin, slot_mapping,
                      static_cast<T*>(k_cache), static_cast<T*>(v_cache));
  });
}

}  // namespace shardserve::kernels
