// Paged causal attention: prefill, chunked prefill (cached prefixes) and decode.
//
// 16-bit activations with head_dim 64 or 128 and GQA groups of 1, 2, 4 or 8 (every Llama shape
// we serve) run on tensor cores (namespace tc below: prefill_mma_kernel for any step,
// decode_mma_kernel for decode-only steps). mma.sync, ldmatrix and cp.async are sm_80
// instructions, so the same kernels are the A100 path and run on Hopper. On Hopper (an sm_90a
// build) steps with prompt tokens take prefill_wgmma_kernel instead: warpgroup MMAs from shared
// memory, each warpgroup's softmax overlapping its own P V (H100, 8B layer: 2,048 tokens 213 ->
// 133 us, 8,192 tokens 2,490 -> 1,367 us, 402 TFLOP/s). The decode kernel is bandwidth-bound and
// stays on mma.sync everywhere.
//
// attention_kernel is the CUDA-core fallback for the rest (FP32, other head sizes such as the
// tiny test checkpoints' 32): grid (token, KV head, split), one CTA per token and KV head walking
// its causal context [0, pos] in tiles of 32 positions with an online softmax (FP32).
//
// Decode: too few (token, KV head) pairs fill the GPU, so the context is split over `num_splits`
// CTAs (flash-decoding) whose partial (max, sum, accumulator) are merged by the tensor-core decode
// kernel's last split of each pair when the caller gives it counters (AttentionParams::
// split_counters; at batch 1 and 512 tokens 14.5 -> 8.6 us a layer on an H200), else by
// combine_kernel. The
// split count depends only on the launch shape, not on sequence lengths, so a captured CUDA graph
// stays valid as sequences grow: splits past the end of a context write empty partials.
//
// Measured on an H200 (tests/bench/attention_harness.cu, Llama-3.1-8B layer, BF16), CUDA-core
// kernels -> tensor cores: prefill 2,048 tokens 7,207 -> 223 us (154 TFLOP/s), 8,192 tokens
// 111.9 ms -> 2.67 ms (206 TFLOP/s); decode at 512 tokens of context,
// batch 32 52 -> 24 us, batch 128 154 -> 87 us (0.72 of copy bandwidth for the KV bytes); batch
// 32 at 8,192 tokens 752 -> 297 us (0.85).
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"
#include "kernels/mma.cuh"
#include "kernels/wgmma.cuh"

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

// ---- Tensor-core attention (mma.sync m16n8k16: sm_80 and later) ----------------------------
//
// FlashAttention-2 style, reading K/V from the paged cache. The query rows of a KV head's GQA
// group are packed: row r of a tile is (token r / G, query head r % G), so each K/V tile in shared
// memory serves every query head that shares it. A warp owns 16 rows: S = Q K^T and O += P V run
// on tensor cores (BF16/F16 in, FP32 accumulate), Q stays in registers, P is rounded to the
// activation type for the P.V product (as FlashAttention does; the online softmax and its sums are
// FP32). K/V tiles of 64 positions stream through shared memory with cp.async, in a ring of stages
// so the next tiles are in flight while one is used; rows are XOR-swizzled in 16-byte chunks so
// ldmatrix reads are free of bank conflicts; positions past a context are zero-filled.
//
// prefill_mma_kernel: any step (prefill, chunked prefill with cached prefixes, decodes mixed in).
// Grid (query tile, KV head): a CTA takes 16 * kWarps rows of one sequence, its warps share each
// tile, and the causal mask is applied only on tiles that cross a row's position. Tiles are handed
// out heaviest first (the last tiles of a sequence see the longest contexts).
//
// decode_mma_kernel: decode-only steps. Grid (sequence, KV head, split): the G
// rows of the one token fill part of one 16-row fragment, so the warps split each tile's positions
// instead (16 each) with their own online softmax, merged through shared memory at the end; the
// rows past G cost tensor-core slots the memory-bound kernel has to spare.
namespace tc {

using namespace mma;

constexpr int kTileN = 64;  // K/V positions per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;

// Which rows of a tile load_kv_tile copies: all of them, all but position `held`, or only `held`
// (a decode step's newest position, written by the kernel just before: see decode_mma_kernel).
enum class KvRows { kAll, kAllButHeld, kOnlyHeld };

// Chunk c of row r of a [kRows][D] tile: the mma.sync kernels' swizzle, or (kWg) wgmma's 128-byte one.
template <int D, int kRows, bool kWg>
__device__ __forceinline__ uint32_t tile_offset(int r, int c) {
  if constexpr (kWg) {
    return wgmma::swizzle128<kRows>(r, c);
  } else {
    return swizzle<D>(r, c);
  }
}

// Positions [start, start + kN) of one KV head into K and V tiles (zero past `end`), laid out by
// tile_offset. The page of a position is a shift for the power-of-two block sizes every cache uses
// (a division otherwise): a thread looks up 8 positions a tile.
template <typename T, int D, int kThreads, KvRows kRows = KvRows::kAll, int kN = kTileN, bool kWg = false>
__device__ __forceinline__ void load_kv_tile(uint32_t k_dst, uint32_t v_dst, const AttentionParams& p,
                                             const int32_t* block_table, int kvh, int start, int end, int tid,
                                             int held = -1) {
  constexpr int kChunks = D / 8;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t row_stride = p.num_kv_heads * D;
  const int block_size = static_cast<int>(p.block_size);
  const bool pow2 = (block_size & (block_size - 1)) == 0;
  const int shift = __ffs(block_size) - 1;
  constexpr int kTotal = kN * kChunks;
#pragma unroll
  for (int k = 0; k < (kTotal + kThreads - 1) / kThreads; ++k) {
    const int i = tid + k * kThreads;
    if (kTotal % kThreads != 0 && i >= kTotal) break;
    const int r = i / kChunks, c = i % kChunks;
    const int pos = start + r;
    if constexpr (kRows == KvRows::kAllButHeld) {
      if (pos == held) continue;
    } else if constexpr (kRows == KvRows::kOnlyHeld) {
      if (pos != held) continue;
    }
    const bool valid = pos < end;
    int64_t off = 0;
    if (valid) {
      const int page = pow2 ? pos >> shift : pos / block_size;
      const int in_page = pow2 ? pos & (block_size - 1) : pos % block_size;
      const int64_t slot = static_cast<int64_t>(block_table[page]) * block_size + in_page;
      off = slot * row_stride + static_cast<int64_t>(kvh) * D + c * 8;
    }
    const uint32_t o = tile_offset<D, kN, kWg>(r, c);
    cp_async16(k_dst + o, k_cache + off, valid);
    cp_async16(v_dst + o, v_cache + off, valid);
  }
}

// S[16 x 16 * kNB2] = Q K^T for one warp's 16 rows against tile rows [n0, n0 + 16 * kNB2).
template <typename T, int D, int kNB2>
__device__ __forceinline__ void qk(float (&s)[2 * kNB2][4], const uint32_t (&qf)[D / 16][4], uint32_t k_tile, int n0,
                                   int lane) {
#pragma unroll
  for (int j = 0; j < 2 * kNB2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  const int mi = lane / 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nb = 0; nb < kNB2; ++nb) {
      uint32_t b[4];
      ldmatrix_x4(b, k_tile + swizzle<D>(n0 + nb * 16 + (mi >> 1) * 8 + (lane & 7), 2 * kk + (mi & 1)));
      mma_16816<T>(s[2 * nb], qf[kk], b[0], b[1]);
      mma_16816<T>(s[2 * nb + 1], qf[kk], b[2], b[3]);
    }
  }
}

