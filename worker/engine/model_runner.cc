#include "worker/engine/model_runner.h"

#include <algorithm>
#include <stdexcept>

namespace shardserve {
namespace {

Tensor upload_i32(Backend& backend, const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  return backend.upload(HostTensor{v.data(), DType::kI32, std::move(shape)}, DType::kI32);
}

}  // namespace

ModelRunner::ModelRunner(LlamaModel& model, Backend& backend, int64_t num_blocks, int64_t block_size)
    : model_(model),
      backend_(backend),
      num_blocks_(num_blocks),
      block_size_(block_size),
      kv_cache_(model.allocate_kv_cache(num_blocks, block_size)) {}

std::vector<float> ModelRunner::execute(const Batch& batch) {
  const int64_t max_pos = model_.config().max_position_embeddings;
  std::vector<int32_t> token_ids, positions, slot_mapping, query_start_loc{0}, seq_lens, logits_indices;
  size_t max_blocks = 1;
  int max_query_len = 0;
  int max_seq_len = 0;
  for (const SequenceStep& s : batch.seqs) max_blocks = std::max(max_blocks, s.block_table.size());
  std::vector<int32_t> block_tables(batch.seqs.size() * max_blocks, -1);

  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const SequenceStep& s = batch.seqs[i];
    const auto q_len = static_cast<int32_t>(s.token_ids.size());
    const int32_t seq_len = s.num_cached + q_len;
    if (q_len == 0 || seq_len > max_pos ||
        static_cast<int64_t>(s.block_table.size()) * block_size_ < seq_len) {
      throw std::logic_error("ModelRunner: sequence step without tokens, past max positions, or with too few blocks");
    }
    for (int32_t j = 0; j < q_len; ++j) {
      const int32_t pos = s.num_cached + j;
      const int32_t block = s.block_table[pos / block_size_];
      if (block < 0 || block >= num_blocks_) throw std::logic_error("ModelRunner: block id out of range");
      token_ids.push_back(s.token_ids[j]);
      positions.push_back(pos);
      slot_mapping.push_back(static_cast<int32_t>(block * block_size_ + pos % block_size_));
    }
    std::copy(s.block_table.begin(), s.block_table.end(), block_tables.begin() + i * max_blocks);
    query_start_loc.push_back(static_cast<int32_t>(token_ids.size()));
    seq_lens.push_back(seq_len);
    if (s.sample) logits_indices.push_back(static_cast<int32_t>(token_ids.size()) - 1);
    max_query_len = std::max(max_query_len, q_len);
    max_seq_len = std::max(max_seq_len, seq_len);
  }

  const auto num_tokens = static_cast<int64_t>(token_ids.size());
  const auto num_seqs = static_cast<int64_t>(batch.seqs.size());
  StepInputs in;
  in.token_ids = upload_i32(backend_, token_ids, {num_tokens});
  in.positions = upload_i32(backend_, positions, {num_tokens});
  in.logits_indices = upload_i32(backend_, logits_indices, {static_cast<int64_t>(logits_indices.size())});
  in.attn.num_seqs = static_cast<int>(num_seqs);
  in.attn.max_query_len = max_query_len;
  in.attn.max_seq_len = max_seq_len;
  in.attn.block_size = static_cast<int>(block_size_);
  in.attn.query_start_loc = upload_i32(backend_, query_start_loc, {num_seqs + 1});
  in.attn.seq_lens = upload_i32(backend_, seq_lens, {num_seqs});
  in.attn.block_tables = upload_i32(backend_, block_tables, {num_seqs, static_cast<int64_t>(max_blocks)});
  in.attn.slot_mapping = upload_i32(backend_, slot_mapping, {num_tokens});

  // A step that samples nothing (a non-final prefill chunk) still runs: it fills the cache.
  const Tensor logits = model_.forward(in, kv_cache_);
  return logits_indices.empty() ? std::vector<float>{} : backend_.download_f32(logits);
}

}  // namespace shardserve
