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
#include "worker/engine/sampler.h"
#include "worker/model/config.h"

namespace shardserve {

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  // Logits [num sampled sequences * vocab_size], FP32, in batch order.
  virtual std::vector<float> execute(const Batch& batch) = 0;
  // Runs the batch and picks the next token of every sequence whose step samples: sampled[i] is
  // the i-th of them in batch order (its parameters, seed and tokens). Results in the same order.
  // What the engine calls: a GPU rank samples on the device, so only token ids (and the asked-for
  // logprobs) leave it. Default: execute() and the CPU sampler.
  virtual std::vector<SampleResult> execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled);
  virtual const ModelConfig& config() const = 0;
  virtual int64_t num_blocks() const = 0;
  virtual int64_t block_size() const = 0;
  int64_t vocab_size() const { return config().vocab_size; }
};

struct ExecutorOptions {
  std::string model_dir;
  // A preset (llama-3.1-8b, llama-3.1-70b, ...) or config.json path: random weights made on the
  // device instead of model_dir's checkpoint.
  std::string synthetic;
  std::string backend = "cpu";  // cpu or cuda
  // Activation and KV-cache dtype: "auto" (the checkpoint's), "bfloat16", "float16", or "float32"
  // (exact checking on the GPU). The CPU backend always computes in float32.
  std::string dtype = "auto";
  // "" or "none": the checkpoint's linear layers as published (16-bit, AWQ, GPTQ or FP8, from its
  // config); awq, gptq, fp8: the same, checked to be that format; fp8 or int8 on a 16-bit
  // checkpoint: quantized per output channel at load. A request that conflicts with the
  // checkpoint is an INVALID_ARGUMENT. With `synthetic`: random weights in that format.
  std::string quantization;
  int tp_size = 1;
  int device = 0;
  int64_t block_size = 16;
  // KV-cache blocks; 0 sizes the cache: from kv_cache_bytes on the CPU, from the memory plan on
  // the GPU (what gpu_memory_utilization of the device leaves after weights and activations).
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_bytes = int64_t{256} << 20;
  double gpu_memory_utilization = 0.90;
  int64_t max_model_len = 0;  // 0: the model's max_position_embeddings
  // The largest step the activation arena must hold (the engine's limits).
  int64_t max_num_batched_tokens = 2048;
  int64_t max_num_seqs = 256;
  bool cuda_graphs = true;
  // cpu backend: FP8 layers quantize their activations as the CUDA backend's W8A8 path does
  // (worker/runtime/backend.h, kW8A8MinTokens), the oracle a GPU with FP8 tensor cores is held to.
  bool cpu_w8a8 = false;
};

struct LoadedModel {
  ModelConfig config;
  GenerationConfig generation;
  std::unique_ptr<StepExecutor> executor;
};

// The model's config and generation settings for these options, validated (no weights, no
// executor): what every rank of a group checks before it builds itself.
absl::StatusOr<LoadedModel> describe_model(const ExecutorOptions& options);

// tp_size > 1 builds a TpExecutor (CPU ranks as threads), else one rank in this process.
absl::StatusOr<LoadedModel> load_model(const ExecutorOptions& options);

// KV-cache blocks per rank: options.num_kv_blocks, or as many as kv_cache_bytes holds.
// RESOURCE_EXHAUSTED when that is not even one block.
absl::StatusOr<int64_t> kv_cache_blocks(const ExecutorOptions& options, int64_t kv_bytes_per_token);

}  // namespace shardserve
