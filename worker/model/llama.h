// LlamaModel: the Llama forward pass, written once against `Backend`.
//
// One call runs one step for a batch of sequences: any mix of prefill chunks and single decode
// tokens, their query tokens concatenated. Each decoder block is
//   h   = x + attention(attention_norm(x))
//   out = h + feed_forward(ffn_norm(h))
// with the residual add fused into the next norm. Logits come back only for the rows the caller
// asks for (the last token of each sequence that samples this step).
//
// Tensor parallelism over N ranks (Megatron style; the Linear layers carry the style):
// - attention: rank r holds query heads [r * Hq / N, (r + 1) * Hq / N) (column-parallel q) and
//   either KV heads [r * Hkv / N, (r + 1) * Hkv / N) when N <= Hkv, or, when N > Hkv, one KV head
//   r / (N / Hkv), replicated on the N / Hkv ranks whose query heads read it; o_proj is
//   row-parallel over the same heads and all-reduces;
// - MLP: gate/up column-parallel, down_proj row-parallel (all-reduce);
// - embedding and LM head vocab-parallel: rank r holds vocab rows [r * V / N, (r + 1) * V / N);
//   embeddings are all-reduced (each id's row lives on one rank), logit shards all-gathered, so
//   every rank returns the full logits.
// N must divide num_attention_heads, intermediate_size and vocab_size, and N and
// num_key_value_heads must divide one another.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/linear.h"
#include "worker/model/weight_source.h"
#include "worker/runtime/backend.h"
#include "worker/runtime/communicator.h"

namespace shardserve {

// One step's inputs, already on the backend's device.
struct StepInputs {
  Tensor token_ids;       // I32 [T]
  Tensor positions;       // I32 [T]
  Tensor logits_indices;  // I32 [S'] rows of T whose logits are returned
  AttentionMetadata attn;
};

class LlamaModel {
 public:
  // Loads this rank's shard of every weight (comm gives rank and group size; only the shard's
  // slices are read from the checkpoint) and checks each tensor's shape against the config.
  // INVALID_ARGUMENT naming the quantity when the group size does not divide what it must.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> load(const ModelConfig& config,
                                                          const Checkpoint& ckpt, Backend& backend,
                                                          Communicator& comm);
  // The same from any source of weights (a checkpoint, or synthetic weights made on the device).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> load(const ModelConfig& config, WeightSource& source,
                                                          Backend& backend, Communicator& comm);

  // Runs one step and returns FP32 logits [S', vocab_size] for in.logits_indices.
  Tensor forward(const StepInputs& in, std::vector<KvLayer>& kv_cache);

  // A KV cache of num_blocks blocks per layer for this rank's KV heads.
  std::vector<KvLayer> allocate_kv_cache(int64_t num_blocks, int64_t block_size);
  // Bytes one cached token takes on this rank, all layers, K and V.
  int64_t kv_bytes_per_token() const;

  const ModelConfig& config() const { return config_; }
  int64_t num_local_q_heads() const { return num_q_heads_; }
  int64_t num_local_kv_heads() const { return num_kv_heads_; }

 private:
  struct DecoderLayer {
    Tensor input_layernorm;
    Tensor post_attention_layernorm;
    Linear qkv_proj;      // column-parallel, fused q|k|v
    Linear o_proj;        // row-parallel
    Linear gate_up_proj;  // column-parallel, fused gate|up
    Linear down_proj;     // row-parallel
  };

  LlamaModel(const ModelConfig& config, Backend& backend, Communicator& comm)
      : config_(config), backend_(backend), comm_(comm) {}
  // Temporaries of one step, shared by every layer: scratch memory is rewound only per step, so
  // allocating them per layer would grow the activation arena with depth.
  struct Workspace {
    Tensor qkv, attn, gate_up, act;
  };
  void attention(const DecoderLayer& layer, const Tensor& x, const StepInputs& in, KvLayer& kv, Workspace& ws,
                 Tensor& out);
  void feed_forward(const DecoderLayer& layer, const Tensor& x, Workspace& ws, Tensor& out);
  Tensor embed(const Tensor& token_ids);
  Tensor lm_head(const Tensor& x);

  ModelConfig config_;
  Backend& backend_;
  Communicator& comm_;
  int64_t num_q_heads_ = 0;   // on this rank
  int64_t num_kv_heads_ = 0;  // on this rank
  int64_t ffn_size_ = 0;      // on this rank
  int64_t vocab_start_ = 0;   // first vocab row of this rank's embedding and LM head shards
  Tensor embed_tokens_;       // [vocab / N, hidden]
  std::vector<DecoderLayer> layers_;
  Tensor norm_;
  Linear lm_head_;  // column-parallel over the vocabulary
  Tensor cos_sin_;  // [max_position_embeddings, head_dim]: cos | sin
};

}  // namespace shardserve
