// Paged causal attention for prefill, chunked prefill and decode in one kernel.
//
// Grid (token, KV head, split). One CTA serves the G = Hq / Hkv query heads that share a KV head,
// so each K/V tile is read from the paged cache once per group (GQA-aware), and it walks the
// token's causal context [0, pos] in tiles of 32 positions with an online softmax (FP32). For
// decode, where tokens x KV heads is far below the SM count, the context is split over `num_splits`
// CTAs (flash-decoding) whose partial (max, sum, accumulator) are merged by a combine kernel.
// The split count depends only on the launch shape, not on sequence lengths, so a captured CUDA
// graph stays valid as sequences grow: splits past the end of a context simply write empty
// partials.
//
// This is the CUDA-core version: prefill re-reads K/V per query token from L2. A tensor-core
// (FlashAttention-2 style) prefill path is the next step for long prompts.
//
// Decode-only steps (one query token per sequence) take decode_kernel instead, built to stream
// the KV cache at memory bandwidth: grid (sequence, KV head, split); each CTA walks its part of
// the context in tiles of 64 positions. Every lane owns a fixed slice of head_dim (16 bytes of
// each K and V row: 8 BF16, or 8 bytes for 8-query-head groups, which need twice the registers
// per slice) for all the group's query heads, so a K or V row is one coalesced line per
// kLanesPerRow lanes, read once for the whole GQA group, with all of a warp's rows of a tile in
// flight before the first use. Scores go through shared memory for the tile's online softmax
// (FP32, exp2 with log2(e) folded into q); each thread accumulates P.V for its slice over its
// rows, and the warps' partial sums are added once at the end. Splits write the same partials as
// attention_kernel, merged by combine_kernel.
#include <cfloat>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kTile = 32;  // = warp size: one lane per position in the softmax update
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxAcc = 16;  // accumulators per thread: G * D <= kThreads * kMaxAcc

