#include "worker/engine/sampling_params.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace shardserve {

absl::Status validate(const SamplingParams& p, int64_t prompt_len, int64_t max_model_len,
                      int64_t vocab_size) {
  auto bad = [](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (!std::isfinite(p.temperature) || p.temperature < 0) return bad("temperature must be >= 0, got ", p.temperature);
  if (p.top_k < -1) return bad("top_k must be -1 or 0 (off) or a positive count, got ", p.top_k);
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) return bad("top_p must be in (0, 1], got ", p.top_p);
  if (!(p.min_p >= 0.0 && p.min_p <= 1.0)) return bad("min_p must be in [0, 1], got ", p.min_p);
  if (!(p.repetition_penalty > 0.0) || !std::isfinite(p.repetition_penalty))
    return bad("repetition_penalty must be > 0, got ", p.repetition_penalty);
  if (!(p.presence_penalty >= -2.0 && p.presence_penalty <= 2.0))
    return bad("presence_penalty must be in [-2, 2], got ", p.presence_penalty);
  if (!(p.frequency_penalty >= -2.0 && p.frequency_penalty <= 2.0))
    return bad("frequency_penalty must be in [-2, 2], got ", p.frequency_penalty);
  if (p.max_tokens <= 0) return bad("max_tokens must be >= 1, got ", p.max_tokens);
  if (p.logprobs < -1 || p.logprobs > SamplingParams::kMaxLogprobs)
    return bad("logprobs must be between 0 and ", SamplingParams::kMaxLogprobs, " (or -1 for none), got ", p.logprobs);
  for (int64_t id : p.stop_token_ids) {
    if (id < 0 || id >= vocab_size) return bad("stop_token_ids: ", id, " is outside the vocabulary [0, ", vocab_size, ")");
  }
  if (prompt_len <= 0) return bad("the prompt has no tokens");
  if (prompt_len + p.max_tokens > max_model_len) {
    return bad("prompt (", prompt_len, " tokens) + max_tokens (", p.max_tokens,
               ") exceeds the maximum model length of ", max_model_len, " tokens");
  }
  return absl::OkStatus();
}

}  // namespace shardserve