// 2^x in one MUFU instruction (exp2f adds a range fix-up around it): -inf gives 0, and the
// arguments here are <= 0, where flushing subnormal results to zero changes nothing measurable.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax update of a warp's two rows per thread (rows lane/4 and lane/4 + 8; the four lanes
// of a quad share a row) with raw scores s (masked to -inf) and `scale` the softmax scale in log2
// units: the maxima m are kept scaled, each p = 2^(s * scale - m) is one FFMA and one MUFU;
// returns p in s and in alpha the factors the rows' accumulators must be rescaled by.
template <int kNB>
__device__ __forceinline__ void softmax_scores(float (&s)[kNB][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               float scale) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kNB; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float m_new = fmaxf(m[h], mx * scale);
    const float base = m_new == -INFINITY ? 0.0f : m_new;  // every score so far masked
    alpha[h] = exp2_approx(m[h] - base);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kNB; ++j) {
      s[j][2 * h] = exp2_approx(fmaf(s[j][2 * h], scale, -base));
      s[j][2 * h + 1] = exp2_approx(fmaf(s[j][2 * h + 1], scale, -base));
      sum += s[j][2 * h] + s[j][2 * h + 1];
    }
    l[h] = l[h] * alpha[h] + sum;  // this thread's columns only: the quad is summed at the end
    m[h] = m_new;
  }
}
template <int D>
__device__ __forceinline__ void rescale(float (&acc)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    acc[j][0] *= alpha[0];
    acc[j][1] *= alpha[0];
    acc[j][2] *= alpha[1];
    acc[j][3] *= alpha[1];
  }
}
template <int kNB, int D>
__device__ __forceinline__ void softmax_update(float (&s)[kNB][4], float (&m)[2], float (&l)[2], float (&acc)[D / 8][4],
                                               float scale) {
  float alpha[2];
  softmax_scores<kNB>(s, m, l, alpha, scale);
  rescale<D>(acc, alpha);
}

// Both kernels' shared memory: `rows` query rows [rows][D], then a ring of `stages` K/V tile pairs
// ([kTileN][D] each).
constexpr size_t tc_smem_bytes(int rows, int d, int stages) {
  return size_t{2} * d * (static_cast<size_t>(rows) + size_t{2} * stages * kTileN);
}
// K of the ring stage that holds tile `tile` (V follows it).
template <int D, int kStages>
__device__ __forceinline__ uint32_t kv_stage(uint32_t kv_s, int tile) {
  return kv_s + (tile % kStages) * 2 * (kTileN * D * 2);
}

// Issues tile `tile` of a CTA's keys (positions first + tile * kTileN ..., zero past `end`) into
// its ring stage when there is such a tile, and commits a cp.async group either way (the waits
// count groups).
template <typename T, int D, int kThreads, int kStages, KvRows kRows = KvRows::kAll>
__device__ __forceinline__ void issue_kv_tile(uint32_t kv_s, int tile, int n_tiles, const AttentionParams& p,
                                              const int32_t* block_table, int kvh, int first, int end, int tid,
                                              int held = -1) {
  if (tile < n_tiles) {
    const uint32_t k_dst = kv_stage<D, kStages>(kv_s, tile);
    load_kv_tile<T, D, kThreads, kRows>(k_dst, k_dst + kTileN * D * 2, p, block_table, kvh, first + tile * kTileN, end,
                                        tid, held);
  }
  cp_async_commit();
}

// kRows query rows into shared memory: row r is token token0 + r / G (zero-filled from n_tok
// tokens on), query head kvh * G + r % G; the G heads of a KV head's group are packed side by side.
template <typename T, int D, int G, int kRows, int kThreads, bool kWg = false>
__device__ __forceinline__ void load_q_rows(uint32_t q_s, const AttentionParams& p, int64_t token0, int n_tok, int kvh,
                                            int tid) {
  const int64_t stride = (p.num_q_heads + 2 * p.num_kv_heads) * D;
  const T* qkv = static_cast<const T*>(p.qkv);
#pragma unroll
  for (int k = 0; k < kRows * (D / 8) / kThreads; ++k) {
    const int i = tid + k * kThreads;
    const int r = i / (D / 8), c = i % (D / 8);
    const bool valid = r / G < n_tok;
    const int64_t off = valid ? (token0 + r / G) * stride + static_cast<int64_t>(kvh * G + r % G) * D + c * 8 : 0;
    cp_async16(q_s + tile_offset<D, kRows, kWg>(r, c), qkv + off, valid);
  }
}

// Fused RoPE: chunk pair (c, c + D / 16) of the head at x (elements 8c.. and D/2 + 8c..) rotated
// at the cos/sin row cs.
template <typename T, int D>
__device__ __forceinline__ void rope_chunk_pair(const T* x, const float* cs, int c, Pack<T, 8>& r1, Pack<T, 8>& r2) {
  using V = Pack<T, 8>;
  using F = Pack<float, 8>;
  const V a = *reinterpret_cast<const V*>(x + 8 * c), b = *reinterpret_cast<const V*>(x + D / 2 + 8 * c);
  const F co = *reinterpret_cast<const F*>(cs + 8 * c), sn = *reinterpret_cast<const F*>(cs + D / 2 + 8 * c);
  rope_rotate<T, 8>(a, b, co, sn, r1, r2);
}

// Fused RoPE (AttentionParams::rope_cos_sin): the one token's G query heads rotated into shared
// memory rows 0..G-1 (rows G..15 zero), with plain loads and stores (the caller's barrier orders
// them). Thread i < G * D / 16 takes row i / (D / 16)'s chunk pair (c, c + D / 16).
template <typename T, int D, int G, int kThreads>
__device__ __forceinline__ void rope_q_rows(uint8_t* q_smem, const AttentionParams& p, int64_t t, int kvh, int tid) {
  using V = Pack<T, 8>;
  constexpr int kPairs = D / 16;  // chunk pairs per head
  const int64_t stride = (p.num_q_heads + 2 * p.num_kv_heads) * D;
  const float* cs = p.rope_cos_sin + static_cast<int64_t>(p.rope_positions[t]) * D;
  for (int i = tid; i < 16 * kPairs; i += kThreads) {
    const int r = i / kPairs, c = i % kPairs;
    V r1{}, r2{};
    if (r < G) {
      const T* x = static_cast<const T*>(p.qkv) + t * stride + static_cast<int64_t>(kvh * G + r) * D;
      rope_chunk_pair<T, D>(x, cs, c, r1, r2);
    }
    *reinterpret_cast<V*>(q_smem + swizzle<D>(r, c)) = r1;
    *reinterpret_cast<V*>(q_smem + swizzle<D>(r, c + kPairs)) = r2;
  }
}

