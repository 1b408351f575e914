// Sampling on the GPU: one CTA per sampled row picks the next token from the row's FP32 logits with
// the CPU sampler's semantics (worker/engine/sampler.h), so only token ids and the asked-for
// logprobs leave the device.
//
// The CPU sampler sorts the vocabulary by logit (ties: lower id first) and walks that order: top-k,
// top-p and min-p each keep a prefix of it, and the draw is an inverse-CDF pick over the kept prefix
// with u = counter_uniform(seed, output index). Sorting 128k logits per row per step would cost more
// than the decode step itself, so this kernel never sorts. Every element e gets a 64-bit key,
//   key(e) = (order-preserving bits of -logit) << 32 | id,
// whose ascending order is exactly the CPU's sorted order, and each question the CPU answers by
// walking the sorted array ("the k-th element", "the first element whose running mass reaches X")
// is answered by a radix search over the key, 8 bits a pass: a histogram of the weight (1 per
// element, or its probability) per digit among the elements that match the digits found so far,
// then a scan of the histogram in order. A prefix of the order is represented by its last key
// (`cut`): kept elements are those with key <= cut.
//
// Arithmetic follows the CPU's: probabilities exp(l / T - l_max / T) and their sums in FP64. What
// can differ is the order of the FP64 sums (a tree instead of a running sum), so a draw whose
// target lands within rounding (~1e-16 relative) of a boundary between two tokens may pick the
// other one; and penalties are computed in FP64 as on the CPU but the penalized logit is stored
// back as FP32 (the CPU keeps FP64). Greedy picks are identical.
#include <cfloat>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;

__device__ __forceinline__ uint64_t key_of(float v, int32_t id) {
  const uint32_t b = __float_as_uint(v);
  const uint32_t ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // grows with v
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(id);
}

__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ __forceinline__ uint64_t warp_min_u64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffff, v, o);
    v = other < v ? other : v;
  }
  return v;
}
__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffff, v, o);
    v = other > v ? other : v;
  }
  return v;
}

constexpr int kCandidates = 2048;  // the fast path's sorted head of the distribution

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

struct Shared {
  union {
    double hist[kWarps][kBins];  // per-warp histograms: no atomics across warps
    struct {
      uint64_t key[kCandidates];
      double cum[kCandidates];   // probabilities, then their running sums in sorted order
    } cand;
  };
  int num_cand;
  int fast_result;             // >= 0: the token; -1: the fast path cannot decide
  int counts[8];
  double red_d[kWarps];
  uint64_t red_u[kWarps];
  double before;               // weight of the elements ordered before the current prefix
  uint64_t prefix;
  int found;
  int32_t saved_token;
  float saved_raw;
};

__device__ double block_sum_d(double v, Shared& sh) {
  v = warp_sum_d(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) sh.red_d[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh.red_d[lane] : 0.0;
  return warp_sum_d(v);
}
// The block's minimum (kMax false) or maximum of a 64-bit key.
template <bool kMax>
__device__ uint64_t block_extreme_u64(uint64_t v, Shared& sh) {
  auto reduce = [](uint64_t x) { return kMax ? warp_max_u64(x) : warp_min_u64(x); };
  v = reduce(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) sh.red_u[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh.red_u[lane] : (kMax ? 0 : ~uint64_t{0});
  return reduce(v);
}
__device__ uint64_t block_min_u64(uint64_t v, Shared& sh) { return block_extreme_u64<false>(v, sh); }
__device__ uint64_t block_max_u64(uint64_t v, Shared& sh) { return block_extreme_u64<true>(v, sh); }

// The row being searched: its logits (penalties applied) and l_max / T.
struct Row {
  const float* logits;
  int vocab;
  double top;
};

// Among the elements with key <= cut, in ascending key order, the first whose running weight (itself
// included) is > x (strict) or >= x; false when the whole set's weight does not get there.
template <bool kMass>
__device__ bool select_first(const Row& row, double temperature, double x, bool strict, uint64_t cut, uint64_t* out,
                             Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {
    sh.before = 0.0;
    sh.prefix = 0;
    sh.found = 1;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = lane; b < kBins; b += 32) sh.hist[warp][b] = 0.0;
    __syncthreads();
    const uint64_t prefix = sh.prefix;
    const uint64_t mask = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const float v = row.logits[i];
      const uint64_t k = key_of(v, i);
      if (k <= cut && (k & mask) == prefix) {
        const double w = kMass ? exp(static_cast<double>(v) / temperature - row.top) : 1.0;
        atomicAdd(&sh.hist[warp][(k >> shift) & 0xFF], w);
      }
    }
    __syncthreads();
    // Fold the warps' histograms into warp 0's, then scan the bins in order.
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += sh.hist[w][b];
      sh.hist[0][b] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double acc = sh.before;
      int chosen = -1;
      for (int b = 0; b < kBins; ++b) {
        const double next = acc + sh.hist[0][b];
        if (sh.hist[0][b] > 0.0 && (strict ? next > x : next >= x)) {
          chosen = b;
          break;
        }
        acc = next;
      }
      if (chosen < 0) {
        sh.found = 0;
      } else {
        sh.before = acc;
        sh.prefix = prefix | (static_cast<uint64_t>(chosen) << shift);
      }
    }
    __syncthreads();
    if (!sh.found) return false;
  }
  *out = sh.prefix;
  return true;
}

