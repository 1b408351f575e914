// Sequence: one request's tokens and its place in the engine.
//
// Status transitions (each written where it happens):
//   waiting -> running            Scheduler::schedule admits it (blocks allocated)
//   running -> waiting            Scheduler preempts it (blocks freed; recomputed later)
//   running -> finished           Scheduler::update sees EOS, a stop token, max_tokens or the
//                                 model length (blocks freed)
//   waiting|running -> aborted    Scheduler::abort (blocks freed at once)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "worker/engine/sampling_params.h"

namespace shardserve {

enum class SequenceStatus { kWaiting, kRunning, kFinished, kAborted };

struct TokenLogprobs {
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // best first
};

struct Sequence {
  int64_t id = 0;
  std::string request_id;
  std::vector<int32_t> tokens;  // prompt, then generated
  int64_t num_prompt_tokens = 0;
  SamplingParams params;
  uint64_t seed = 0;  // params.seed, or one the engine drew
  SequenceStatus status = SequenceStatus::kWaiting;

  std::vector<int32_t> block_table;
  int64_t num_computed_tokens = 0;  // tokens whose K/V is in the cache
  int64_t num_hashed_blocks = 0;    // leading full blocks registered in the prefix cache
  uint64_t last_block_hash = 0;     // chained hash of block num_hashed_blocks - 1
  int64_t num_cached_prompt_tokens = 0;  // prefix-cache hits at the last admission
  int64_t num_preemptions = 0;
  std::string finish_reason;  // "stop", "length", "abort"

  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_output_tokens() const { return size() - num_prompt_tokens; }
  bool is_finished() const { return status == SequenceStatus::kFinished || status == SequenceStatus::kAborted; }
};

}  // namespace shardserve
