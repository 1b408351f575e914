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
#include "worker/runtime/sampling_row.h"  // counter_uniform: one definition for the CPU and the GPU

namespace shardserve {

struct SampleResult {
  int32_t token_id = 0;
  TokenLogprobs logprobs;  // filled when seq.params.logprobs >= 0
};

// `logits` is the model's raw output for seq's next position (vocab_size values).
SampleResult sample(const Sequence& seq, const float* logits, int64_t vocab_size);

// The same sampling as a device sampler's input (kernels/sampling.cu): the row's parameters, and the
// sequence's penalty entries appended to `entries` (none when no penalty is on).
SamplingRow device_sampling_row(const Sequence& seq, std::vector<PenaltyEntry>& entries);

// What a device sampler returned for `rows` (in the same order), as the CPU sampler returns it:
// the token, and its logprob and the top num_logprobs where the row asked for them.
std::vector<SampleResult> sample_results(const std::vector<SamplingRow>& rows, const SampledRows& out);

}  // namespace shardserve