// The CPU sampler's walk, done exactly on the head of the sorted order. The elements within
// theta of the best logit (in units of T) are a prefix of that order: gathered (at most
// kCandidates), sorted by key, their probabilities summed in order (the CPU's running sums, bit
// for bit), the rest of the vocabulary's mass added once. top-k, top-p, min-p and the draw then
// find their cut by binary search on the running sums. Returns the token, or -1 when a cut falls
// past the head (a flat distribution, top_k beyond it, a draw into the tail): the radix search
// then decides.
__device__ int fast_sample(const float* row, int V, const SamplingRow& p, float l_max, double top, Shared& sh) {
  const double T = p.temperature;
  // How far below the best logit to gather: the widest of 1, 2, 4, ..., 32 (x T) that holds at
  // most kCandidates elements.
  constexpr int kLevels = 6;
  int counts[kLevels] = {0, 0, 0, 0, 0, 0};
  for (int i = threadIdx.x; i < V; i += kThreads) {
    const float z = (l_max - row[i]) / static_cast<float>(T);
#pragma unroll
    for (int j = 0; j < kLevels; ++j) counts[j] += z < static_cast<float>(1 << j) ? 1 : 0;
  }
  if (threadIdx.x < 8) sh.counts[threadIdx.x] = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kLevels; ++j) {
    int c = counts[j];
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);
    if (threadIdx.x % 32 == 0) atomicAdd(&sh.counts[j], c);
  }
  __syncthreads();
  int level = -1;
  for (int j = 0; j < kLevels; ++j) {
    if (sh.counts[j] <= kCandidates) level = j;
  }
  if (level < 0) return -1;
  const float theta = static_cast<float>(1 << level);
  const int n = sh.counts[level];

  // Gather the head's keys (warp-aggregated slots), pad to a power of two, sort ascending.
  if (threadIdx.x == 0) sh.num_cand = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int base = 0; base < V; base += kThreads) {
    const int i = base + static_cast<int>(threadIdx.x);
    const bool in = i < V && (l_max - row[i]) / static_cast<float>(T) < theta;
    const unsigned mask = __ballot_sync(0xffffffff, in);
    int slot = 0;
    if (lane == 0 && mask != 0) slot = atomicAdd(&sh.num_cand, __popc(mask));
    slot = __shfl_sync(0xffffffff, slot, 0);
    const int at = slot + __popc(mask & ((1u << lane) - 1));
    if (in && at < kCandidates) sh.cand.key[at] = key_of(row[i], i);
  }
  __syncthreads();
  if (sh.num_cand != n) return -1;  // (the same test as the count's: never, short of a race)
  int padded = 1;
  while (padded < n) padded <<= 1;
  for (int i = n + static_cast<int>(threadIdx.x); i < padded; i += kThreads) sh.cand.key[i] = ~uint64_t{0};
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = sh.cand.key[i], b = sh.cand.key[j];
          const bool ascending = (i & size) == 0;
          if ((a > b) == ascending) {
            sh.cand.key[i] = b;
            sh.cand.key[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  // Probabilities of the head, in sorted order; the mass of everything else (a tree sum).
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const auto id = static_cast<int32_t>(static_cast<uint32_t>(sh.cand.key[i]));
    sh.cand.cum[i] = exp(static_cast<double>(row[id]) / T - top);
  }
  const int64_t keep0 = p.top_k > 0 ? lmin(V, p.top_k) : V;
  if (keep0 > n && keep0 < V) return -1;  // top_k reaches past the head
  double tail = 0.0;
  int min_p_count = 0;
  if (keep0 > n) {
    for (int i = threadIdx.x; i < V; i += kThreads) {
      const float v = row[i];
      if (!((l_max - v) / static_cast<float>(T) < theta)) tail += exp(static_cast<double>(v) / T - top);
    }
  }
  tail = block_sum_d(tail, sh);  // also orders the probabilities' writes before the reads below
  if (p.min_p > 0.0) {
    int c = 0;
    for (int i = threadIdx.x; i < n; i += kThreads) c += sh.cand.cum[i] >= p.min_p ? 1 : 0;
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);
    if (threadIdx.x == 0) sh.counts[7] = 0;
    __syncthreads();
    if (lane == 0) atomicAdd(&sh.counts[7], c);
    __syncthreads();
    min_p_count = sh.counts[7];
  }
  if (threadIdx.x == 0) {
    // The CPU's running sums, in its order.
    double acc = 0.0;
    for (int i = 0; i < n; ++i) sh.cand.cum[i] = acc += sh.cand.cum[i];
    const double* cum = sh.cand.cum;
    // First i < limit with cum[i] >= x (or > x when strict); limit when none.
    auto first_reaching = [&](int limit, double x, bool strict) {
      int lo = 0, hi = limit;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (strict ? cum[mid] > x : cum[mid] >= x) hi = mid; else lo = mid + 1;
      }
      return lo;
    };
    int result = -1;
    const double total0 = keep0 <= n ? cum[keep0 - 1] : cum[n - 1] + tail;
    int64_t keep1 = keep0;
    bool ok = true;
    if (p.top_p < 1.0) {
      const double x = p.top_p * total0;
      const int64_t limit = lmin(keep0, n);
      const int i = first_reaching(static_cast<int>(limit), x, false);
      if (i < limit) keep1 = i + 1;
      else ok = keep0 <= n;  // the CPU's loop ends at keep0 too; else it goes on into the tail
    }
    int64_t keep2 = keep1;
    if (ok && p.min_p > 0.0) {
      // Probabilities fall along the order: the kept ones are the leading min_p_count.
      const int64_t limit = lmin(keep1, n);
      if (min_p_count < limit || keep1 <= n) keep2 = lmax(1, lmin(min_p_count, limit));
      else ok = false;
    }
    if (ok) {
      const double total = keep2 <= n ? cum[keep2 - 1] : total0;
      const double target = counter_uniform(p.seed, p.counter) * total;
      const int64_t limit = lmin(keep2, n);
      const int i = first_reaching(static_cast<int>(limit), target, true);
      if (i < limit) result = static_cast<int32_t>(static_cast<uint32_t>(sh.cand.key[i]));
      else if (keep2 <= n) result = static_cast<int32_t>(static_cast<uint32_t>(sh.cand.key[keep2 - 1]));
    }
    sh.fast_result = result;
  }
  __syncthreads();
  const int result = sh.fast_result;
  __syncthreads();  // the candidates' memory is the slow path's histograms
  return result;
}

