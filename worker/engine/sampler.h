// Sampler: the CPU reference for turning one sequence's logits into its next token, with the
// semantics documented in sampling_params.h. The CUDA sampler must match it.
//
// Order: penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw.
// The draw is an inverse-CDF pick over the kept tokens sorted by probability (ties by id), with
// u = counter_uniform(seed, output index): a pure function of the request's seed and position,
// so batching, preemption and recompute never change a seeded request's tokens.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/engine/sequence.h"

namespace shardserve {

// Uniform in [0, 1) from (seed, counter), splitmix64-based.
double counter_uniform(uint64_t seed, uint64_t counter);

struct SampleResult {
  int32_t token_id = 0;
  TokenLogprobs logprobs;  // filled when seq.params.logprobs >= 0
};

// `logits` is the model's raw output for seq's next position (vocab_size values).
SampleResult sample(const Sequence& seq, const float* logits, int64_t vocab_size);

}  // namespace shardserve