size_t smem_bytes(int64_t g, int64_t d) {
  return sizeof(float) * (g * d + 2 * kTile * (d + 1) + g * kTile + 3 * g + 1) + sizeof(int64_t) * kTile;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttentionParams p) {
  const int64_t t = blockIdx.x;
  const int64_t kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int G = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const int D = static_cast<int>(p.head_dim);
  const int tid = threadIdx.x;

  // The sequence of token t: the last s with query_start_loc[s] <= t.
  int lo = 0, hi = static_cast<int>(p.num_seqs) - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int s = lo;
  const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
  const int ctx = p.seq_lens[s] - q_len + static_cast<int>(t - p.query_start_loc[s]) + 1;  // positions [0, ctx)
  const int tiles = (ctx + kTile - 1) / kTile;
  const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int begin = split * tiles_per_split * kTile;
  const int end = min(ctx, begin + tiles_per_split * kTile);

  extern __shared__ float smem[];
  float* q_s = smem;                     // [G][D], pre-scaled
  float* k_s = q_s + G * D;              // [kTile][D + 1] (padded: conflict-free column reads)
  float* v_s = k_s + kTile * (D + 1);    // [kTile][D + 1]
  float* p_s = v_s + kTile * (D + 1);    // [G][kTile]
  float* m_s = p_s + G * kTile;          // [G]
  float* l_s = m_s + G;                  // [G]
  float* alpha_s = l_s + G;              // [G]
  int64_t* slot_s = reinterpret_cast<int64_t*>(alpha_s + G + (G % 2));  // [kTile], 8-byte aligned

  const int64_t stride = (p.num_q_heads + 2 * p.num_kv_heads) * D;
  const T* q = static_cast<const T*>(p.qkv) + t * stride + kvh * G * D;
  for (int i = tid; i < G * D; i += kThreads) q_s[i] = to_f32(q[i]) * p.scale;
  for (int g = tid; g < G; g += kThreads) {
    m_s[g] = -FLT_MAX;
    l_s[g] = 0.0f;
  }
  float acc[kMaxAcc];
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) acc[k] = 0.0f;

  const int32_t* block_table = p.block_tables + s * p.max_blocks;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  // K and V rows are moved as 16-byte vectors; the addresses come from slot_s, so every load of a
  // tile is independent of the others and they all fly at once.
  constexpr int kVec = 16 / sizeof(T);
  const int vecs_per_row = D / kVec;
  __syncthreads();

  for (int start = begin; start < end; start += kTile) {
    const int n = min(kTile, end - start);
    if (tid < n) {
      const int pos = start + tid;
      const int64_t slot = static_cast<int64_t>(block_table[pos / p.block_size]) * p.block_size + pos % p.block_size;
      slot_s[tid] = (slot * p.num_kv_heads + kvh) * D;
    }
    __syncthreads();
#pragma unroll 4
    for (int i = tid; i < n * vecs_per_row; i += kThreads) {
      const int j = i / vecs_per_row;
      const int c = (i % vecs_per_row) * kVec;
      const uint4 kv = *reinterpret_cast<const uint4*>(k_cache + slot_s[j] + c);
      const uint4 vv = *reinterpret_cast<const uint4*>(v_cache + slot_s[j] + c);
      const T* ke = reinterpret_cast<const T*>(&kv);
      const T* ve = reinterpret_cast<const T*>(&vv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        k_s[j * (D + 1) + c + e] = to_f32(ke[e]);
        v_s[j * (D + 1) + c + e] = to_f32(ve[e]);
      }
    }
    __syncthreads();
    for (int i = tid; i < G * kTile; i += kThreads) {
      const int g = i / kTile;
      const int j = i % kTile;
      float score = -FLT_MAX;
      if (j < n) {
        score = 0.0f;
        for (int d = 0; d < D; ++d) score += q_s[g * D + d] * k_s[j * (D + 1) + d];
      }
      p_s[i] = score;
    }
    __syncthreads();
    const int warp = tid / 32;
    const int lane = tid % 32;
    for (int g = warp; g < G; g += kWarps) {
      const float v = p_s[g * kTile + lane];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(v));
      const float e = lane < n ? __expf(v - m_new) : 0.0f;
      const float sum = warp_sum(e);
      p_s[g * kTile + lane] = e;
      __syncwarp();
      if (lane == 0) {
        const float alpha = __expf(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxAcc; ++k) {
      const int idx = tid + k * kThreads;
      if (idx < G * D) {
        const int g = idx / D;
        const int d = idx % D;
        float a = acc[k] * alpha_s[g];
        for (int j = 0; j < n; ++j) a += p_s[g * kTile + j] * v_s[j * (D + 1) + d];
        acc[k] = a;
      }
    }
    __syncthreads();
  }

  const int64_t head0 = kvh * G;
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + t * p.num_q_heads * D + head0 * D;
#pragma unroll
    for (int k = 0; k < kMaxAcc; ++k) {
      const int idx = tid + k * kThreads;
      if (idx < G * D) out[idx] = from_f32<T>(acc[k] / l_s[idx / D]);
    }
    return;
  }
  // Partials: (m, l) pairs [T][Hq][splits][2], then accumulators [T][Hq][splits][D].
  const int64_t ml_count = p.num_tokens * p.num_q_heads * p.num_splits;
  float* ml = p.partials;
  float* accs = p.partials + 2 * ml_count;
  for (int g = tid; g < G; g += kThreads) {
    const int64_t r = ((t * p.num_q_heads) + head0 + g) * p.num_splits + split;
    ml[2 * r] = m_s[g];
    ml[2 * r + 1] = l_s[g];
  }
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) {
    const int idx = tid + k * kThreads;
    if (idx < G * D) {
      const int64_t r = ((t * p.num_q_heads) + head0 + idx / D) * p.num_splits + split;
      accs[r * D + idx % D] = acc[k];
    }
  }
}

template <int kBytes> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };

