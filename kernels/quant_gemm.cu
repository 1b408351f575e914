// Weight-only quantized linear layers on tensor cores, INT4 (AWQ, GPTQ, act-order included) and
// INT8 (one scale per output row), for 1 to 128 tokens: y[T, N] = x[T, K] * dequant(W)^T, the
// weight dequantized in registers, never in memory.
//
// Why this shape. At decode batches a quantized layer is a stream of packed weights: the win over
// 16 bits is 4x (2x) fewer bytes, and it is lost as soon as the dequantization costs more
// instructions than the bytes take to arrive, or the activations are re-read from cache more than
// the weights from HBM (the warp-per-row GEMV of quant_linear.cu reads 4 bytes of x per byte of
// INT4 weight and runs at ~0.2 of bandwidth). So, as in Marlin, the weight is the tensor cores' A
// operand (16 output features x 16 inputs per mma.m16n8k16) and the tokens are B (8 per tile): at
// batch 1-8 the mma does 8x the useful work for free, and from 16 tokens on the same loop becomes
// a real GEMM.
//
// Layout (made once at load by quant_mma_repack): for each 16-row tile mt of W and each 64-wide
// block kb of K, 32 lanes x 16 bytes (INT4; INT8: two such runs), lane-contiguous, so a warp reads
// 512 contiguous bytes per load. Lane (g = lane / 4, c = lane % 4) holds rows g and g + 8 at the
// 16 inputs kb * 64 + 16c ... + 15: exactly the A fragments of four mma k-steps. That works because
// the order of the k-sum is free: k-step s takes logical inputs {2c, 2c+1, 2c+8, 2c+9} of the mma
// from the physical inputs 16c + 4s + {0, 1, 2, 3}, and the activations follow the same map, so
// each lane's B fragments for all four steps are the 32 contiguous bytes of x at kb * 64 + 16c (two
// 16-byte loads, fully coalesced), with no shuffle and no shared memory.
//
// INT4: word s of a lane's 16 bytes packs its step-s nibbles so that (word >> 4i) & 0x000F000F is
// the (low, high) pair of fragment register i; OR-ing the exponent of 128 (BF16) or 1024 (F16)
// turns each nibble q into the 16-bit number bias + q exactly, then (bias + q) - (bias + z) and
// one multiply by the group scale give the weight: two packed 16-bit operations per two weights.
// Scales and zero points: per group, row tile and g, rows g and g + 8 side by side, the two scales
// in the activation type (one 32-bit word) and the two zero points (two bytes) in a second array,
// so a lane gets what its rows need in two small loads and the layout takes the checkpoint's 3
// bytes per group and row. The weight is therefore (q - z) * s with s rounded to the activation
// type and one rounding of the product, where the CPU oracle multiplies by the FP32 scale: a
// relative difference of at most 2^-8 per weight (BF16), inside the BF16 tolerance of the tests. Any group size that is a multiple of 16 works (a lane's 16 inputs share a group).
// Act-order (GPTQ desc_act): the inputs are permuted at load so that each group's inputs are
// contiguous (int4_act_order_permutation), and the activations are permuted the same way by one
// small gather before the product (the caller provides its buffer).
//
// INT8: per k-step two words, row g's 4 bytes then row g + 8's; a byte becomes the exact integer
// in the activation type (F16: the 1024 bias as for INT4; BF16 keeps 7 mantissa bits, so through
// FP32's 2^23 bias and one pack), and the row's scale multiplies the FP32 sum at the end: the
// products are then exact, closer to the oracle than a dequantized copy.
//
// Work split: a CTA has kWarpsN x kWarpsK warps; each owns kMT row tiles, the kWarpsK warps of
// the same rows split K between them (each a contiguous run of 64-wide blocks, so its weight
// stream is one contiguous read per row tile) and their FP32 partial sums meet in shared memory.
// The kWarpsN warps of different rows read the same activations at about the same time, so at
// larger batches the L1 serves most of them (they would otherwise come from L2 once per warp); or,
// kStageX (with kWarpsK = 1), the CTA stages each 64-wide block of the activations in shared
// memory (cp.async, two buffers, 16-byte chunks XOR-swizzled by row so that a warp's fragment
// loads hit 32 different banks) and every warp reads its B fragments from there. Each warp keeps kDepth blocks of weights (and,
// for up to 32 tokens, of activations) in flight in registers; the first ones are requested before
// the programmatic-dependent-launch wait, as the weights are never written by another kernel.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "kernels/common.cuh"
#include "kernels/kernels.h"
#include "kernels/mma.cuh"

