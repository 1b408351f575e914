// RoPE (rotate-half pairing, precomputed FP32 cos/sin including llama3 scaling) fused with the
// paged KV-cache write. One thread per 16 bytes of rotation pairs (i, i + D/2) of one head of one
// token (one pair when a half head is not whole vectors): the q and k pairs are rotated in place,
// the rotated k and the v values (copied as they are) go straight to the token's slot. Grid
// (token, chunk of 256 threads). Each thread loads everything before it stores: at decode sizes
// the kernel is all latency, and one CTA per token walking its heads in a loop (the layout
// before) took 10-12 us a layer at batch 1 to 128; a thread per pair took 32 us a layer at a
// 2,048-token prefill.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kThreads = 256;

// kVec consecutive rotation pairs (i .. i + kVec - 1 with their partners i + D/2 ..) a thread:
// 16-byte loads and stores of x, the caches and (two per kVec of 4 bytes) cos and sin.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) rope_kv_kernel(T* qkv, int num_q_heads, int num_kv_heads, int head_dim,
                                                            const int32_t* positions, const float* cos_sin,
                                                            const int32_t* slot_mapping, T* k_cache, T* v_cache) {
  using V = Pack<T, kVec>;
  using F = Pack<float, kVec>;
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int item = blockIdx.y * kThreads + threadIdx.x;
  if (item >= (num_q_heads + 2 * num_kv_heads) * (half / kVec)) return;
  const int head = item / (half / kVec);  // q heads, then k heads, then v heads
  const int i = item % (half / kVec) * kVec;
  T* x = qkv + t * (num_q_heads + 2 * num_kv_heads) * static_cast<int64_t>(head_dim) + head * head_dim;
  const V a = *reinterpret_cast<const V*>(x + i), b = *reinterpret_cast<const V*>(x + i + half);
  const int64_t slot = slot_mapping[t];
  const int64_t kv_row = static_cast<int64_t>(num_kv_heads) * head_dim;
  if (head < num_q_heads + num_kv_heads) {
    const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
    const F c = *reinterpret_cast<const F*>(cs + i), sn = *reinterpret_cast<const F*>(cs + half + i);
    V r1, r2;
    rope_rotate<T, kVec>(a, b, c, sn, r1, r2);
    *reinterpret_cast<V*>(x + i) = r1;
    *reinterpret_cast<V*>(x + i + half) = r2;
    if (head >= num_q_heads && slot >= 0) {
      T* k = k_cache + slot * kv_row + (head - num_q_heads) * head_dim;
      *reinterpret_cast<V*>(k + i) = r1;
      *reinterpret_cast<V*>(k + i + half) = r2;
    }
  } else if (slot >= 0) {
    T* v = v_cache + slot * kv_row + (head - num_q_heads - num_kv_heads) * head_dim;
    *reinterpret_cast<V*>(v + i) = a;
    *reinterpret_cast<V*>(v + i + half) = b;
  }
}

template <typename T, int kVec>
cudaError_t launch(void* qkv, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                   const int32_t* positions, const float* cos_sin, const int32_t* slot_mapping, void* k_cache,
                   void* v_cache, cudaStream_t stream) {
  const int64_t items = (num_q_heads + 2 * num_kv_heads) * (head_dim / 2 / kVec);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>((items + kThreads - 1) / kThreads));
  return launch_pdl(rope_kv_kernel<T, kVec>, grid, dim3(kThreads), 0, stream, static_cast<T*>(qkv),
                    static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_dim), positions,
                    cos_sin, slot_mapping, static_cast<T*>(k_cache), static_cast<T*>(v_cache));
}

}  // namespace

cudaError_t rope_and_store_kv(void* qkv, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, const int32_t* positions, const float* cos_sin,
                              const int32_t* slot_mapping, void* k_cache, void* v_cache, DType dtype,
                              cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (head_dim % 2 != 0 || num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int kVec = 16 / sizeof(T);
    // Whole vectors per half head (so every head, cache row and cos/sin vector stays aligned).
    const bool vectors = (head_dim / 2) % kVec == 0 && aligned(qkv, 16) && aligned(cos_sin, 4 * kVec) &&
                         aligned(k_cache, 16) && aligned(v_cache, 16);
    return vectors ? launch<T, kVec>(qkv, num_tokens, num_q_heads, num_kv_heads, head_dim, positions, cos_sin,
                                     slot_mapping, k_cache, v_cache, stream)
                   : launch<T, 1>(qkv, num_tokens, num_q_heads, num_kv_heads, head_dim, positions, cos_sin,
                                  slot_mapping, k_cache, v_cache, stream);
  });
}

}  // namespace shardserve::kernels
