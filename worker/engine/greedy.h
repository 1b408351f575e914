// generate_greedy: one sequence, greedy decoding, straight on a StepExecutor. This is the
// no-scheduler path `shardserve generate` and the golden tests use: the prompt is prefilled (in
// chunks of `prefill_chunk` tokens when set, exercising chunked prefill), then one token per step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/executor.h"

namespace shardserve {

struct GreedyOptions {
  int64_t max_tokens = 16;
  bool ignore_eos = false;
  std::vector<int64_t> stop_token_ids;  // EOS ids; generation stops after emitting one
  int64_t prefill_chunk = 0;            // 0: the whole prompt in one step
  bool return_logits = false;
};

struct GreedyOutput {
  std::vector<int32_t> token_ids;  // generated ids, prompt excluded, the stop token included
  std::string finish_reason;       // "stop" (an EOS id) or "length"
  std::vector<std::vector<float>> logits;  // per generated token, when return_logits
};

// Tokens are taken by argmax (the lowest id on a tie). INVALID_ARGUMENT for an empty prompt, ids
// outside the vocabulary, or a prompt that leaves no room below max_position_embeddings;
// RESOURCE_EXHAUSTED when the cache has too few blocks for prompt + max_tokens.
absl::StatusOr<GreedyOutput> generate_greedy(StepExecutor& runner, const std::vector<int32_t>& prompt,
                                             const GreedyOptions& options);

}  // namespace shardserve