namespace shardserve::kernels {
namespace {

constexpr int kBlockK = 64;

// The 16-bit number whose low mantissa bits take a nibble exactly: 128 (BF16, 7 mantissa bits) or
// 1024 (F16, 10), as a pair.
template <typename T>
struct Int4Bias {
  static constexpr uint32_t kPair = 0x43004300u;
};
template <>
struct Int4Bias<__half> {
  static constexpr uint32_t kPair = 0x64006400u;
};

template <typename T>
using Pair = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;

template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Half `high` of a pair of 16-bit values in both halves.
__device__ __forceinline__ uint32_t both_halves(uint32_t pair, bool high) {
  return __byte_perm(pair, 0, high ? 0x3232 : 0x1010);
}

// The two weights whose nibbles sit at bits 0-3 and 16-19 of `bits`: ((bias + q) - (bias + z)) * s.
template <typename T>
__device__ __forceinline__ uint32_t dequant2(uint32_t bits, uint32_t zero2, uint32_t scale2) {
  const uint32_t biased = (bits & 0x000F000Fu) | Int4Bias<T>::kPair;
  const Pair<T> w = __hmul2(__hsub2(bits_as<Pair<T>>(biased), bits_as<Pair<T>>(zero2)), bits_as<Pair<T>>(scale2));
  return bits_as<uint32_t>(w);
}

// INT8 bytes 2h, 2h + 1 of `word` (already XOR 0x80: q + 128) as the pair (q0, q1), exactly.
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t biased, int h) {
  if constexpr (std::is_same_v<T, __half>) {
    const uint32_t v = __byte_perm(biased, 0x64646464u, h == 0 ? 0x5140 : 0x5342);  // 1024 + q + 128
    return bits_as<uint32_t>(__hsub2(bits_as<__half2>(v), __half2half2(__float2half_rn(1152.0f))));
  } else {
    const float lo = __uint_as_float(__byte_perm(biased, 0x4B000000u, h == 0 ? 0x7440 : 0x7442)) - 8388736.0f;
    const float hi = __uint_as_float(__byte_perm(biased, 0x4B000000u, h == 0 ? 0x7441 : 0x7443)) - 8388736.0f;
    return bits_as<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
}

template <QuantFormat kFormat>
struct Packing {
  static constexpr int kVecs = kFormat == QuantFormat::kInt4 ? 1 : 2;  // 16-byte loads per lane per block
};

// Dynamic shared memory of a configuration: the staged activations' two buffers, reused after the
// loop for the warps' partial sums (+1 column: a warp's fragment writes spread over the banks).
constexpr size_t quant_mma_smem_bytes(int nt, int mt, int warps_n, int warps_k, bool stage_x) {
  const size_t partial = static_cast<size_t>(warps_n) * warps_k * (mt * 16) * (nt * 8 + 1) * sizeof(float);
  const size_t staged = stage_x ? 2 * static_cast<size_t>(nt * 8) * kBlockK * 2 : 0;
  return partial > staged ? partial : staged;
}

template <QuantFormat kFormat, typename T, typename OutT, int NT, int kMT, int kWarpsN, int kWarpsK, int kDepth,
          bool kStageX>
__global__ void __launch_bounds__(32 * kWarpsN * kWarpsK)
    quant_mma_kernel(const uint4* __restrict__ packed, const void* __restrict__ scales,
                     const uint16_t* __restrict__ zero_pairs, const T* __restrict__ x, int tokens, int n, int k,
                     int group_size, OutT* __restrict__ y) {
  constexpr bool kInt4 = kFormat == QuantFormat::kInt4;
  constexpr int kVecs = Packing<kFormat>::kVecs;
  // Up to 32 tokens the activations of the blocks in flight fit in registers beside the weights;
  // above, each block's activations are loaded as it is computed (they are L2-resident).
  static_assert(!kStageX || kWarpsK == 1, "staged activations: every warp walks the same blocks");
  constexpr bool kPrefetchX = NT <= 4 && !kStageX;
  constexpr int kXSlots = kPrefetchX ? NT : 1;
  constexpr int kXStageBytes = NT * 8 * kBlockK * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  pdl_trigger();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int wn = warp / kWarpsK;
  const int wk = warp % kWarpsK;
  const int g = lane / 4;
  const int c = lane % 4;
  const int m_tiles = n / 16;
  const int mt0 = (blockIdx.x * kWarpsN + wn) * kMT;
  const int kb_all = k / kBlockK;
  const int kb_begin = wk * kb_all / kWarpsK;
  const int kb_end = (wk + 1) * kb_all / kWarpsK;
  const auto* scale_pairs = static_cast<const uint32_t*>(scales);  // INT4; INT8: F32 [N]

  uint4 wq[kDepth][kMT][kVecs];
  uint2 sz[kDepth][kMT];
  uint4 xq[kDepth][kXSlots][2];
  auto load_weights = [&](int kb, uint4 (&w)[kMT][kVecs], uint2 (&s)[kMT]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        w[mt][v] = __ldcs(packed + ((static_cast<size_t>(mt0 + mt) * kb_all + kb) * kVecs + v) * 32 + lane);
      }
      if constexpr (kInt4) {
        const int group = (kb * kBlockK + 16 * c) / group_size;
        const size_t at = (static_cast<size_t>(group) * m_tiles + mt0 + mt) * 8 + g;
        s[mt] = make_uint2(__ldg(scale_pairs + at), __ldg(zero_pairs + at));
      }
    }
  };
  // Token 8j + g's 16 inputs at kb * 64 + 16c; zeros past the last token.
  auto load_x = [&](int kb, int j, uint4 (&v)[2]) {
    const int token = 8 * j + g;
    if (token < tokens) {
      const auto* p = reinterpret_cast<const uint4*>(x + static_cast<size_t>(token) * k + kb * kBlockK + 16 * c);
      v[0] = __ldg(p);
      v[1] = __ldg(p + 1);
    } else {
      v[0] = v[1] = make_uint4(0, 0, 0, 0);
    }
  };

