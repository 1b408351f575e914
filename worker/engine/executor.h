// StepExecutor: what the Engine needs from the model side — run one Batch, return the sampled
// rows' logits — whether that is one rank in this process (ModelRunner), a tensor-parallel group
// of CPU ranks (threads), or the rank 0 of a group of GPU processes.
//
// load_model() is the one place that turns options (checkpoint, backend, TP size, cache budget)
// into a ready executor; the CLI, the worker and the tests all go through it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/batch.h"
#include "worker/model/config.h"

namespace shardserve {

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  // Logits [num sampled sequences * vocab_size], FP32, in batch order.
  virtual std::vector<float> execute(const Batch& batch) = 0;
  virtual const ModelConfig& config() const = 0;
  virtual int64_t num_blocks() const = 0;
  virtual int64_t block_size() const = 0;
  int64_t vocab_size() const { return config().vocab_size; }
};

struct ExecutorOptions {
  std::string model_dir;
  std::string backend = "cpu";
  int tp_size = 1;
  int64_t block_size = 16;
  // KV-cache blocks; 0 sizes the cache from kv_cache_bytes (per rank).
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_bytes = int64_t{256} << 20;
};

struct LoadedModel {
  ModelConfig config;
  GenerationConfig generation;
  std::unique_ptr<StepExecutor> executor;
};

absl::StatusOr<LoadedModel> load_model(const ExecutorOptions& options);

}  // namespace shardserve
