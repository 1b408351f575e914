#include "worker/model/llama.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

// Rows [rank * rows / world, (rank + 1) * rows / world) of a part.
LinearPart column_part(std::string name, int64_t rows, const Communicator& comm) {
  const int64_t shard = rows / comm.world_size();
  return {std::move(name), rows, comm.rank() * shard, (comm.rank() + 1) * shard};
}

// Heads [first, first + count) of a [num_heads * head_dim, K] projection.
LinearPart head_part(std::string name, int64_t num_heads, int64_t first, int64_t count, int64_t head_dim) {
  return {std::move(name), num_heads * head_dim, first * head_dim, (first + count) * head_dim};
}

absl::Status check_tp_size(const ModelConfig& config, int world) {
  if (world < 1) return absl::InvalidArgumentError(absl::StrCat("tp_size must be at least 1, got ", world));
  const std::pair<const char*, int64_t> split[] = {{"num_attention_heads", config.num_attention_heads},
                                                   {"intermediate_size", config.intermediate_size},
                                                   {"vocab_size", config.vocab_size}};
  for (const auto& [name, value] : split) {
    if (value % world != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: tp_size ", world, " does not divide ", name,
                                                     " (", value, ")"));
    }
  }
  const int64_t kv = config.num_key_value_heads;
  if (kv % world != 0 && world % kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism: tp_size ", world, " and num_key_value_heads (", kv,
        ") must divide one another (KV heads are split over the ranks, or replicated when tp_size exceeds them)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::load(const ModelConfig& config,
                                                             const Checkpoint& ckpt,
                                                             Backend& backend, Communicator& comm) {
  CheckpointSource source(ckpt, config.quantization);
  return load(config, source, backend, comm);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::load(const ModelConfig& config, WeightSource& ckpt,
                                                             Backend& backend, Communicator& comm) {
  const int world = comm.world_size();
  const int rank = comm.rank();
  if (auto st = check_tp_size(config, world); !st.ok()) return st;
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(config, backend, comm));
  const int64_t hidden = config.hidden_size;
  const int64_t head_dim = config.head_dim;
  const int64_t total_kv_heads = config.num_key_value_heads;
  model->num_q_heads_ = config.num_attention_heads / world;
  model->ffn_size_ = config.intermediate_size / world;
  // KV heads split when there are enough of them, else one replicated head per group of ranks.
  int64_t first_kv_head = 0;
  if (world <= total_kv_heads) {
    model->num_kv_heads_ = total_kv_heads / world;
    first_kv_head = rank * model->num_kv_heads_;
  } else {
    model->num_kv_heads_ = 1;
    first_kv_head = rank / (world / total_kv_heads);
  }
  const int64_t vocab_shard = config.vocab_size / world;
  model->vocab_start_ = rank * vocab_shard;

  auto embed = ckpt.matrix({{"model.embed_tokens.weight", config.vocab_size, model->vocab_start_,
                            model->vocab_start_ + vocab_shard}},
                          hidden, 0, hidden, backend);
  if (!embed.ok()) return embed.status();
  model->embed_tokens_ = std::move(*embed);

  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    DecoderLayer layer;
    auto in_norm = ckpt.vector(p + "input_layernorm.weight", hidden, backend);
    if (!in_norm.ok()) return in_norm.status();
    layer.input_layernorm = *in_norm;
    auto post_norm = ckpt.vector(p + "post_attention_layernorm.weight", hidden, backend);
    if (!post_norm.ok()) return post_norm.status();
    layer.post_attention_layernorm = *post_norm;

    const int64_t q_rows = config.num_attention_heads * head_dim;
    const int64_t kv_heads = model->num_kv_heads_;
    auto qkv = Linear::load(ckpt,
                            {column_part(p + "self_attn.q_proj.weight", q_rows, comm),
                             head_part(p + "self_attn.k_proj.weight", total_kv_heads, first_kv_head, kv_heads, head_dim),
                             head_part(p + "self_attn.v_proj.weight", total_kv_heads, first_kv_head, kv_heads, head_dim)},
                            hidden, ParallelStyle::kColumn, backend, comm);
    if (!qkv.ok()) return qkv.status();
    layer.qkv_proj = std::move(*qkv);
    auto o = Linear::load(ckpt, {{p + "self_attn.o_proj.weight", hidden, 0, hidden}}, q_rows,
                          ParallelStyle::kRow, backend, comm);
    if (!o.ok()) return o.status();
    layer.o_proj = std::move(*o);
    const int64_t ffn = config.intermediate_size;
    auto gate_up = Linear::load(ckpt,
                                {column_part(p + "mlp.gate_proj.weight", ffn, comm),
                                 column_part(p + "mlp.up_proj.weight", ffn, comm)},
                                hidden, ParallelStyle::kColumn, backend, comm);
    if (!gate_up.ok()) return gate_up.status();
    layer.gate_up_proj = std::move(*gate_up);
    auto down = Linear::load(ckpt, {{p + "mlp.down_proj.weight", hidden, 0, hidden}}, ffn,
                             ParallelStyle::kRow, backend, comm);
    if (!down.ok()) return down.status();
    layer.down_proj = std::move(*down);
    model->layers_.push_back(std::move(layer));
  }

  auto norm = ckpt.vector("model.norm.weight", hidden, backend);
  if (!norm.ok()) return norm.status();
  model->norm_ = *norm;

  // A tied LM head reads the embedding matrix (the same vocab rows as this rank's embedding
  // shard); some tied checkpoints still ship lm_head.weight, which is then the same values.
  const std::string head_name = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  auto head = Linear::load(ckpt, {column_part(head_name, config.vocab_size, comm)}, hidden,
                           ParallelStyle::kColumn, backend, comm);
  if (!head.ok()) return head.status();
  model->lm_head_ = std::move(*head);

  // cos/sin table computed in double from the (scaled) inverse frequencies.
  const std::vector<double> inv_freq = rope_inv_freq(config);
  const int64_t max_pos = config.max_position_embeddings;
  std::vector<float> table(static_cast<size_t>(max_pos * head_dim));
  for (int64_t pos = 0; pos < max_pos; ++pos) {
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const double angle = static_cast<double>(pos) * inv_freq[i];
      table[pos * head_dim + i] = static_cast<float>(std::cos(angle));
      table[pos * head_dim + head_dim / 2 + i] = static_cast<float>(std::sin(angle));
    }
  }
  model->cos_sin_ = backend.upload(HostTensor{table.data(), DType::kF32, {max_pos, head_dim}}, DType::kF32);
  return model;
}