  float acc[kMT][NT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.0f;
    }
  }

  // Staged: block kb's activations in buffer kb % 2, row r's 16-byte chunk ch at ch ^ (r % 8).
  auto stage_x = [&](int kb) {
    const uint32_t base = mma::smem_addr(smem) + (kb & 1) * kXStageBytes;
    for (int i = threadIdx.x; i < NT * 8 * 8; i += blockDim.x) {
      const int r = i / 8, ch = i % 8;
      const bool valid = r < tokens && kb < kb_end;
      const T* src = x + static_cast<size_t>(valid ? r : 0) * k + (valid ? kb : 0) * kBlockK + ch * 8;
      mma::cp_async16(base + r * 128 + ((ch ^ (r & 7)) * 16), src, valid);
    }
    mma::cp_async_commit();
  };

  auto compute = [&](int kb, const uint4 (&w)[kMT][kVecs], const uint2 (&s)[kMT], const uint4 (&xs)[kXSlots][2]) {
    uint32_t a[kMT][4][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if constexpr (kInt4) {
        // (bias + z) in both halves: the zero byte is the low mantissa bits, as for the codes.
        const uint32_t scale_lo = both_halves(s[mt].x, false), scale_hi = both_halves(s[mt].x, true);
        const uint32_t zero_lo = (s[mt].y & 0xFFu) * 0x00010001u | Int4Bias<T>::kPair;
        const uint32_t zero_hi = (s[mt].y >> 8) * 0x00010001u | Int4Bias<T>::kPair;
        const uint32_t words[4] = {w[mt][0].x, w[mt][0].y, w[mt][0].z, w[mt][0].w};
#pragma unroll
        for (int step = 0; step < 4; ++step) {
          a[mt][step][0] = dequant2<T>(words[step], zero_lo, scale_lo);
          a[mt][step][1] = dequant2<T>(words[step] >> 4, zero_hi, scale_hi);
          a[mt][step][2] = dequant2<T>(words[step] >> 8, zero_lo, scale_lo);
          a[mt][step][3] = dequant2<T>(words[step] >> 12, zero_hi, scale_hi);
        }
      } else {
        // Vector v holds steps 2v and 2v + 1, each as (row g's 4 bytes, row g + 8's 4 bytes).
        const uint32_t words[8] = {w[mt][0].x, w[mt][0].y, w[mt][0].z, w[mt][0].w,
                                   w[mt][1].x, w[mt][1].y, w[mt][1].z, w[mt][1].w};
#pragma unroll
        for (int step = 0; step < 4; ++step) {
          const uint32_t row_lo = words[2 * step] ^ 0x80808080u;
          const uint32_t row_hi = words[2 * step + 1] ^ 0x80808080u;
          a[mt][step][0] = int8_pair<T>(row_lo, 0);
          a[mt][step][1] = int8_pair<T>(row_hi, 0);
          a[mt][step][2] = int8_pair<T>(row_lo, 1);
          a[mt][step][3] = int8_pair<T>(row_hi, 1);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint4 v[2];
      if constexpr (kPrefetchX) {
        v[0] = xs[j][0];
        v[1] = xs[j][1];
      } else if constexpr (kStageX) {
        const uint8_t* row = smem + (kb & 1) * kXStageBytes + (8 * j + g) * 128;
        v[0] = *reinterpret_cast<const uint4*>(row + (((2 * c) ^ g) * 16));
        v[1] = *reinterpret_cast<const uint4*>(row + (((2 * c + 1) ^ g) * 16));
      } else {
        load_x(kb, j, v);
      }
      const uint32_t xw[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int step = 0; step < 4; ++step) mma::mma_16816<T>(acc[mt][j], a[mt][step], xw[2 * step], xw[2 * step + 1]);
      }
    }
  };

#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    if (kb_begin + d < kb_end) load_weights(kb_begin + d, wq[d], sz[d]);
  }
  pdl_wait();
  if constexpr (kStageX) stage_x(kb_begin);
  if constexpr (kPrefetchX) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (kb_begin + d < kb_end) {
#pragma unroll
        for (int j = 0; j < NT; ++j) load_x(kb_begin + d, j, xq[d][j]);
      }
    }
  }
  for (int kb = kb_begin; kb < kb_end; kb += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (kb + d < kb_end) {
        // Take slot d, refill it with the block kDepth ahead, then compute: kDepth blocks stay in
        // flight while this one is multiplied.
        uint4 w[kMT][kVecs];
        uint2 s[kMT];
        uint4 xs[kXSlots][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int v = 0; v < kVecs; ++v) w[mt][v] = wq[d][mt][v];
          s[mt] = sz[d][mt];
        }
#pragma unroll
        for (int j = 0; j < kXSlots; ++j) {
          xs[j][0] = xq[d][j][0];
          xs[j][1] = xq[d][j][1];
        }
        const int ahead = kb + d + kDepth;
        if (ahead < kb_end) {
          load_weights(ahead, wq[d], sz[d]);
          if constexpr (kPrefetchX) {
#pragma unroll
            for (int j = 0; j < NT; ++j) load_x(ahead, j, xq[d][j]);
          }
        }
        if constexpr (kStageX) {
          stage_x(kb + d + 1);  // the next block into the other buffer (an empty group past the end)
          mma::cp_async_wait<1>();
          __syncthreads();
        }
        compute(kb + d, w, s, xs);
        if constexpr (kStageX) __syncthreads();  // this buffer is refilled two blocks on
      }
    }
  }

  // INT8: the row's scale, applied to the FP32 sum.
  auto row_scale = [&](int row) {
    if constexpr (kInt4) {
      return 1.0f;
    } else {
      return __ldg(static_cast<const float*>(scales) + row);
    }
  };
  // The warps' partial sums meet in shared memory. Fragment (mt, j): c0, c1 = rows g, tokens 2c,
  // 2c + 1; c2, c3 = row g + 8.
  constexpr int kRows = kMT * 16;
  constexpr int kCols = NT * 8 + 1;
  if constexpr (kStageX) mma::cp_async_wait<0>();
  __syncthreads();  // (staged: the buffers become the partial sums)
  auto partial = reinterpret_cast<float (*)[kRows][kCols]>(smem);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        partial[warp][mt * 16 + g + (i >= 2 ? 8 : 0)][8 * j + 2 * c + (i & 1)] = acc[mt][j][i];
      }
    }
  }
  __syncthreads();
  // Rows fastest (the CTA's kWarpsN x kRows rows are contiguous): the stores of one token's
  // outputs are contiguous.
  const int cta_row0 = blockIdx.x * kWarpsN * kRows;
  for (int i = threadIdx.x; i < kWarpsN * kRows * NT * 8; i += blockDim.x) {
    const int r = i % (kWarpsN * kRows);
    const int token = i / (kWarpsN * kRows);
    if (token >= tokens) break;
    const int owner = r / kRows;  // the warps_n index whose rows these are
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarpsK; ++w) sum += partial[owner * kWarpsK + w][r % kRows][token];
    y[static_cast<size_t>(token) * n + cta_row0 + r] = from_f32<OutT>(sum * row_scale(cta_row0 + r));
  }
}