// This thread's smallest key over the row (the block's minimum is the row's top logit, lowest id
// first): 16-byte loads, sixteen in flight, when the row allows (one thread walking 250 scalars one
// load at a time made a batch-1 greedy pick over 128k logits take 26 us).
__device__ __forceinline__ uint64_t thread_min_key(const float* row, int V) {
  uint64_t best = ~uint64_t{0};
  if (V % 4 == 0 && aligned(row, 16)) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll 16
    for (int i = threadIdx.x; i < V / 4; i += kThreads) {
      const float4 v = r4[i];
      best = min(best, min(min(key_of(v.x, 4 * i), key_of(v.y, 4 * i + 1)), min(key_of(v.z, 4 * i + 2), key_of(v.w, 4 * i + 3))));
    }
    return best;
  }
  for (int i = threadIdx.x; i < V; i += kThreads) best = min(best, key_of(row[i], i));
  return best;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(float* logits, int64_t vocab, const SamplingRow* params,
                                                          const PenaltyEntry* entries, float* saved_raw,
                                                          int32_t* tokens, float* logprobs, int32_t* top_ids,
                                                          float* top_logprobs) {
  __shared__ Shared sh;
  const int r = blockIdx.x;
  const SamplingRow p = params[r];
  float* row = logits + static_cast<int64_t>(r) * vocab;
  const int V = static_cast<int>(vocab);

  // Logprobs come from the raw logits, before penalties and temperature.
  double log_z = 0.0;
  if (p.num_logprobs >= 0) {
    const uint64_t best = block_min_u64(thread_min_key(row, V), sh);
    const float max = row[static_cast<uint32_t>(best)];
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += kThreads) s += exp(static_cast<double>(row[i]) - static_cast<double>(max));
    s = block_sum_d(s, sh);
    log_z = static_cast<double>(max) + log(s);
    // The top N by (logit desc, id asc): the smallest keys, one at a time.
    uint64_t prev = 0;
    const int n = min(p.num_logprobs, min(kMaxSampledLogprobs, V));
    for (int j = 0; j < n; ++j) {
      uint64_t k = ~uint64_t{0};
      for (int i = threadIdx.x; i < V; i += kThreads) {
        const uint64_t ki = key_of(row[i], i);
        if ((j == 0 || ki > prev) && ki < k) k = ki;
      }
      k = block_min_u64(k, sh);
      prev = k;
      if (threadIdx.x == 0) {
        const auto id = static_cast<int32_t>(static_cast<uint32_t>(k));
        top_ids[r * kMaxSampledLogprobs + j] = id;
        top_logprobs[r * kMaxSampledLogprobs + j] = static_cast<float>(static_cast<double>(row[id]) - log_z);
      }
    }
  }

  // Penalties, in place (each entry is a distinct token); the raw value is kept for the logprob.
  const bool penalized = p.penalty_end > p.penalty_begin;
  if (penalized) {
    __syncthreads();
    for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kThreads) {
      const int32_t t = entries[e].token;
      const float raw = row[t];
      saved_raw[e] = raw;
      double l = raw;
      if (p.repetition_penalty != 1.0) l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
      const int32_t count = entries[e].output_count;
      if (count > 0) l -= p.frequency_penalty * static_cast<double>(count) + p.presence_penalty;
      row[t] = static_cast<float>(l);
    }
    __syncthreads();
  }

  int32_t chosen = 0;
  if (p.temperature == 0.0) {
    chosen = static_cast<int32_t>(static_cast<uint32_t>(block_min_u64(thread_min_key(row, V), sh)));
  } else {
    const uint64_t first = block_min_u64(thread_min_key(row, V), sh);
    Row rw{row, V, static_cast<double>(row[static_cast<uint32_t>(first)]) / p.temperature};
    const double T = p.temperature;
    const int fast = fast_sample(row, V, p, row[static_cast<uint32_t>(first)], rw.top, sh);
    if (fast >= 0) {
      chosen = fast;
    } else {
      auto kept_mass = [&](uint64_t cut) {
        double s = 0.0;
        for (int i = threadIdx.x; i < V; i += kThreads) {
          const float v = row[i];
          if (key_of(v, i) <= cut) s += exp(static_cast<double>(v) / T - rw.top);
        }
        return block_sum_d(s, sh);
      };
      uint64_t cut = ~uint64_t{0};
      if (p.top_k > 0 && p.top_k < V) {
        uint64_t k = 0;
        if (select_first<false>(rw, T, static_cast<double>(p.top_k - 1), true, cut, &k, sh)) cut = k;
      }
      if (p.top_p < 1.0) {
        const double x = p.top_p * kept_mass(cut);
        uint64_t k = 0;
        if (select_first<true>(rw, T, x, false, cut, &k, sh)) cut = k;
      }
      if (p.min_p > 0.0) {
        // The first kept element has probability exp(0) = 1: keep those >= min_p, at least one.
        double c = 0.0;
        for (int i = threadIdx.x; i < V; i += kThreads) {
          const float v = row[i];
          if (key_of(v, i) <= cut && exp(static_cast<double>(v) / T - rw.top) >= p.min_p) c += 1.0;
        }
        c = block_sum_d(c, sh);
        uint64_t k = 0;
        if (select_first<false>(rw, T, c < 1.0 ? 0.0 : c - 1.0, true, cut, &k, sh)) cut = k;
      }
      const double target = counter_uniform(p.seed, p.counter) * kept_mass(cut);
      uint64_t k = 0;
      if (!select_first<true>(rw, T, target, true, cut, &k, sh)) {
        // Rounding put the target past the end: the last kept element, as the CPU does.
        uint64_t last = 0;
        for (int i = threadIdx.x; i < V; i += kThreads) {
          const uint64_t ki = key_of(row[i], i);
          if (ki <= cut && ki > last) last = ki;
        }
        k = block_max_u64(last, sh);
      }
      chosen = static_cast<int32_t>(static_cast<uint32_t>(k));
    }
  }

  if (p.num_logprobs >= 0) {
    float raw = row[chosen];
    if (penalized) {
      if (threadIdx.x == 0) sh.saved_token = -1;
      __syncthreads();
      for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kThreads) {
        if (entries[e].token == chosen) {
          sh.saved_token = chosen;
          sh.saved_raw = saved_raw[e];
        }
      }
      __syncthreads();
      if (sh.saved_token == chosen) raw = sh.saved_raw;
    }
    if (threadIdx.x == 0) logprobs[r] = static_cast<float>(static_cast<double>(raw) - log_z);
  }
  if (threadIdx.x == 0) tokens[r] = chosen;
}

}  // namespace

cudaError_t sample_rows(float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
                        const PenaltyEntry* entries, float* saved_raw, int32_t* tokens, float* logprobs,
                        int32_t* top_ids, float* top_logprobs, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (vocab <= 0 || vocab > INT32_MAX) return cudaErrorInvalidValue;
  sample_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, params, entries, saved_raw, tokens,
                                                                     logprobs, top_ids, top_logprobs);
  return cudaGetLastError();
}

}  // namespace shardserve::kernels
