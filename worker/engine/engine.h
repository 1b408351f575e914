// Engine: requests in, tokens out. Owns the sequences, the BlockManager and the Scheduler, and
// drives a StepExecutor one step at a time:
//   Scheduler.schedule() -> Batch -> StepExecutor.execute -> sample -> Scheduler.update
// Many requests at once, each getting exactly what it would have got alone (greedy or seeded).
//
// Threading: an Engine is driven by one thread; the worker service serialises submit/abort with
// step. Output is delivered as per-step deltas, in the order requests were scheduled.
#pragma once

#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/executor.h"
#include "worker/engine/sampler.h"
#include "worker/engine/scheduler.h"

namespace shardserve {

struct EngineConfig {
  SchedulerConfig scheduler;
  int64_t max_model_len = 0;  // 0: the model's max_position_embeddings
  bool enable_prefix_caching = true;
  std::vector<int64_t> eos_token_ids;
};

struct Request {
  std::string request_id;
  std::vector<int32_t> prompt_token_ids;
  SamplingParams params;
};

// What one request produced in one step.
struct RequestOutput {
  std::string request_id;
  std::vector<int32_t> new_token_ids;
  std::vector<TokenLogprobs> new_logprobs;
  bool finished = false;
  std::string finish_reason;  // when finished: "stop", "length", "abort" or "error"
  std::string error;          // finish_reason "error": why the step that ran this request failed
  int64_t num_prompt_tokens = 0;
  int64_t num_output_tokens = 0;
  int64_t num_cached_prompt_tokens = 0;
};

struct EngineStats {
  size_t num_waiting = 0;
  size_t num_running = 0;
  int64_t num_free_blocks = 0;
  int64_t num_blocks = 0;
  int64_t num_preemptions = 0;
  int64_t prefix_cache_hits = 0;     // blocks
  int64_t prefix_cache_queries = 0;  // blocks
};

class Engine {
 public:
  Engine(StepExecutor& runner, const EngineConfig& config);

  // Validates and queues a request. INVALID_ARGUMENT for bad parameters or ids, ALREADY_EXISTS for
  // a request_id in flight, RESOURCE_EXHAUSTED when prompt + max_tokens could never fit in the cache.
  absl::Status submit(Request request);
  // Ends a request now, freeing its blocks; its last output (finish_reason "abort") comes from the
  // next step(). NOT_FOUND for an unknown or finished request.
  absl::Status abort(const std::string& request_id);
  // Runs one step; returns the outputs of every request that produced something or ended. A step
  // the executor could not run (StepError) ends the requests it held with finish_reason "error"
  // and leaves the engine serving; any other exception from the executor propagates.
  std::vector<RequestOutput> step();
  bool has_unfinished() const { return !sequences_.empty(); }
  EngineStats stats() const;
  int64_t max_model_len() const { return max_model_len_; }

 private:
  StepExecutor& runner_;
  EngineConfig config_;
  int64_t max_model_len_;
  BlockManager blocks_;
  Scheduler scheduler_;
  std::unordered_map<std::string, std::unique_ptr<Sequence>> sequences_;
  std::vector<std::unique_ptr<Sequence>> aborted_;  // reported by the next step
  int64_t next_id_ = 0;
  std::mt19937_64 seed_source_{std::random_device{}()};
};

// Submits every request to one engine, steps until all finish, and returns each request's
// complete output in input order. The first submit error is returned (nothing runs).
absl::StatusOr<std::vector<RequestOutput>> run_to_completion(Engine& engine, std::vector<Request> requests);

}  // namespace shardserve
