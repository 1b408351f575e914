#include "worker/engine/greedy.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace shardserve {

absl::StatusOr<GreedyOutput> generate_greedy(StepExecutor& runner, const std::vector<int32_t>& prompt,
                                             const GreedyOptions& options) {
  const ModelConfig& config = runner.config();
  const auto prompt_len = static_cast<int64_t>(prompt.size());
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", prompt[i],
                                                     ", outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  if (options.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be at least 1");
  if (prompt_len >= config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", prompt_len,
                                                   " tokens; the model takes at most ",
                                                   config.max_position_embeddings - 1, " to generate from"));
  }
  const int64_t max_tokens = std::min(options.max_tokens, config.max_position_embeddings - prompt_len);
  const int64_t needed_blocks = (prompt_len + max_tokens + runner.block_size() - 1) / runner.block_size();
  if (needed_blocks > runner.num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("prompt + max_tokens needs ", needed_blocks,
                                                     " KV blocks; the cache has ", runner.num_blocks()));
  }

  SequenceStep step;
  step.block_table.resize(static_cast<size_t>(needed_blocks));
  std::iota(step.block_table.begin(), step.block_table.end(), 0);
  const int64_t chunk = options.prefill_chunk > 0 ? options.prefill_chunk : prompt_len;

  GreedyOutput out;
  std::vector<float> logits;
  for (int64_t begin = 0; begin < prompt_len; begin += chunk) {
    const int64_t end = std::min(prompt_len, begin + chunk);
    step.token_ids.assign(prompt.begin() + begin, prompt.begin() + end);
    step.num_cached = static_cast<int32_t>(begin);
    step.sample = end == prompt_len;
    logits = runner.execute(Batch{{step}});
  }
  step.num_cached = static_cast<int32_t>(prompt_len);
  while (true) {
    const auto next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.token_ids.push_back(next);
    if (options.return_logits) out.logits.push_back(logits);
    const bool is_eos = std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), next) !=
                        options.stop_token_ids.end();
    if (is_eos && !options.ignore_eos) {
      out.finish_reason = "stop";
      break;
    }
    if (static_cast<int64_t>(out.token_ids.size()) >= max_tokens) {
      out.finish_reason = "length";
      break;
    }
    step.token_ids = {next};
    logits = runner.execute(Batch{{step}});
    ++step.num_cached;
  }
  return out;
}

}  // namespace shardserve
