// ModelRunner: owns the KV cache and turns a host Batch into one forward pass.
//
// It builds the flat step inputs (token ids, positions, slot mapping, block tables, query start
// locations), uploads them, runs the model, and returns the sampled rows' logits on the host.
// Invariant: every block id in a Batch is < num_blocks and covers the positions it is used for;
// a Batch that breaks it is a programming error (std::logic_error), since the scheduler
// validates requests before they reach here.
#pragma once

#include <vector>

#include "worker/engine/batch.h"
#include "worker/engine/executor.h"
#include "worker/model/llama.h"

namespace shardserve {

class ModelRunner final : public StepExecutor {
 public:
  ModelRunner(LlamaModel& model, Backend& backend, int64_t num_blocks, int64_t block_size);

  // Logits [num sampled sequences * vocab_size], FP32, in batch order.
  std::vector<float> execute(const Batch& batch) override;

  int64_t num_blocks() const override { return num_blocks_; }
  int64_t block_size() const override { return block_size_; }
  const ModelConfig& config() const override { return model_.config(); }

 private:
  LlamaModel& model_;
  Backend& backend_;
  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<KvLayer> kv_cache_;
};

}  // namespace shardserve
