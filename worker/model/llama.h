// LlamaModel: the Llama forward pass, written once against `Backend`.
//
// One call runs one step for a batch of sequences: any mix of prefill chunks and single decode
// tokens, their query tokens concatenated. Each decoder block is
//   h   = x + attention(attention_norm(x))
//   out = h + feed_forward(ffn_norm(h))
// with the residual add fused into the next norm. Logits come back only for the rows the caller
// asks for (the last token of each sequence that samples this step).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/linear.h"
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
  // Loads this rank's shard of every weight (comm gives rank and group size) and checks each
  // tensor's shape against the config.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> load(const ModelConfig& config,
                                                          const Checkpoint& ckpt, Backend& backend,
                                                          Communicator& comm);

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
  void attention(const DecoderLayer& layer, const Tensor& x, const StepInputs& in, KvLayer& kv,
                 Tensor& out);
  void feed_forward(const DecoderLayer& layer, const Tensor& x, Tensor& out);

  ModelConfig config_;
  Backend& backend_;
  Communicator& comm_;
  int64_t num_q_heads_ = 0;   // on this rank
  int64_t num_kv_heads_ = 0;  // on this rank
  int64_t ffn_size_ = 0;      // on this rank
  Tensor embed_tokens_;       // [vocab, hidden]
  std::vector<DecoderLayer> layers_;
  Tensor norm_;
  Linear lm_head_;
  Tensor cos_sin_;  // [max_position_embeddings, head_dim]: cos | sin
};

}  // namespace shardserve
