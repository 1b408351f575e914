// How many CTAs split each (sequence, KV head) of a decode-only step along its context
// (flash-decoding): enough for about two CTAs per SM over the whole step, at most 32 (measured:
// aiming at four made batch 8 and 32 slower, 28 -> 30 and 60 -> 70 us per layer at 512 tokens). A function
// of the step's shape alone, never of the contexts, so a captured CUDA graph stays valid as
// sequences grow. One definition for the CUDA backend and the memory planner (the partials it sizes
// live in the activation arena).
#pragma once

#include <algorithm>
#include <cstdint>

namespace shardserve {

inline int64_t decode_attention_splits(int64_t tokens, int64_t kv_heads, int64_t num_sms) {
  const int64_t ctas = std::max<int64_t>(tokens * kv_heads, 1);
  return std::clamp<int64_t>(2 * num_sms / ctas, 1, 32);
}

}  // namespace shardserve