// Fused RoPE: the newest token's K (rotated) and V of KV head kvh, chunk pair (c, c + D / 16) per
// thread: threads 0 .. D/16 - 1 take K, the next D/16 take V (c = tid - D/16). Written to the
// caches at the token's slot (unless < 0) and returned for the shared-memory tile.
template <typename T, int D>
__device__ __forceinline__ void rope_newest_kv(const AttentionParams& p, int64_t t, int kvh, int tid, uint4& lo,
                                               uint4& hi) {
  using V = Pack<T, 8>;
  constexpr int kPairs = D / 16;
  if (tid >= 2 * kPairs) return;
  const bool is_v = tid >= kPairs;
  const int c = tid % kPairs;
  const int64_t stride = (p.num_q_heads + 2 * p.num_kv_heads) * D;
  const T* x = static_cast<const T*>(p.qkv) + t * stride + (p.num_q_heads + (is_v ? p.num_kv_heads : 0) + kvh) * D;
  V a, b;
  if (is_v) {
    a = *reinterpret_cast<const V*>(x + 8 * c);
    b = *reinterpret_cast<const V*>(x + D / 2 + 8 * c);
  } else {
    rope_chunk_pair<T, D>(x, p.rope_cos_sin + static_cast<int64_t>(p.rope_positions[t]) * D, c, a, b);
  }
  const int64_t slot = p.rope_slots[t];
  if (slot >= 0) {
    // The caches are the kernel's inputs otherwise (const in AttentionParams); this row is its output.
    T* cache = static_cast<T*>(const_cast<void*>(is_v ? p.v_cache : p.k_cache)) + (slot * p.num_kv_heads + kvh) * D;
    *reinterpret_cast<V*>(cache + 8 * c) = a;
    *reinterpret_cast<V*>(cache + D / 2 + 8 * c) = b;
  }
  memcpy(&lo, &a, 16);
  memcpy(&hi, &b, 16);
}

// A warp's 16 query rows from row0 as mma A fragments, one per 16 columns of head_dim.
template <int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[D / 16][4], uint32_t q_s, int row0, int lane) {
  const int mi = lane / 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], q_s + swizzle<D>(row0 + (mi & 1) * 8 + (lane & 7), 2 * kk + (mi >> 1)));
  }
}

// The prefill kernels' output: row lane / 4 + 8h of a warp's 16-row fragment (tile row r, so
// token token0 + r / G, query head kvh * G + r % G) normalised by its softmax sum, from the
// accumulators acc (mma.sync's m16n8 layout) and this thread's partial sum l (the quad's four are
// added here: every lane calls, rows past the tile's tokens (qp < 0) store nothing). The token
// index is summed in 32 bits (a batch's tokens are an int), as the kernels did before sharing it.
template <typename T, int D, int G>
__device__ __forceinline__ void store_row(const AttentionParams& p, const float (&acc)[D / 8][4], float l, int qp, int h,
                                          int r, int token0, int kvh, int lane) {
  l += __shfl_xor_sync(0xffffffff, l, 1);
  l += __shfl_xor_sync(0xffffffff, l, 2);
  if (qp < 0) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  T* o = static_cast<T*>(p.out) + static_cast<int64_t>(token0 + r / G) * p.num_q_heads * D +
         static_cast<int64_t>(kvh * G + r % G) * D + (lane % 4) * 2;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    *reinterpret_cast<uint32_t*>(o + j * 8) = pack2<T>(acc[j][2 * h] * inv, acc[j][2 * h + 1] * inv);
  }
}

// Finds this CTA's (sequence, tile of the sequence's queries) for tiles of kTokens tokens, handed
// out heaviest first. Warp 0 scans the sequences 32 at a time. Returns false for surplus CTAs
// (the grid is an upper bound).
template <int kTokens>
__device__ __forceinline__ bool find_query_tile(const AttentionParams& p, int& seq, int& tile) {
  __shared__ int found[2];
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 32) {
    const int want = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
    int base = 0, fs = -1, ft = 0;
    for (int s0 = 0; s0 < p.num_seqs; s0 += 32) {
      const int s = s0 + lane;
      const int n = s < p.num_seqs ? (p.query_start_loc[s + 1] - p.query_start_loc[s] + kTokens - 1) / kTokens : 0;
      int incl = n;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffff, incl, o);
        if (lane >= o) incl += v;
      }
      const int excl = incl - n;
      const unsigned hit = __ballot_sync(0xffffffff, want >= base + excl && want < base + incl);
      if (hit != 0) {
        const int src = __ffs(hit) - 1;
        fs = s0 + src;
        ft = want - base - __shfl_sync(0xffffffff, excl, src);
        break;
      }
      base += __shfl_sync(0xffffffff, incl, 31);
    }
    if (lane == 0) {
      found[0] = fs;
      found[1] = ft;
    }
  }
  __syncthreads();
  seq = found[0];
  tile = found[1];
  return seq >= 0;
}

// S[kMW][16 x 16 * kNB2] = Q K^T for a warp's kMW tiles of 16 query rows (from q_row0 of the Q
// tile) against K tile rows [n0, n0 + 16 * kNB2): each K fragment serves all kMW row tiles, the
// Q fragments are read from shared memory as they are needed (registers go to the accumulators).
template <typename T, int D, int kMW, int kNB2>
__device__ __forceinline__ void qk_rows(float (&s)[kMW][2 * kNB2][4], uint32_t q_s, int q_row0, uint32_t k_tile,
                                        int n0, int lane) {
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int j = 0; j < 2 * kNB2; ++j) s[mw][j][0] = s[mw][j][1] = s[mw][j][2] = s[mw][j][3] = 0.0f;
  }
  const int mi = lane / 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[kMW][4];
#pragma unroll
    for (int mw = 0; mw < kMW; ++mw) {
      ldmatrix_x4(a[mw], q_s + swizzle<D>(q_row0 + mw * 16 + (mi & 1) * 8 + (lane & 7), 2 * kk + (mi >> 1)));
    }
#pragma unroll
    for (int nb = 0; nb < kNB2; ++nb) {
      uint32_t b[4];
      ldmatrix_x4(b, k_tile + swizzle<D>(n0 + nb * 16 + (mi >> 1) * 8 + (lane & 7), 2 * kk + (mi & 1)));
#pragma unroll
      for (int mw = 0; mw < kMW; ++mw) {
        mma_16816<T>(s[mw][2 * nb], a[mw], b[0], b[1]);
        mma_16816<T>(s[mw][2 * nb + 1], a[mw], b[2], b[3]);
      }
    }
  }
}