// INT4 packed word ((mt * KB + kb) * 32 + lane) * 4 + s of the layout above, from the canonical
// [N, K/8] words; physical input p is input perm[p] (or p).
__global__ void int4_repack_kernel(QuantWeightView w, const int32_t* __restrict__ perm, uint32_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t kb_all = w.k / kBlockK;
  if (i >= w.n * w.k / 8) return;
  const int s = static_cast<int>(i % 4);
  const int lane = static_cast<int>((i / 4) % 32);
  const int64_t kb = (i / 128) % kb_all;
  const int64_t mt = i / 128 / kb_all;
  const int64_t r0 = mt * 16 + lane / 4;
  const int64_t p = kb * kBlockK + 16 * (lane % 4) + 4 * s;
  const auto* words = static_cast<const uint32_t*>(w.weight);
  auto q = [&](int64_t row, int64_t pos) -> uint32_t {
    const int64_t f = perm != nullptr ? perm[pos] : pos;
    return (words[row * (w.k / 8) + f / 8] >> (4 * (f % 8))) & 0xFu;
  };
  const int64_t r1 = r0 + 8;
  out[i] = q(r0, p) | q(r1, p) << 4 | q(r0, p + 2) << 8 | q(r1, p + 2) << 12 | q(r0, p + 1) << 16 |
           q(r1, p + 1) << 20 | q(r0, p + 3) << 24 | q(r1, p + 3) << 28;
}

