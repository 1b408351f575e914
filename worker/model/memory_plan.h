// MemoryPlan: what one GPU of a worker group holds, computed from the model's shape before any
// memory is touched: weights (per quantization format and tensor-parallel shard), the activation
// arena, the CUDA context, and the KV cache that gets what gpu_memory_utilization leaves.
//
//   kv_cache = gpu_memory_utilization x total - weights - activations - overhead
//
// `shardserve plan` prints it; the CUDA worker prints it at start-up beside what it measured
// (worker/engine/executor.cc), so a wrong prediction shows at a glance. The weights and the
// activation arena follow the worker's own allocations term by term (see memory_plan.cc); the
// overhead (CUDA context, cuBLASLt workspace, NCCL buffers) is an estimate, the one number the
// worker cannot know before it runs.
//
// Pure arithmetic: no CUDA, no files (the caller brings a ModelConfig from a checkpoint or preset).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/config.h"
#include "worker/runtime/dtype.h"

namespace shardserve {

// A GPU as the planner sees it: the total that cudaMemGetInfo reports (what gpu_memory_utilization
// multiplies), and its SM count (it sets how decode attention splits, i.e. its scratch).
struct GpuSpec {
  std::string name;
  int64_t total_bytes = 0;
  int num_sms = 132;
};

// "a100-80gb", "h100-80gb", "h200", or a number of GiB ("47.5"). The presets are the totals the
// CUDA runtime reports, below the marketing size (80 GB boards report ~79.1-79.2 GiB).
absl::StatusOr<GpuSpec> gpu_spec(const std::string& name_or_gib);
std::vector<std::string> gpu_names();

struct PlanOptions {
  // none (16-bit weights), fp8 (W8A8), int8 (weight-only), awq or gptq (INT4, group_size).
  std::string quantization = "none";
  int tp_size = 1;
  double gpu_memory_utilization = 0.90;
  int64_t max_model_len = 0;  // 0: the model's max_position_embeddings
  // Activations (and 16-bit weights) are in this dtype: the checkpoint's, as the worker does.
  DType activation_dtype = DType::kBF16;
  // auto (= activation_dtype), bfloat16, float16, float32 or fp8.
  std::string kv_cache_dtype = "auto";
  int64_t block_size = 16;
  // The warm-up step shapes the worker measures its activation arena with (the engine limits).
  int64_t max_num_batched_tokens = 2048;
  int64_t max_num_seqs = 256;
  int64_t group_size = 128;  // AWQ/GPTQ
};

// Weight bytes on one GPU, by part.
struct WeightBytes {
  int64_t linear = 0;        // qkv, o, gate/up, down of every layer: the quantized part
  int64_t linear_meta = 0;   // their scales / zero points / g_idx
  int64_t embedding = 0;     // vocab-parallel, 16-bit
  int64_t lm_head = 0;       // vocab-parallel, 16-bit (a tied head is a second copy, as the worker loads it)
  int64_t norms = 0;         // replicated, 16-bit
  int64_t rope_table = 0;    // cos/sin, FP32, max_position_embeddings x head_dim
  int64_t total() const { return linear + linear_meta + embedding + lm_head + norms + rope_table; }
};

struct MemoryPlan {
  std::string gpu;
  int64_t gpu_total_bytes = 0;
  std::string quantization;
  int tp_size = 1;
  double gpu_memory_utilization = 0;
  int64_t max_model_len = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads_per_rank = 0;
  std::string kv_cache_dtype;  // resolved: bfloat16, float16, float32 or fp8

  int64_t budget_bytes = 0;  // gpu_memory_utilization x total
  WeightBytes weights;
  int64_t weights_bytes_per_gpu = 0;
  int64_t activation_bytes = 0;  // the scratch arena the worker reserves after its warm-up
  int64_t overhead_bytes = 0;    // CUDA context, cuBLASLt workspace, NCCL (estimate)
  int64_t kv_bytes_per_token = 0;
  int64_t kv_cache_bytes = 0;      // whole blocks only
  int64_t kv_capacity_tokens = 0;  // whole blocks only
  int64_t max_concurrent_seqs = 0; // sequences of max_model_len that fit at once
  bool fits = false;
  std::string reason;  // why it does not fit, or how much room is left
};

// KV bytes per token on one rank: 2 (K and V) x layers x KV heads per rank x head_dim x bytes.
// KV heads are split over the ranks, one per rank (replicated) when tp_size > num_kv_heads.
int64_t kv_bytes_per_token(const ModelConfig& config, int tp_size, DType kv_dtype);

// Decode-only steps of up to this many sequences run as CUDA graphs, one per batch bucket.
inline constexpr int64_t kMaxGraphBatch = 256;
// The bucket a decode-only step of n sequences is padded to: 1, 2, 4, 8, then multiples of 16.
int64_t decode_graph_bucket(int64_t n);

// The steps the CUDA worker measures its activation arena with at start-up: the largest the
// scheduler can emit under its limits (worker/engine/rank.cc runs them, activation_arena_bytes
// predicts them).
struct WarmupShapes {
  int64_t mixed_tokens = 0;  // min(max_num_batched_tokens, max_model_len): the whole token budget
  int64_t mixed_seqs = 0;    // min(max_num_seqs, mixed_tokens): one prefill chunk + single decode
                             // tokens, every sequence sampling
  int64_t width = 0;         // block-table width: ceil(max_model_len / block_size)
  std::vector<int64_t> decode_buckets;  // every graph bucket up to the largest decode batch
  int64_t num_blocks = 0;    // KV blocks the warm-up steps touch
};
WarmupShapes warmup_shapes(int64_t max_num_batched_tokens, int64_t max_num_seqs, int64_t max_model_len,
                           int64_t block_size);

// The activation arena the worker reserves: its warm-up steps' scratch peak, plus 1/16 and 16 MiB.
int64_t activation_arena_bytes(const ModelConfig& config, const PlanOptions& options, int num_sms);

// INVALID_ARGUMENT for an unknown quantization or KV dtype, a TP size that does not divide the
// heads or the FFN, a utilization outside (0, 1]. A layout that does not fit is a plan with
// fits = false and the reason, not an error.
absl::StatusOr<MemoryPlan> plan_memory(const ModelConfig& config, const GpuSpec& gpu, const PlanOptions& options);

}  // namespace shardserve
