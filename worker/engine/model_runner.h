// ModelRunner: owns the KV cache and turns a host Batch into one forward pass.
//
// It packs the step inputs (token ids, positions, slot mapping, block tables, query start
// locations, logits rows) into one host buffer, copies it to the device in one transfer, runs the
// model, and returns the sampled rows' logits on the host.
// Sampling: execute_and_sample() picks each sampled sequence's token on the backend that holds the
// logits (the GPU sampler of kernels/sampling.cu), so a decode step copies back a few bytes per
// sequence instead of its FP32 logits (66 MB at batch 128 with a 128k vocabulary).
// Decode-only steps of up to kMaxGraphBatch (worker/model/memory_plan.h) sequences are padded to a batch-size bucket (1, 2, 4,
// 8, 16, then multiples of 16) with a fixed block-table width, so each bucket's step is one
// captured CUDA graph replayed with new inputs (on backends that support graphs): at batch 1 the
// launch overhead of hundreds of small kernels would otherwise rival the weight reads. Padding
// rows read block 0 position 0, write nothing (slot -1), and are dropped from the result.
// Invariant: every block id in a Batch is < num_blocks and covers the positions it is used for;
// a Batch that breaks it is a programming error (std::logic_error), since the scheduler
// validates requests before they reach here.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "worker/engine/batch.h"
#include "worker/engine/executor.h"
#include "worker/model/llama.h"
#include "worker/model/memory_plan.h"

namespace shardserve {

class ModelRunner final : public StepExecutor {
 public:
  // max_model_len (0: the model's) bounds positions and sets the graphs' block-table width.
  ModelRunner(LlamaModel& model, Backend& backend, int64_t num_blocks, int64_t block_size,
              int64_t max_model_len = 0, bool use_graphs = true);

  // Logits [num sampled sequences * vocab_size], FP32, in batch order.
  std::vector<float> execute(const Batch& batch) override;
  // The step, then sampling on the backend where it can (only ids and asked-for logprobs are
  // copied back), else on the host from the downloaded logits.
  std::vector<SampleResult> execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) override;
  // The step alone, its logits left on the device (a tensor-parallel follower's step).
  void execute_only(const Batch& batch);

  int64_t num_blocks() const override { return num_blocks_; }
  int64_t block_size() const override { return block_size_; }
  const ModelConfig& config() const override { return model_.config(); }
  size_t num_graphs() const { return graphs_.size(); }

 private:
  struct Graph {
    int runs = 0;                  // the first run is not captured: it creates GEMM plans
    std::shared_ptr<void> graph;   // then captured once, replayed from then on
    Tensor logits;                 // where the captured step leaves its logits
  };

  // Runs the step; the logits of the first `num_sampled` rows of the result are the sampled ones.
  Tensor run(const Batch& batch, int64_t& num_sampled);

  LlamaModel& model_;
  Backend& backend_;
  int64_t num_blocks_;
  int64_t block_size_;
  int64_t max_model_len_;
  bool use_graphs_;
  std::vector<KvLayer> kv_cache_;
  std::map<int64_t, Graph> graphs_;  // by padded batch size
};

}  // namespace shardserve