// At least 3 CTAs per SM (at most 168 registers a thread, no spills): the kernel is latency-bound
// and left to itself the compiler takes 196 registers, 2 CTAs per SM. Measured on an H200 at 512
// tokens of context: batch 128 221 -> 166 us per layer, batch 32 61 -> 55, batch 8 27 -> 24; 4 CTAs
// per SM (128 registers, spilling) was faster at 128 (176) but slower at 32 (77) and 8 (32).
template <typename T, int D, int G>
__global__ void __launch_bounds__(128, 3) decode_kernel(AttentionParams p) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  constexpr int kVec = G >= 8 ? 4 : 8;               // elements of head_dim per lane
  using Vec = typename VecOf<kVec * 2>::type;         // 16-bit types only
  constexpr int kLanesPerRow = D / kVec;              // lanes that share one K/V row
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "head_dim / lanes");
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;     // rows a warp reads at once
  constexpr int kWarps = 4;
  constexpr int kTileRows = 64;
  constexpr int kRowsPerWarpTile = kTileRows / kWarps;  // 16
  constexpr int kIters = kRowsPerWarpTile / kRowsPerWarp;
  constexpr float kLog2e = 1.4426950408889634f;

  __shared__ float scores[G][kTileRows];
  __shared__ float alpha_s[G];
  __shared__ float m_s[G];
  __shared__ float l_s[G];
  __shared__ float reduce_s[kWarps][G][D];

  const int s = blockIdx.x;
  const int kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int row_in_warp = lane / kLanesPerRow;
  const int col = (lane % kLanesPerRow) * kVec;
  const int64_t t = p.query_start_loc[s];  // its one query token
  const int ctx = p.seq_lens[s];           // positions [0, ctx)
  const int tiles = (ctx + kTileRows - 1) / kTileRows;
  const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int begin = split * tiles_per_split * kTileRows;
  const int end = min(ctx, begin + tiles_per_split * kTileRows);

  const int64_t stride = (p.num_q_heads + 2 * p.num_kv_heads) * D;
  const T* q = static_cast<const T*>(p.qkv) + t * stride + static_cast<int64_t>(kvh) * G * D + col;
  float qf[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const Vec v = *reinterpret_cast<const Vec*>(q + g * D);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) qf[g][i] = to_f32(e[i]) * p.scale * kLog2e;
  }
  float acc[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.0f;
  }
  if (tid < G) {
    m_s[tid] = -FLT_MAX;
    l_s[tid] = 0.0f;
  }
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t row_stride = p.num_kv_heads * D;  // between slots

  for (int tile = begin; tile < end; tile += kTileRows) {
    int64_t offset[kIters];
    bool valid[kIters];
    Vec kv[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int pos = tile + warp * kRowsPerWarpTile + i * kRowsPerWarp + row_in_warp;
      valid[i] = pos < end;
      const int64_t slot = valid[i] ? static_cast<int64_t>(block_table[pos / p.block_size]) * p.block_size + pos % p.block_size : 0;
      offset[i] = slot * row_stride + static_cast<int64_t>(kvh) * D + col;
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (valid[i]) kv[i] = __ldcs(reinterpret_cast<const Vec*>(k_cache + offset[i]));
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const T* e = reinterpret_cast<const T*>(&kv[i]);
      float kf[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) kf[j] = to_f32(e[j]);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) d += qf[g][j] * kf[j];
#pragma unroll
        for (int o = kLanesPerRow / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffff, d, o);
        if (lane % kLanesPerRow == 0) {
          scores[g][warp * kRowsPerWarpTile + i * kRowsPerWarp + row_in_warp] = valid[i] ? d : -FLT_MAX;
        }
      }
    }
    // V rows of this tile are independent of the softmax: in flight while it runs.
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (valid[i]) kv[i] = __ldcs(reinterpret_cast<const Vec*>(v_cache + offset[i]));
    }
    __syncthreads();
    // Online softmax over the tile, one warp per query head (base 2: q carries log2(e)).
    for (int g = warp; g < G; g += kWarps) {
      const float a = scores[g][lane], b = scores[g][lane + 32];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(a, b)));
      const float ea = a == -FLT_MAX ? 0.0f : exp2f(a - m_new);
      const float eb = b == -FLT_MAX ? 0.0f : exp2f(b - m_new);
      scores[g][lane] = ea;
      scores[g][lane + 32] = eb;
      const float sum = warp_sum(ea + eb);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float alpha = alpha_s[g];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[g][j] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (!valid[i]) continue;
      const T* e = reinterpret_cast<const T*>(&kv[i]);
      float vf[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) vf[j] = to_f32(e[j]);
      const int r = warp * kRowsPerWarpTile + i * kRowsPerWarp + row_in_warp;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pg = scores[g][r];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[g][j] += pg * vf[j];
      }
    }
    __syncthreads();  // scores are rewritten by the next tile
  }

  // Sum each slice over the warp's rows (lanes kLanesPerRow apart), then over the warps.
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float v = acc[g][j];
#pragma unroll
      for (int o = kLanesPerRow; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffff, v, o);
      acc[g][j] = v;
    }
  }
  if (row_in_warp == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) reduce_s[warp][g][col + j] = acc[g][j];
    }
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(kvh) * G;
  const int64_t ml_count = p.num_tokens * p.num_q_heads * p.num_splits;
  for (int idx = tid; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    const float a = reduce_s[0][g][d] + reduce_s[1][g][d] + reduce_s[2][g][d] + reduce_s[3][g][d];
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + t * p.num_q_heads * D + head0 * D;
      out[idx] = from_f32<T>(l_s[g] > 0.0f ? a / l_s[g] : 0.0f);
    } else {
      // Partials in attention_kernel's layout, m in natural-log units as combine_kernel expects.
      const int64_t r = ((t * p.num_q_heads) + head0 + g) * p.num_splits + split;
      p.partials[2 * ml_count + r * D + d] = a;
      if (d == 0) {
        p.partials[2 * r] = m_s[g] == -FLT_MAX ? -FLT_MAX : m_s[g] / kLog2e;
        p.partials[2 * r + 1] = l_s[g];
      }
    }
  }
}