// acc[kMW][16 x D] += P V for the kMW row tiles' P in S's registers (16 * kNB2 positions from n0
// of the V tile); each V fragment serves all kMW row tiles.
template <typename T, int D, int kMW, int kNB2>
__device__ __forceinline__ void pv_rows(float (&acc)[kMW][D / 8][4], const float (&s)[kMW][2 * kNB2][4],
                                        uint32_t v_tile, int n0, int lane) {
  const int mi = lane / 8;
#pragma unroll
  for (int kk = 0; kk < kNB2; ++kk) {
    uint32_t a[kMW][4];
#pragma unroll
    for (int mw = 0; mw < kMW; ++mw) {
      a[mw][0] = pack2<T>(s[mw][2 * kk][0], s[mw][2 * kk][1]);
      a[mw][1] = pack2<T>(s[mw][2 * kk][2], s[mw][2 * kk][3]);
      a[mw][2] = pack2<T>(s[mw][2 * kk + 1][0], s[mw][2 * kk + 1][1]);
      a[mw][3] = pack2<T>(s[mw][2 * kk + 1][2], s[mw][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + swizzle<D>(n0 + kk * 16 + (mi & 1) * 8 + (lane & 7), 2 * dn + (mi >> 1)));
#pragma unroll
      for (int mw = 0; mw < kMW; ++mw) {
        mma_16816<T>(acc[mw][2 * dn], a[mw], b[0], b[1]);
        mma_16816<T>(acc[mw][2 * dn + 1], a[mw], b[2], b[3]);
      }
    }
  }
}

// kWarps warps of kMW tiles of 16 query rows each (a CTA's Q tile: 16 * kMW * kWarps rows, G
// heads per token); each K/V tile of kTileN positions is taken kSubN positions at a time (one
// online-softmax step). With kMW = 1 a warp keeps its Q fragments in registers; with kMW = 2 the
// K/V fragments it reads from shared memory serve twice the rows (half the shared-memory traffic
// per FLOP) and the Q fragments are re-read instead. Measured on an H200 (attention harness, 8B
// layer): 8 warps x 2 tiles 2,655 -> 2,292 us at 8,192 tokens but 224 -> 245 us at 2,048 (half
// the CTAs, 1.9 waves; it spills ~240 bytes), 4 warps x 2 tiles slower at both, so the backend
// launches kMW = 1. Nsight Compute at 2,048 tokens (kMW = 1): 8 warps an SM (255 registers),
// issue slots 33% busy, tensor pipe 30% active: latency-bound.
template <typename T, int D, int G, int kWarps, int kStages, int kMW = 1, int kSubN = kTileN>
__global__ void __launch_bounds__(kWarps * 32) prefill_mma_kernel(AttentionParams p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kWarpRows = 16 * kMW;
  constexpr int kRows = kWarpRows * kWarps;
  constexpr int kTokens = kRows / G;
  static_assert(16 % G == 0, "a warp's 16 rows hold whole tokens");
  static_assert(kTileN % kSubN == 0 && kSubN % 16 == 0, "whole sub-tiles of 16 positions");
  extern __shared__ __align__(128) uint8_t smem[];

  int s, tile;
  if (!find_query_tile<kTokens>(p, s, tile)) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kvh = blockIdx.y;
  const int q0 = p.query_start_loc[s];
  const int q_len = p.query_start_loc[s + 1] - q0;
  const int first = tile * kTokens;                  // the tile's first query token, within the sequence
  const int n_tok = min(kTokens, q_len - first);
  const int ctx0 = p.seq_lens[s] - q_len;            // position of the sequence's query token 0
  const int kv_end = ctx0 + first + n_tok;           // keys [0, kv_end) are seen by some row
  const int n_tiles = (kv_end + kTileN - 1) / kTileN;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks;

  const uint32_t q_s = smem_addr(smem);
  const uint32_t kv_s = q_s + kRows * D * 2;
  load_q_rows<T, D, G, kRows, kThreads>(q_s, p, q0 + first, n_tok, kvh, tid);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    issue_kv_tile<T, D, kThreads, kStages>(kv_s, st, n_tiles, p, block_table, kvh, 0, kv_end, tid);
  }

  // This thread's rows: warp * kWarpRows + mw * 16 + lane / 4 (+ 8); -1 marks rows past the
  // tile's tokens.
  const int warp_row0 = warp * kWarpRows;
  int qp[kMW][2];
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + mw * 16 + lane / 4 + 8 * h;
      qp[mw][h] = r / G < n_tok ? ctx0 + first + r / G : -1;
    }
  }
  const bool warp_active = warp_row0 / G < n_tok;
  const int warp_first_qp = ctx0 + first + warp_row0 / G;
  const int warp_last_qp = ctx0 + first + min(n_tok - 1, (warp_row0 + kWarpRows - 1) / G);
  const float scale = p.scale * kLog2e;

  uint32_t qf[kMW == 1 ? D / 16 : 1][4];  // kMW = 1: the warp's Q fragments, held
  float acc[kMW][D / 8][4];
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[mw][j][0] = acc[mw][j][1] = acc[mw][j][2] = acc[mw][j][3] = 0.0f;
  }
  float m[kMW][2], l[kMW][2];
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) m[mw][0] = m[mw][1] = -INFINITY, l[mw][0] = l[mw][1] = 0.0f;

  for (int it = 0; it < n_tiles; ++it) {
    issue_kv_tile<T, D, kThreads, kStages>(kv_s, it + kStages - 1, n_tiles, p, block_table, kvh, 0, kv_end, tid);
    cp_async_wait<kStages - 1>();
    __syncthreads();
    if constexpr (kMW == 1) {
      if (it == 0) load_q_fragments<D>(qf, q_s, warp_row0, lane);
    }
    const uint32_t k_tile = kv_stage<D, kStages>(kv_s, it);
#pragma unroll
    for (int n0 = 0; n0 < kTileN; n0 += kSubN) {
      const int start = it * kTileN + n0;
      if (warp_active && start <= warp_last_qp) {
        float sc[kMW][kSubN / 8][4];
        if constexpr (kMW == 1) {
          qk<T, D, kSubN / 16>(sc[0], qf, k_tile, n0, lane);
        } else {
          qk_rows<T, D, kMW, kSubN / 16>(sc, q_s, warp_row0, k_tile, n0, lane);
        }
        const bool mask = start + kSubN - 1 > warp_first_qp;
#pragma unroll
        for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
          for (int j = 0; j < kSubN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (mask && start + j * 8 + (lane % 4) * 2 + (e & 1) > qp[mw][e / 2]) sc[mw][j][e] = -INFINITY;
            }
          }
          softmax_update<kSubN / 8, D>(sc[mw], m[mw], l[mw], acc[mw], scale);
        }
        pv_rows<T, D, kMW, kSubN / 16>(acc, sc, k_tile + kTileN * D * 2, n0, lane);
      }
    }
    __syncthreads();  // the stage just read is the next iteration's load target
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      store_row<T, D, G>(p, acc[mw], l[mw][h], qp[mw][h], h, warp_row0 + mw * 16 + lane / 4 + 8 * h, q0 + first, kvh,
                         lane);
    }
  }
}

