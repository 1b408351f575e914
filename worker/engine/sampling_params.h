// SamplingParams: how one request picks its tokens and when it stops, with the conventions users
// of vLLM/OpenAI expect:
// - temperature 0 is greedy (argmax, lowest id on a tie); > 0 samples.
// - top_k 0 or -1 means off; top_p 1 means off (must be in (0, 1]); min_p 0 means off ([0, 1]).
// - repetition_penalty 1 is off (> 0): a token already in the prompt or output has its logit
//   divided by it when positive, multiplied when negative. presence/frequency penalties in
//   [-2, 2] subtract penalty * [count > 0] and penalty * count for tokens in the output.
// - seed: the same seed gives the same tokens whatever else is in the batch (the draw for output
//   token i is a pure function of (seed, i)). Without one, the engine picks a random seed.
// - logprobs: -1 returns none; N >= 0 returns the chosen token's logprob and the top N (N <= 20),
//   computed from the model's raw logits (before penalties, temperature and filtering).
// - max_tokens counts generated tokens; stop_token_ids end the request like EOS does, and the
//   stop token is part of the output; ignore_eos keeps going past EOS (not past stop_token_ids).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"

namespace shardserve {

struct SamplingParams {
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  double presence_penalty = 0.0;
  double frequency_penalty = 0.0;
  std::optional<uint64_t> seed;
  int64_t max_tokens = 16;
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  int64_t logprobs = -1;

  static constexpr int64_t kMaxLogprobs = 20;
};

// INVALID_ARGUMENT with the offending field for anything out of range, including a prompt that
// leaves no room: prompt_len + max_tokens must be <= max_model_len.
absl::Status validate(const SamplingParams& params, int64_t prompt_len, int64_t max_model_len,
                      int64_t vocab_size);

}  // namespace shardserve