std::vector<KvLayer> LlamaModel::allocate_kv_cache(int64_t num_blocks, int64_t block_size) {
  std::vector<KvLayer> cache;
  const std::vector<int64_t> shape{num_blocks, block_size, num_kv_heads_, config_.head_dim};
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    cache.push_back({backend_.empty(shape, backend_.activation_dtype()),
                     backend_.empty(shape, backend_.activation_dtype())});
  }
  return cache;
}

int64_t LlamaModel::kv_bytes_per_token() const {
  return 2 * config_.num_hidden_layers * num_kv_heads_ * config_.head_dim *
         static_cast<int64_t>(dtype_size(backend_.activation_dtype()));
}

void LlamaModel::attention(const DecoderLayer& layer, const Tensor& x, const StepInputs& in, KvLayer& kv,
                           Workspace& ws, Tensor& out) {
  layer.qkv_proj.forward(backend_, x, ws.qkv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  backend_.rope_store_attention(ws.qkv, num_q_heads_, in.positions, cos_sin_, kv, in.attn, scale, ws.attn);
  layer.o_proj.forward(backend_, ws.attn, out);
}

void LlamaModel::feed_forward(const DecoderLayer& layer, const Tensor& x, Workspace& ws, Tensor& out) {
  // gate_up is column-parallel (no collective after it): the backend may fuse it with silu_mul.
  backend_.linear_silu_mul(x, layer.gate_up_proj.weight(), ws.gate_up, ws.act);
  layer.down_proj.forward(backend_, ws.act, out);
}

// Each token's row lives on exactly one rank; the others contribute zeros to the all-reduce.
Tensor LlamaModel::embed(const Tensor& token_ids) {
  Tensor out = backend_.scratch({token_ids.numel(), config_.hidden_size}, backend_.activation_dtype());
  backend_.embedding(token_ids, embed_tokens_, vocab_start_, out);
  if (comm_.world_size() > 1) comm_.all_reduce(out);
  return out;
}

// Each rank computes the logits of its vocab shard; the gathered shards are set side by side.
Tensor LlamaModel::lm_head(const Tensor& x) {
  const int64_t rows = x.dim(0);
  const int world = comm_.world_size();
  Tensor local = backend_.scratch({rows, lm_head_.out_features()}, DType::kF32);
  lm_head_.forward(backend_, x, local);
  if (world == 1) return local;
  Tensor gathered = backend_.scratch({world * rows, lm_head_.out_features()}, DType::kF32);
  comm_.all_gather(local, gathered);
  Tensor logits = backend_.scratch({rows, config_.vocab_size}, DType::kF32);
  backend_.join_column_shards(gathered, world, logits);
  return logits;
}

Tensor LlamaModel::forward(const StepInputs& in, std::vector<KvLayer>& kv_cache) {
  const int64_t tokens = in.token_ids.numel();
  const int64_t hidden = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const DType act = backend_.activation_dtype();

  Tensor residual = embed(in.token_ids);
  Tensor x = backend_.scratch({tokens, hidden}, act);  // normed input of each sublayer
  Tensor h = backend_.scratch({tokens, hidden}, act);  // output of each sublayer
  Workspace ws{backend_.scratch({tokens, layers_.front().qkv_proj.out_features()}, act),
               backend_.scratch({tokens, num_q_heads_ * config_.head_dim}, act),
               backend_.scratch({tokens, 2 * ffn_size_}, act), backend_.scratch({tokens, ffn_size_}, act)};
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& layer = layers_[i];
    if (i == 0) {
      backend_.rmsnorm(residual, layer.input_layernorm, eps, x);
    } else {
      backend_.add_rmsnorm(h, residual, layer.input_layernorm, eps, x);
    }
    attention(layer, x, in, kv_cache[i], ws, h);
    backend_.add_rmsnorm(h, residual, layer.post_attention_layernorm, eps, x);
    feed_forward(layer, x, ws, h);
  }
  backend_.add_rmsnorm(h, residual, norm_, eps, x);

  const int64_t rows = in.logits_indices.numel();
  if (rows == 0) return Tensor{};
  Tensor last = backend_.scratch({rows, hidden}, act);
  backend_.gather_rows(x, in.logits_indices, last);
  return lm_head(last);
}

}  // namespace shardserve