template <typename T, int D, int G, int kStages, int kMinBlocks = 1>
__global__ void __launch_bounds__(128, kMinBlocks) decode_mma_kernel(AttentionParams p) {
  pdl_trigger();
  // Without kv_before_wait every input is another kernel's output; with it, the step's metadata
  // and all but the newest position of each context are read before the wait (see AttentionParams).
  const bool early = p.kv_before_wait;
  // RoPE and the cache store of the newest position done here (AttentionParams::rope_cos_sin).
  const bool fused = p.rope_cos_sin != nullptr;
  if (!early) pdl_wait();
  constexpr int kWarps = 4;
  constexpr int kThreads = kWarps * 32;
  static_assert(G <= 8, "one row per quad in the merge");
  extern __shared__ __align__(128) uint8_t smem[];

  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t t = p.query_start_loc[s];
  const int ctx = p.seq_lens[s];
  const int tiles = (ctx + kTileN - 1) / kTileN;
  const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int begin = split * tiles_per_split * kTileN;
  const int end = min(ctx, begin + tiles_per_split * kTileN);
  const int n_tiles = end > begin ? (end - begin + kTileN - 1) / kTileN : 0;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks;
  // The newest position: the kernel before writes it (early), or this one computes it (fused), so
  // tiles that hold it leave its row alone then (rather than zero-fill it to be overwritten: two
  // writes to one shared address by different copies are not ordered).
  const int held = ctx - 1;
  const int held_tile = held >= begin && held < end ? (held - begin) / kTileN : -1;
  const uint32_t q_s = smem_addr(smem);
  const uint32_t kv_s = q_s + 16 * D * 2;
  auto issue = [&](int tile, bool skip_held) {
    if (skip_held) {
      issue_kv_tile<T, D, kThreads, kStages, KvRows::kAllButHeld>(kv_s, tile, n_tiles, p, block_table, kvh, begin, end,
                                                                  tid, held);
    } else {
      issue_kv_tile<T, D, kThreads, kStages>(kv_s, tile, n_tiles, p, block_table, kvh, begin, end, tid);
    }
  };

  if (early) {
    // The first tiles before the wait, then the query (and, unfused, the newest row if it is in
    // those tiles) as one more group after it: the loop's first wait takes them all.
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) issue(st, true);
    pdl_wait();
  }
  uint4 newest_lo = make_uint4(0, 0, 0, 0), newest_hi = newest_lo;  // fused: this thread's part of its row
  if (fused) {
    rope_q_rows<T, D, G, kThreads>(smem, p, t, kvh, tid);  // plain stores: the loop's barrier orders them
    if (held_tile >= 0) rope_newest_kv<T, D>(p, t, kvh, tid, newest_lo, newest_hi);
  } else {
    load_q_rows<T, D, G, 16, kThreads>(q_s, p, t, 1, kvh, tid);  // the one token's G heads, rows G..15 zero
  }
  if (early) {
    if (!fused && held_tile >= 0 && held_tile < kStages - 1) {
      const uint32_t k_dst = kv_stage<D, kStages>(kv_s, held_tile);
      load_kv_tile<T, D, kThreads, KvRows::kOnlyHeld>(k_dst, k_dst + kTileN * D * 2, p, block_table, kvh,
                                                      begin + held_tile * kTileN, end, tid, held);
    }
    cp_async_commit();
  } else {
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) issue(st, fused);
  }

  const float scale = p.scale * kLog2e;
  uint32_t qf[D / 16][4];
  float acc[1][D / 8][4];  // one 16-row tile (pv_rows)
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[0][j][0] = acc[0][j][1] = acc[0][j][2] = acc[0][j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int it = 0; it < n_tiles; ++it) {
    issue(it + kStages - 1, fused);
    if (early && it == 0) {
      cp_async_wait<1>();  // the first kStages - 1 tiles and the query's group: all but the newest tile
    } else {
      cp_async_wait<kStages - 1>();
    }
    __syncthreads();
    if (fused && it == held_tile) {
      // The newest row into the tile it was left out of, then a barrier before anyone reads it.
      constexpr int kPairs = D / 16;
      if (tid < 2 * kPairs) {
        const uint32_t dst = kv_stage<D, kStages>(kv_s, it) + (tid < kPairs ? 0 : kTileN * D * 2);
        const int r = held - (begin + it * kTileN), c = tid % kPairs;
        *reinterpret_cast<uint4*>(smem + (dst - q_s) + swizzle<D>(r, c)) = newest_lo;
        *reinterpret_cast<uint4*>(smem + (dst - q_s) + swizzle<D>(r, c + kPairs)) = newest_hi;
      }
      __syncthreads();
    }
    if (it == 0) load_q_fragments<D>(qf, q_s, 0, lane);
    const int start = begin + it * kTileN + warp * 16;  // this warp's 16 positions
    if (start < end) {
      const uint32_t k_tile = kv_stage<D, kStages>(kv_s, it);
      float sc[1][2][4];
      qk<T, D, 1>(sc[0], qf, k_tile, warp * 16, lane);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (start + j * 8 + (lane % 4) * 2 + (e & 1) >= end) sc[0][j][e] = -INFINITY;
        }
      }
      softmax_update<2, D>(sc[0], m, l, acc[0], scale);
      pv_rows<T, D, 1, 1>(acc, sc, k_tile + kTileN * D * 2, warp * 16, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps: row g (< G) of warp w is held by lanes 4g..4g+3 (first row of the pair).
  float* m_w = reinterpret_cast<float*>(smem);   // [kWarps][G]
  float* l_w = m_w + kWarps * G;                 // [kWarps][G]
  float* o_w = l_w + kWarps * G;                 // [kWarps][G][D]
  float sum = l[0];
  sum += __shfl_xor_sync(0xffffffff, sum, 1);
  sum += __shfl_xor_sync(0xffffffff, sum, 2);
  const int g = lane / 4;
  if (g < G) {
    if (lane % 4 == 0) {
      m_w[warp * G + g] = m[0];
      l_w[warp * G + g] = sum;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      float* o = o_w + (warp * G + g) * D + j * 8 + (lane % 4) * 2;
      o[0] = acc[0][j][0];
      o[1] = acc[0][j][1];
    }
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(kvh) * G;
  const int64_t ml_count = p.num_tokens * p.num_q_heads * p.num_splits;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int gg = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_w[w * G + gg]);
    const float base = mx == -INFINITY ? 0.0f : mx;
    float a = 0.0f, lsum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(m_w[w * G + gg] - base);
      a += f * o_w[(w * G + gg) * D + d];
      lsum += f * l_w[w * G + gg];
    }
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + t * p.num_q_heads * D + head0 * D;
      out[idx] = from_f32<T>(lsum > 0.0f ? a / lsum : 0.0f);
    } else {
      // Partials in attention_kernel's layout, m in natural-log units as combine_kernel expects.
      const int64_t r = ((t * p.num_q_heads) + head0 + gg) * p.num_splits + split;
      p.partials[2 * ml_count + r * D + d] = a;
      if (d == 0) {
        p.partials[2 * r] = mx == -INFINITY ? -FLT_MAX : mx / kLog2e;
        p.partials[2 * r + 1] = lsum;
      }
    }
  }
  if (p.num_splits == 1 || p.split_counters == nullptr) return;

  // The last split of this (sequence, KV head) to finish merges them all (combine_kernel's sums);
  // past the handshake's barrier m_w .. o_w are free again.
  int* last = reinterpret_cast<int*>(o_w + kWarps * G * D);
  float* weight = reinterpret_cast<float*>(last + 1);  // [G][32]: exp(m_s - max) / sum
  if (!last_split_to_arrive(p.split_counters + static_cast<int64_t>(s) * p.num_kv_heads + kvh, p.num_splits, last)) {
    return;
  }
  const int S = p.num_splits;  // <= 32: one lane per split
  // Splits past the end of the context wrote empty partials: only the first `used` are read.
  const int used = min(S, (tiles + tiles_per_split - 1) / tiles_per_split);
  for (int gg = warp; gg < G; gg += kWarps) {
    const int64_t r = ((t * p.num_q_heads) + head0 + gg) * S + lane;
    const float ms = lane < used ? __ldcg(p.partials + 2 * r) : -FLT_MAX;
    const float ls = lane < used ? __ldcg(p.partials + 2 * r + 1) : 0.0f;
    const float mx = warp_max(ms);
    const float e = lane < used ? __expf(ms - mx) : 0.0f;
    const float total = warp_sum(e * ls);
    weight[gg * 32 + lane] = total > 0.0f ? e / total : 0.0f;
  }
  __syncthreads();
  // Four outputs a thread, each split's four accumulators one 16-byte load, all of a split's loads
  // in flight together (the merge is a chain of L2 round trips otherwise).
  T* out = static_cast<T*>(p.out) + t * p.num_q_heads * D + head0 * D;
  const float* acc0 = p.partials + 2 * ml_count + ((t * p.num_q_heads) + head0) * S * D;  // [G][S][D]
  if (aligned(acc0, 16)) {
    for (int base = tid * 4; base < G * D; base += kThreads * 4) {
      const int gg = base / D, d = base % D;
      const float4* src = reinterpret_cast<const float4*>(acc0 + static_cast<int64_t>(gg) * S * D + d);
      float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
      for (int sp = 0; sp < used; ++sp) {
        const float4 v = __ldcg(src + sp * (D / 4));
        const float w = weight[gg * 32 + sp];
        a.x += w * v.x;
        a.y += w * v.y;
        a.z += w * v.z;
        a.w += w * v.w;
      }
      out[base] = from_f32<T>(a.x);
      out[base + 1] = from_f32<T>(a.y);
      out[base + 2] = from_f32<T>(a.z);
      out[base + 3] = from_f32<T>(a.w);
    }
  } else {
    for (int idx = tid; idx < G * D; idx += kThreads) {
      const int gg = idx / D, d = idx % D;
      const float* acc_s = acc0 + static_cast<int64_t>(gg) * S * D + d;
      float a = 0.0f;
#pragma unroll 8
      for (int sp = 0; sp < used; ++sp) a += weight[gg * 32 + sp] * __ldcg(acc_s + static_cast<int64_t>(sp) * D);
      out[idx] = from_f32<T>(a);
    }
  }
}