// INT8 packed word (((mt * KB + kb) * 2 + v) * 32 + lane) * 4 + e: step 2v + e / 2, row g (e even)
// or g + 8 (e odd), its 4 bytes at physical inputs 16c + 4 * step ... + 3, from the canonical [N, K].
__global__ void int8_repack_kernel(QuantWeightView w, uint32_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t kb_all = w.k / kBlockK;
  if (i >= w.n * w.k / 4) return;
  const int e = static_cast<int>(i % 4);
  const int lane = static_cast<int>((i / 4) % 32);
  const int v = static_cast<int>((i / 128) % 2);
  const int64_t kb = (i / 256) % kb_all;
  const int64_t mt = i / 256 / kb_all;
  const int64_t row = mt * 16 + lane / 4 + (e % 2) * 8;
  const int64_t p = kb * kBlockK + 16 * (lane % 4) + 4 * (2 * v + e / 2);
  out[i] = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(w.weight) + row * w.k + p);
}

// Entry (group * N/16 + mt) * 8 + g of each array: rows 16mt + g and + 8, their scales in T
// (scale_pairs) and their zero points (zero_pairs, low byte first).
template <typename T>
__global__ void int4_repack_scales_kernel(QuantWeightView w, uint32_t* __restrict__ scale_pairs,
                                          uint16_t* __restrict__ zero_pairs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m_tiles = w.n / 16;
  if (i >= w.num_groups * m_tiles * 8) return;
  const int64_t g = i % 8;
  const int64_t mt = (i / 8) % m_tiles;
  const int64_t group = i / 8 / m_tiles;
  const int64_t lo = (mt * 16 + g) * w.num_groups + group;
  const int64_t hi = lo + 8 * w.num_groups;
  auto scale = [&](int64_t at) {
    return w.scales_f16 ? __half2float(static_cast<const __half*>(w.scales)[at]) : static_cast<const float*>(w.scales)[at];
  };
  scale_pairs[i] = mma::pack2<T>(scale(lo), scale(hi));
  zero_pairs[i] = static_cast<uint16_t>(w.zeros[lo] | w.zeros[hi] << 8);
}

// The dense weight [N, K] (T, the checkpoint's input order) back from the packed layout, for the
// steps above kMaxQuantMmaTokens (a 16-bit GEMM): one thread per packed 32-bit word, the same
// values the tensor-core kernel multiplies with.
template <QuantFormat kFormat, typename T>
__global__ void quant_mma_dequantize_kernel(const uint32_t* __restrict__ packed, const void* __restrict__ scales,
                                            const uint16_t* __restrict__ zero_pairs, const int32_t* __restrict__ perm,
                                            int64_t n, int64_t k, int64_t group_size, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t kb_all = k / kBlockK;
  if (i >= (kFormat == QuantFormat::kInt4 ? n * k / 8 : n * k / 4)) return;
  const uint32_t word = packed[i];
  const int lane = static_cast<int>((i / 4) % 32);
  const int g = lane / 4;
  const int c = lane % 4;
  auto input = [&](int64_t p) { return perm != nullptr ? perm[p] : p; };
  if constexpr (kFormat == QuantFormat::kInt4) {
    const int s = static_cast<int>(i % 4);
    const int64_t kb = (i / 128) % kb_all;
    const int64_t mt = i / 128 / kb_all;
    const int64_t p = kb * kBlockK + 16 * c + 4 * s;
    const int64_t at = ((p / group_size) * (n / 16) + mt) * 8 + g;
    const uint32_t pair = static_cast<const uint32_t*>(scales)[at];
    const uint16_t zeros = zero_pairs[at];
    const T* scale = reinterpret_cast<const T*>(&pair);
    // Nibble j of the word (int4_repack_kernel): row g + 8 for odd j, input p + kOffset[j].
    constexpr int kRowHi[8] = {0, 1, 0, 1, 0, 1, 0, 1};
    constexpr int kOffset[8] = {0, 0, 2, 2, 1, 1, 3, 3};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int hi = kRowHi[j];
      const int64_t row = mt * 16 + g + 8 * hi;
      const int q = static_cast<int>((word >> (4 * j)) & 0xFu);
      const int z = hi ? zeros >> 8 : zeros & 0xFF;
      out[row * k + input(p + kOffset[j])] = from_f32<T>(static_cast<float>(q - z) * to_f32(scale[hi]));
    }
  } else {
    const int e = static_cast<int>(i % 4);
    const int v = static_cast<int>((i / 128) % 2);
    const int64_t kb = (i / 256) % kb_all;
    const int64_t mt = i / 256 / kb_all;
    const int64_t row = mt * 16 + g + (e % 2) * 8;
    const int64_t p = kb * kBlockK + 16 * c + 4 * (2 * v + e / 2);
    const float scale = static_cast<const float*>(scales)[row];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[row * k + p + j] = from_f32<T>(static_cast<float>(static_cast<int8_t>(word >> (8 * j))) * scale);
    }
  }
}