template <typename T>
__global__ void combine_kernel(AttentionParams p) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t D = p.head_dim;
  const int64_t ml_count = p.num_tokens * p.num_q_heads * p.num_splits;
  const int64_t r0 = (t * p.num_q_heads + h) * p.num_splits;
  const float* ml = p.partials + 2 * r0;
  const float* accs = p.partials + 2 * ml_count + r0 * D;
  float m = -FLT_MAX;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, ml[2 * s]);
  float l = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) l += __expf(ml[2 * s] - m) * ml[2 * s + 1];
  T* out = static_cast<T*>(p.out) + (t * p.num_q_heads + h) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < p.num_splits; ++s) a += __expf(ml[2 * s] - m) * accs[s * D + d];
    out[d] = from_f32<T>(a / l);
  }
}

}  // namespace

size_t attention_workspace_bytes(int64_t num_tokens, int64_t num_q_heads, int64_t head_dim, int num_splits) {
  if (num_splits <= 1) return 0;
  return sizeof(float) * static_cast<size_t>(num_tokens * num_q_heads * num_splits * (head_dim + 2));
}

cudaError_t paged_attention(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int64_t g = p.num_q_heads / p.num_kv_heads;
  if (g * p.num_kv_heads != p.num_q_heads || g * p.head_dim > kThreads * kMaxAcc || p.num_splits < 1 ||
      p.head_dim % (dtype == DType::kF32 ? 4 : 8) != 0 ||
      (p.num_splits > 1 && p.partials == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = smem_bytes(g, p.head_dim);
  return dispatch_dtype(dtype, [&]<typename T>() {
    if constexpr (!std::is_same_v<T, float>) {
      // Decode-only steps: the bandwidth kernel, for the shapes it is built for.
      auto decode = [&]() -> void (*)(AttentionParams) {
        if (!p.decode_only) return nullptr;
        if (p.head_dim == 128) {
          switch (g) {
            case 1: return decode_kernel<T, 128, 1>;
            case 2: return decode_kernel<T, 128, 2>;
            case 4: return decode_kernel<T, 128, 4>;
            case 8: return decode_kernel<T, 128, 8>;
            default: return nullptr;
          }
        }
        if (p.head_dim == 64) {
          switch (g) {
            case 1: return decode_kernel<T, 64, 1>;
            case 2: return decode_kernel<T, 64, 2>;
            case 4: return decode_kernel<T, 64, 4>;
            case 8: return decode_kernel<T, 64, 8>;
            default: return nullptr;
          }
        }
        return nullptr;
      }();
      if (decode != nullptr) {
        const dim3 grid(static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.num_kv_heads),
                        static_cast<unsigned>(p.num_splits));
        cudaError_t e = launch_pdl(decode, grid, dim3(128), 0, stream, p);
        if (e == cudaSuccess && p.num_splits > 1) {
          const dim3 cgrid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_q_heads));
          e = launch_pdl(combine_kernel<T>, cgrid, dim3(128), 0, stream, p);
        }
        return e;
      }
    }
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_kv_heads),
                    static_cast<unsigned>(p.num_splits));
    attention_kernel<T><<<grid, kThreads, smem, stream>>>(p);
    if (p.num_splits > 1) {
      const dim3 cgrid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_q_heads));
      combine_kernel<T><<<cgrid, 128, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace shardserve::kernels