// prefill_wgmma_kernel: prefill_mma_kernel's job on Hopper's warpgroup MMA (sm_90a). A CTA of kWG
// warpgroups takes 64 * kWG rows (G heads per token, as above), 64 a warpgroup. Q and a ring of
// kStages K/V tiles of kN positions sit in shared memory in wgmma's 128-byte swizzled layout
// (cp.async, all threads loading, kStages - 2 tiles ahead: a tile's V is still read while the next
// tile's K is). S = Q K^T is one warpgroup MMA per 16 of head_dim with both operands in shared
// memory; O += P V takes P from S's registers (mma.sync's layout) as 16-bit A fragments and V as
// an N-major B. A warpgroup's MMAs run while it does other work: each iteration issues tile it's
// Q K^T and tile it-1's P V, then computes tile it's softmax while the P V still runs, and
// rescales O once it is done. The causal mask is applied only on tiles that cross a warpgroup's
// first row.
template <int D, int kWG, int kN, int kStages>
constexpr size_t wg_smem_bytes() {
  return 1024 + size_t{2} * D * (64 * kWG + size_t{2} * kStages * kN);  // + 1 KB to align
}

template <typename T, int D, int G, int kWG, int kN, int kStages, int kMinBlocks, bool kLazyRescale = false>
__global__ void __launch_bounds__(kWG * 128, kMinBlocks) prefill_wgmma_kernel(AttentionParams p) {
#if SHARDSERVE_WGMMA
  constexpr int kThreads = kWG * 128;
  constexpr int kRows = 64 * kWG;
  constexpr int kTokens = kRows / G;
  constexpr uint32_t kKvBytes = kN * D * 2;
  static_assert(64 % G == 0 && kN % 16 == 0 && kStages >= 3, "whole tokens a warpgroup; a tile ahead at least");
  extern __shared__ __align__(128) uint8_t smem[];

  int s, tile;
  if (!find_query_tile<kTokens>(p, s, tile)) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  const int kvh = blockIdx.y;
  const int q0 = p.query_start_loc[s];
  const int q_len = p.query_start_loc[s + 1] - q0;
  const int first = tile * kTokens;
  const int n_tok = min(kTokens, q_len - first);
  const int ctx0 = p.seq_lens[s] - q_len;
  const int kv_end = ctx0 + first + n_tok;
  const int n_tiles = (kv_end + kN - 1) / kN;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks;

  const uint32_t q_s = (smem_addr(smem) + 1023) & ~1023u;  // the swizzle atoms are 1 KB-aligned
  const uint32_t kv_s = q_s + kRows * D * 2;
  auto k_stage = [&](int t) { return kv_s + (t % kStages) * 2 * kKvBytes; };
  load_q_rows<T, D, G, kRows, kThreads, true>(q_s, p, q0 + first, n_tok, kvh, tid);
  auto issue = [&](int t) {
    if (t < n_tiles) {
      load_kv_tile<T, D, kThreads, KvRows::kAll, kN, true>(k_stage(t), k_stage(t) + kKvBytes, p, block_table, kvh,
                                                            t * kN, kv_end, tid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int st = 0; st < kStages - 2; ++st) issue(st);

  // This thread's rows: warp * 16 + lane / 4 (+ 8), -1 past the tile's tokens; the warpgroup's
  // first and last positions decide which tiles it takes (a prefix of them) and which it masks,
  // uniformly over the warpgroup (its four warps issue its MMAs together).
  int qp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + lane / 4 + 8 * h;
    qp[h] = r / G < n_tok ? ctx0 + first + r / G : -1;
  }
  const int wg_row0 = wg * 64;
  const bool wg_active = wg_row0 / G < n_tok;
  const int wg_first_qp = ctx0 + first + wg_row0 / G;
  const int wg_last_qp = ctx0 + first + min(n_tok - 1, (wg_row0 + 63) / G);
  const float scale = p.scale * kLog2e;

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  uint32_t pa[kN / 16][4];  // the previous tile's P, as A fragments of its P V
  // O += P V for the tile in ring stage k_tile (its V follows its K): V rows kk*16.. as B, 16
  // positions deep and head_dim wide, N-major (64-column blocks kN * 128 bytes apart, 8-row atoms
  // 1 KB apart).
  auto issue_pv = [&](uint32_t k_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      wgmma::mma_rs_bt<T, D>(acc, pa[kk], wgmma::desc128(k_tile + kKvBytes + kk * 16 * 128, kN * 128, 1024));
    }
    wgmma::commit();
  };

  // Every thread takes part in every tile's barrier and loads; a warpgroup computes on its first
  // n_act tiles. (The MMAs sit in straight-line code inside these loops: under a branch, ptxas
  // serializes them.)
  auto next_tile = [&](int it) {
    cp_async_wait<kStages - 3>();  // tile it is in
    wgmma::fence_proxy_async();
    __syncthreads();               // ... for every thread; and every warpgroup is done with tile it - 2
    issue(it + kStages - 2);       // into tile it - 2's stage
  };
  auto issue_qk = [&](float (&sc)[kN / 8][4], uint32_t k_tile) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t in_atom = (kk % 4) * 32;  // 16 elements along head_dim within a 64-wide block
      const uint64_t a = wgmma::desc128(q_s + (kk / 4) * (kRows * 128) + wg_row0 * 128 + in_atom, 16, 1024);
      const uint64_t b = wgmma::desc128(k_tile + (kk / 4) * (kN * 128) + in_atom, 16, 1024);
      wgmma::mma_ss<T, kN>(sc, a, b, kk > 0);
    }
    wgmma::commit();
  };
  // Tile it's scores -> P (masked where the tile crosses the warpgroup's first row), the maxima
  // and sums updated, alpha the accumulators' factor.
  auto scores = [&](float (&sc)[kN / 8][4], int it, float (&alpha)[2]) {
    const int start = it * kN;
    if (start + kN - 1 > wg_first_qp) {
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (start + j * 8 + (lane % 4) * 2 + (e & 1) > qp[e / 2]) sc[j][e] = -INFINITY;
        }
      }
    }
    softmax_scores<kN / 8>(sc, m, l, alpha, scale);
  };
  auto to_a_fragments = [&](const float (&sc)[kN / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      pa[kk][0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      pa[kk][1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
  };
  const int n_act = wg_active ? min(n_tiles, wg_last_qp / kN + 1) : 0;
  if (n_act > 0) {
    float sc[kN / 8][4], alpha[2];
    next_tile(0);
    wgmma::fence();
    issue_qk(sc, k_stage(0));
    wgmma::wait<0>();
    wgmma::fence_operands(sc);
    scores(sc, 0, alpha);
    to_a_fragments(sc);
    for (int it = 1; it < n_act; ++it) {
      next_tile(it);
      wgmma::fence();  // orders last iteration's register writes (acc, pa) before the MMAs
      issue_qk(sc, k_stage(it));
      issue_pv(k_stage(it - 1));
      wgmma::wait<1>();  // Q K^T done; P V may still run
      wgmma::fence_operands(sc);
      scores(sc, it, alpha);
      wgmma::wait<0>();
      wgmma::fence_operands(acc);
      if constexpr (kLazyRescale) {
        // Once the rows' maxima settle most tiles leave them be: skip the 64 multiplies then.
        if (__any_sync(0xffffffff, alpha[0] != 1.0f || alpha[1] != 1.0f)) rescale<D>(acc, alpha);
      } else {
        rescale<D>(acc, alpha);
      }
      to_a_fragments(sc);
    }
    wgmma::fence();
    issue_pv(k_stage(n_act - 1));
    wgmma::wait<0>();
    wgmma::fence_operands(acc);
  }
  for (int it = n_act; it < n_tiles; ++it) next_tile(it);
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) store_row<T, D, G>(p, acc, l[h], qp[h], h, warp * 16 + lane / 4 + 8 * h, q0 + first, kvh, lane);
#endif
}

constexpr int kPrefillWarps = 8;  // 128 rows: measured 264 -> 223 us per layer at 2048 tokens
constexpr int kPrefillStages = 2;
constexpr int kDecodeStages = 3;

constexpr size_t prefill_smem(int d) { return tc_smem_bytes(16 * kPrefillWarps, d, kPrefillStages); }
constexpr size_t decode_smem(int d) { return tc_smem_bytes(16, d, kDecodeStages); }

// The Hopper prefill, unless this build has no sm_90a code for the current device (then
// cudaErrorNotSupported).
template <typename T, int D, int G, int kWG, int kN, int kStages, int kMinBlocks, bool kLazyRescale = false>
cudaError_t launch_prefill_wgmma(const AttentionParams& p, cudaStream_t stream) {
  constexpr auto kernel = prefill_wgmma_kernel<T, D, G, kWG, kN, kStages, kMinBlocks, kLazyRescale>;
  static const bool has_wgmma = wgmma::kernel_has_wgmma(kernel);
  if (!has_wgmma) return cudaErrorNotSupported;
  constexpr size_t smem = wg_smem_bytes<D, kWG, kN, kStages>();
  if (const cudaError_t e = allow_smem<kernel>(smem); e != cudaSuccess) return e;
  constexpr int64_t kTokens = 64 * kWG / G;
  const int64_t tiles = (p.num_tokens + kTokens - 1) / kTokens + p.num_seqs;  // an upper bound, as below
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_kv_heads));
  kernel<<<grid, kWG * 128, smem, stream>>>(p);
  return cudaGetLastError();
}
// SHARDSERVE_ATTENTION_WGMMA: unset, the Hopper prefill where the build and the GPU have it, its
// shape chosen below; 0, the mma.sync kernel (the A100 path) everywhere; 2 or 3, that many
// warpgroups whatever the step's size (the tests run each).
inline int wgmma_prefill_mode() {
  const char* v = std::getenv("SHARDSERVE_ATTENTION_WGMMA");
  if (v == nullptr || *v == '\0') return -1;
  return std::strcmp(v, "0") == 0 ? 0 : std::strcmp(v, "2") == 0 ? 2 : 3;
}
// The Hopper prefill's shape (tests/bench/attention_harness.cu, H100, Llama-3.1-8B layer): three
// warpgroups (192 rows) of 64-position tiles, 4 stages, the accumulators rescaled only when a
// row's maximum moved, are the fastest once the grid fills the GPU twice over (2,048 tokens 151 ->
// 133 us, 8,192 1,758 -> 1,367 us against two warpgroups; the lazy rescale alone 1,423 -> 1,367);
// below that, two warpgroups of 128-position tiles, 3 stages (a 512-token chunk after 4,096
// cached 153 -> 128 us: 128 CTAs instead of 88).
template <typename T, int D, int G>
cudaError_t launch_prefill_hopper(const AttentionParams& p, int mode, cudaStream_t stream) {
  constexpr int64_t kTokens3 = 64 * 3 / G;
  if (mode == 3 || (mode < 0 && p.num_tokens * p.num_kv_heads >= 2 * kTokens3 * num_sms())) {
    return launch_prefill_wgmma<T, D, G, 3, 64, 4, 1, true>(p, stream);
  }
  return launch_prefill_wgmma<T, D, G, 2, 128, 3, 1>(p, stream);
}