template <typename T>
__global__ void permute_columns_kernel(const T* __restrict__ x, int64_t rows, int64_t k,
                                       const int32_t* __restrict__ perm, T* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * k) return;
  const int64_t r = i / k;
  out[i] = x[r * k + perm[i % k]];
}

unsigned blocks_of(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <QuantFormat kFormat, typename T, typename OutT, int NT, int kMT, int kWarpsN, int kWarpsK, int kDepth,
          bool kStageX>
cudaError_t launch_mma(const QuantMmaView& w, const void* x, int64_t tokens, void* y, cudaStream_t stream) {
  constexpr auto kernel = quant_mma_kernel<kFormat, T, OutT, NT, kMT, kWarpsN, kWarpsK, kDepth, kStageX>;
  constexpr size_t smem = quant_mma_smem_bytes(NT, kMT, kWarpsN, kWarpsK, kStageX);
  if constexpr (smem > 48 * 1024) {
    if (const cudaError_t e = allow_smem<kernel>(smem); e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(w.n / 16 / kMT / kWarpsN));
  // INT4: the zero-point pairs follow the scale pairs ([G][N/16][8] each).
  const auto* zero_pairs = kFormat == QuantFormat::kInt4
                               ? reinterpret_cast<const uint16_t*>(static_cast<const uint32_t*>(w.scales) +
                                                                   w.num_groups * w.n / 2)
                               : nullptr;
  return launch_pdl(kernel, grid, dim3(32 * kWarpsN * kWarpsK), smem, stream, static_cast<const uint4*>(w.packed),
                    w.scales, zero_pairs, static_cast<const T*>(x), static_cast<int>(tokens), static_cast<int>(w.n),
                    static_cast<int>(w.k), static_cast<int>(w.group_size), static_cast<OutT*>(y));
}

// The instantiated configurations: {tokens per CTA / 8, row tiles per warp, warps splitting N,
// warps splitting K, blocks in flight per warp, activations staged in shared memory}.
// quant_mma_config() picks among them; the harness times them all.
#define SHARDSERVE_QUANT_MMA_CONFIGS(X) \
  X(1, 1, 1, 8, 4, false)               \
  X(1, 1, 1, 4, 4, false)               \
  X(1, 2, 1, 8, 2, false)               \
  X(2, 1, 1, 8, 4, false)               \
  X(2, 1, 1, 4, 4, false)               \
  X(4, 1, 1, 8, 2, false)               \
  X(4, 1, 1, 4, 2, false)               \
  X(4, 2, 1, 4, 2, false)               \
  X(4, 1, 4, 2, 2, false)               \
  X(4, 1, 8, 1, 2, true)                \
  X(8, 1, 1, 4, 2, false)               \
  X(8, 2, 1, 4, 2, false)               \
  X(8, 1, 8, 1, 2, false)               \
  X(8, 2, 4, 1, 2, false)               \
  X(8, 1, 8, 1, 2, true)                \
  X(8, 2, 4, 1, 2, true)                \
  X(16, 1, 1, 4, 2, false)              \
  X(16, 1, 1, 2, 2, false)              \
  X(16, 1, 4, 1, 2, false)              \
  X(16, 1, 8, 1, 2, true)               \
  X(16, 1, 4, 1, 2, true)

template <QuantFormat kFormat, typename T, typename OutT>
cudaError_t launch_config(const QuantMmaConfig& cfg, const QuantMmaView& w, const void* x, int64_t tokens, void* y,
                          cudaStream_t stream) {
#define SHARDSERVE_QUANT_MMA_CASE(NT, MT, WN, WK, D, SX)                                             \
  if (cfg.token_tiles == NT && cfg.row_tiles == MT && cfg.warps_n == WN && cfg.warps_k == WK &&      \
      cfg.depth == D && cfg.stage_x == SX) {                                                         \
    return launch_mma<kFormat, T, OutT, NT, MT, WN, WK, D, SX>(w, x, tokens, y, stream);             \
  }
  SHARDSERVE_QUANT_MMA_CONFIGS(SHARDSERVE_QUANT_MMA_CASE)
#undef SHARDSERVE_QUANT_MMA_CASE
  return cudaErrorInvalidValue;
}

template <QuantFormat kFormat>
cudaError_t launch_format(const QuantMmaConfig& cfg, const QuantMmaView& w, const void* x, int64_t tokens, void* y,
                          DType out_dtype, cudaStream_t stream) {
  if (w.dtype == DType::kBF16) {
    if (out_dtype == DType::kBF16) return launch_config<kFormat, __nv_bfloat16, __nv_bfloat16>(cfg, w, x, tokens, y, stream);
    if (out_dtype == DType::kF32) return launch_config<kFormat, __nv_bfloat16, float>(cfg, w, x, tokens, y, stream);
  } else if (w.dtype == DType::kF16) {
    if (out_dtype == DType::kF16) return launch_config<kFormat, __half, __half>(cfg, w, x, tokens, y, stream);
    if (out_dtype == DType::kF32) return launch_config<kFormat, __half, float>(cfg, w, x, tokens, y, stream);
  }
  return cudaErrorInvalidValue;
}

// The shapes the packed layout holds (one definition for the repack, the product and the
// dequantization): whole 16-row tiles and 64-wide blocks, 32-bit word indices, and INT4 groups of a
// multiple of 16 inputs covering K.
bool layout_supported(QuantFormat format, int64_t n, int64_t k, int64_t group_size, int64_t num_groups) {
  if (n % 16 != 0 || k % kBlockK != 0 || n * k / 4 >= (int64_t{1} << 31)) return false;
  if (format == QuantFormat::kInt8) return true;
  return format == QuantFormat::kInt4 && group_size > 0 && group_size % 16 == 0 && num_groups * group_size >= k;
}

bool activations_supported(DType x) { return x == DType::kBF16 || x == DType::kF16; }

}  // namespace

std::vector<QuantMmaConfig> quant_mma_configs() {
  std::vector<QuantMmaConfig> all;
#define SHARDSERVE_QUANT_MMA_LIST(NT, MT, WN, WK, D, SX) all.push_back(QuantMmaConfig{NT, MT, WN, WK, D, SX});
  SHARDSERVE_QUANT_MMA_CONFIGS(SHARDSERVE_QUANT_MMA_LIST)
#undef SHARDSERVE_QUANT_MMA_LIST
  return all;
}

int quant_mma_token_tiles(int64_t tokens) {
  int nt = 1;
  while (nt * 8 < tokens) nt *= 2;
  return nt;
}

// Until measured otherwise: as many warps as the K split allows while each keeps >= 4 blocks, one
// row tile per CTA (the most CTAs).
QuantMmaConfig quant_mma_config(int64_t tokens, int64_t n, int64_t k) {
  const int nt = quant_mma_token_tiles(tokens);
  QuantMmaConfig cfg{nt, 1, 1, 4, nt <= 2 ? 4 : 2, false};
  if (nt <= 4 && k / kBlockK >= 32) cfg.warps_k = 8;
  (void)n;
  return cfg;
}

bool quant_mma_supported(const QuantWeightView& w, int64_t tokens, DType x) {
  return tokens >= 1 && tokens <= kMaxQuantMmaTokens && activations_supported(x) &&
         layout_supported(w.format, w.n, w.k, w.group_size, w.num_groups);
}

size_t quant_mma_packed_bytes(QuantFormat format, int64_t n, int64_t k) {
  return static_cast<size_t>(format == QuantFormat::kInt4 ? n * k / 2 : n * k);
}
size_t int4_mma_scale_zero_bytes(int64_t n, int64_t num_groups) { return static_cast<size_t>(num_groups * n * 3); }

std::optional<std::vector<int32_t>> int4_act_order_permutation(std::span<const int32_t> g_idx, int64_t group_size) {
  std::vector<int32_t> perm(g_idx.size());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int32_t a, int32_t b) { return g_idx[a] < g_idx[b]; });
  for (size_t p = 0; p < perm.size(); ++p) {
    if (g_idx[perm[p]] != static_cast<int64_t>(p) / group_size) return std::nullopt;
  }
  return perm;
}

