// One sampled row's parameters as the device sampler reads them (kernels/sampling.cu), the
// penalty entries of its sequence, and what it returns: plain data shared by the host (worker/engine/model_runner.cc
// packs it) and the kernel. The semantics are the CPU sampler's (worker/engine/sampler.h).
#pragma once

#include <cstdint>
#include <vector>

#include "worker/runtime/synthetic_uniform.h"  // SHARDSERVE_HOST_DEVICE

namespace shardserve {

struct SamplingRow {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // 1: off
  double min_p = 0.0;        // 0: off
  double repetition_penalty = 1.0;
  double presence_penalty = 0.0;
  double frequency_penalty = 0.0;
  uint64_t seed = 0;
  uint64_t counter = 0;         // the output index this draw is for
  int32_t top_k = 0;            // <= 0: off
  int32_t num_logprobs = -1;    // -1: none; else the chosen token's and the top N (N <= 20)
  int32_t penalty_begin = 0;    // this row's penalty entries: [begin, end)
  int32_t penalty_end = 0;
};

// A token of the sequence (prompt or output; each token once) with its count in the output:
// repetition_penalty applies to every entry, presence/frequency to those with output_count > 0.
struct PenaltyEntry {
  int32_t token = 0;
  int32_t output_count = 0;
};

// Uniform in [0, 1) from (seed, counter), splitmix64-based: the draw of a seeded request's output
// token `counter`. One definition for the CPU sampler and the device sampler.
SHARDSERVE_HOST_DEVICE inline double counter_uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (counter + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

inline constexpr int kMaxSampledLogprobs = 20;

// What a device sampler returns for n rows: token_ids[n]; when any row asked for logprobs, also
// logprobs[n] (the chosen token's) and top_ids / top_logprobs [n, kMaxSampledLogprobs] (the first
// num_logprobs of row r's are set).
struct SampledRows {
  std::vector<int32_t> token_ids;
  std::vector<float> logprobs;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
};

}  // namespace shardserve