template <typename T, int D, int G>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  if (!p.decode_only) {  // the switch is read for steps with prompt tokens only
    if (const int mode = wgmma_prefill_mode(); mode != 0) {
      const cudaError_t e = launch_prefill_hopper<T, D, G>(p, mode, stream);
      if (e != cudaErrorNotSupported) return e;
    }
  }
  if (p.decode_only) {
    constexpr auto kernel = decode_mma_kernel<T, D, G, kDecodeStages>;
    if (const cudaError_t e = allow_smem<kernel>(decode_smem(D)); e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.num_kv_heads),
                    static_cast<unsigned>(p.num_splits));
    return launch_pdl(kernel, grid, dim3(128), decode_smem(D), stream, p);
  }
  constexpr auto kernel = prefill_mma_kernel<T, D, G, kPrefillWarps, kPrefillStages>;
  if (const cudaError_t e = allow_smem<kernel>(prefill_smem(D)); e != cudaSuccess) return e;
  constexpr int64_t kTokens = 16 * kPrefillWarps / G;
  // An upper bound of the sum over sequences of ceil(query tokens / kTokens); surplus CTAs exit.
  const int64_t tiles = (p.num_tokens + kTokens - 1) / kTokens + p.num_seqs;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_kv_heads));
  kernel<<<grid, kPrefillWarps * 32, prefill_smem(D), stream>>>(p);
  return cudaGetLastError();
}