cudaError_t quant_mma_repack(const QuantWeightView& w, const int32_t* perm, DType dtype, void* packed,
                             void* scale_zero, cudaStream_t stream) {
  if (!quant_mma_supported(w, 1, dtype)) return cudaErrorInvalidValue;
  if (w.format == QuantFormat::kInt8) {
    int8_repack_kernel<<<blocks_of(w.n * w.k / 4, 256), 256, 0, stream>>>(w, static_cast<uint32_t*>(packed));
    return cudaGetLastError();
  }
  int4_repack_kernel<<<blocks_of(w.n * w.k / 8, 256), 256, 0, stream>>>(w, perm, static_cast<uint32_t*>(packed));
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const int64_t entries = w.num_groups * (w.n / 16) * 8;
  auto* scale_pairs = static_cast<uint32_t*>(scale_zero);
  auto* zero_pairs = reinterpret_cast<uint16_t*>(scale_pairs + entries);
  if (dtype == DType::kBF16) {
    int4_repack_scales_kernel<__nv_bfloat16><<<blocks_of(entries, 256), 256, 0, stream>>>(w, scale_pairs, zero_pairs);
  } else {
    int4_repack_scales_kernel<__half><<<blocks_of(entries, 256), 256, 0, stream>>>(w, scale_pairs, zero_pairs);
  }
  return cudaGetLastError();
}