// The tensor-core kernels' shapes: head_dim 64 or 128, GQA groups of 1, 2, 4 or 8, 16-bit types;
// nullptr otherwise (the CUDA-core kernels take those).
template <typename T>
cudaError_t (*pick(const AttentionParams& p))(const AttentionParams&, cudaStream_t) {
  const int64_t g = p.num_q_heads / p.num_kv_heads;
  if constexpr (std::is_same_v<T, float>) {
    return nullptr;
  } else {
    auto by_group = [&]<int D>() -> cudaError_t (*)(const AttentionParams&, cudaStream_t) {
      switch (g) {
        case 1: return launch<T, D, 1>;
        case 2: return launch<T, D, 2>;
        case 4: return launch<T, D, 4>;
        case 8: return launch<T, D, 8>;
        default: return nullptr;
      }
    };
    if (p.head_dim == 128) return by_group.template operator()<128>();
    if (p.head_dim == 64) return by_group.template operator()<64>();
    return nullptr;
  }
}

}  // namespace tc

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

bool decode_rope_fusable(const AttentionParams& p, DType dtype) {
  const int64_t g = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  return p.decode_only && (dtype == DType::kBF16 || dtype == DType::kF16) && (p.head_dim == 64 || p.head_dim == 128) &&
         (g == 1 || g == 2 || g == 4 || g == 8) && g * p.num_kv_heads == p.num_q_heads && aligned(p.qkv, 16) &&
         aligned(p.k_cache, 16) && aligned(p.v_cache, 16) && p.rope_cos_sin != nullptr &&
         aligned(p.rope_cos_sin, 16) && p.rope_positions != nullptr && p.rope_slots != nullptr;
}

const char* prefill_attention_kernel(DType dtype, int64_t head_dim, int64_t group) {
  AttentionParams p;
  p.head_dim = head_dim;
  p.num_q_heads = group;
  p.num_kv_heads = 1;
  const bool tensor_cores = dtype == DType::kBF16 ? tc::pick<__nv_bfloat16>(p) != nullptr
                            : dtype == DType::kF16  ? tc::pick<__half>(p) != nullptr
                                                    : false;
  if (!tensor_cores) return "cuda-core";
  if (tc::wgmma_prefill_mode() == 0) return "mma.sync";
  // Every instantiation comes from the same compilation, so one tells for all.
  return wgmma::kernel_has_wgmma(tc::prefill_wgmma_kernel<__nv_bfloat16, 128, 4, 3, 64, 4, 1, true>) ? "wgmma"
                                                                                                      : "mma.sync";
}

cudaError_t paged_attention(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  // Only the tensor-core decode kernel applies RoPE itself: anything else would skip it.
  if (p.rope_cos_sin != nullptr && !decode_rope_fusable(p, dtype)) return cudaErrorInvalidValue;
  const int64_t g = p.num_q_heads / p.num_kv_heads;
  if (g * p.num_kv_heads != p.num_q_heads || g * p.head_dim > kThreads * kMaxAcc || p.num_splits < 1 ||
      p.head_dim % (dtype == DType::kF32 ? 4 : 8) != 0 ||
      (p.num_splits > 1 && p.partials == nullptr) || (p.split_counters != nullptr && p.num_splits > 32)) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = smem_bytes(g, p.head_dim);
  return dispatch_dtype(dtype, [&]<typename T>() {
    // The tensor-core kernels, for the shapes they are built for (prefill only unsplit).
    if (auto* tc_launch = tc::pick<T>(p); tc_launch != nullptr && (p.decode_only || p.num_splits == 1)) {
      cudaError_t e = tc_launch(p, stream);
      if (e == cudaSuccess && p.num_splits > 1 && p.split_counters == nullptr) {
        const dim3 cgrid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_q_heads));
        e = launch_pdl(combine_kernel<T>, cgrid, dim3(128), 0, stream, p);
      }
      return e;
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