cudaError_t quant_mma_dequantize(const QuantMmaView& w, void* out, cudaStream_t stream) {
  if (!activations_supported(w.dtype) || !layout_supported(w.format, w.n, w.k, w.group_size, w.num_groups)) {
    return cudaErrorInvalidValue;
  }
  const bool int4 = w.format == QuantFormat::kInt4;
  const int64_t words = int4 ? w.n * w.k / 8 : w.n * w.k / 4;
  const auto* zero_pairs =
      int4 ? reinterpret_cast<const uint16_t*>(static_cast<const uint32_t*>(w.scales) + w.num_groups * w.n / 2) : nullptr;
  const auto* packed = static_cast<const uint32_t*>(w.packed);
  return dispatch_dtype(w.dtype, [&]<typename T>() {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      if (int4) {
        quant_mma_dequantize_kernel<QuantFormat::kInt4, T><<<blocks_of(words, 256), 256, 0, stream>>>(
            packed, w.scales, zero_pairs, w.perm, w.n, w.k, w.group_size, static_cast<T*>(out));
      } else {
        quant_mma_dequantize_kernel<QuantFormat::kInt8, T><<<blocks_of(words, 256), 256, 0, stream>>>(
            packed, w.scales, zero_pairs, w.perm, w.n, w.k, w.group_size, static_cast<T*>(out));
      }
      return cudaGetLastError();
    }
  });
}

cudaError_t quant_mma_gemm(const QuantMmaView& w, const void* x, int64_t tokens, void* y, DType out_dtype,
                           void* x_permuted, cudaStream_t stream, const QuantMmaConfig* config) {
  if (tokens < 1 || tokens > kMaxQuantMmaTokens || !layout_supported(w.format, w.n, w.k, w.group_size, w.num_groups)) {
    return cudaErrorInvalidValue;
  }
  const QuantMmaConfig cfg = config != nullptr ? *config : quant_mma_config(tokens, w.n, w.k);
  if (cfg.token_tiles * 8 < tokens || w.n % (16 * cfg.row_tiles * cfg.warps_n) != 0) return cudaErrorInvalidValue;
  if (w.perm != nullptr) {
    if (x_permuted == nullptr || w.format != QuantFormat::kInt4) return cudaErrorInvalidValue;
    const int64_t total = tokens * w.k;
    const cudaError_t e = dispatch_dtype(w.dtype, [&]<typename T>() {
      if constexpr (std::is_same_v<T, float>) {
        return cudaErrorInvalidValue;
      } else {
        return launch_pdl(permute_columns_kernel<T>, dim3(blocks_of(total, 256)), dim3(256), 0, stream,
                          static_cast<const T*>(x), tokens, w.k, w.perm, static_cast<T*>(x_permuted));
      }
    });
    if (e != cudaSuccess) return e;
    x = x_permuted;
  }
  if (w.format == QuantFormat::kInt4) return launch_format<QuantFormat::kInt4>(cfg, w, x, tokens, y, out_dtype, stream);
  if (w.format == QuantFormat::kInt8) return launch_format<QuantFormat::kInt8>(cfg, w, x, tokens, y, out_dtype, stream);
  return cudaErrorInvalidValue;
}

}  // namespace shardserve::kernels
