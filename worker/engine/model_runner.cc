#include "worker/engine/model_runner.h"

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <unordered_map>

namespace shardserve {

ModelRunner::ModelRunner(LlamaModel& model, Backend& backend, int64_t num_blocks, int64_t block_size,
                         int64_t max_model_len, bool use_graphs)
    : model_(model),
      backend_(backend),
      num_blocks_(num_blocks),
      block_size_(block_size),
      max_model_len_(max_model_len > 0 ? std::min(max_model_len, model.config().max_position_embeddings)
                                       : model.config().max_position_embeddings),
      use_graphs_(use_graphs),
      kv_cache_(model.allocate_kv_cache(num_blocks, block_size)) {}

Tensor ModelRunner::run(const Batch& batch, int64_t& num_sampled_out) {
  const auto num_seqs = static_cast<int64_t>(batch.seqs.size());
  bool decode_only = use_graphs_ && backend_.supports_graphs() && num_seqs > 0 && num_seqs <= kMaxGraphBatch;
  int64_t max_blocks = 1;
  for (const SequenceStep& s : batch.seqs) {
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(s.block_table.size()));
    decode_only = decode_only && s.token_ids.size() == 1 && s.sample;
  }
  // A graph's shapes are fixed: pad the batch to its bucket and the block tables to full width.
  const int64_t rows = decode_only ? decode_graph_bucket(num_seqs) : num_seqs;
  const int64_t width = decode_only ? (max_model_len_ + block_size_ - 1) / block_size_ : max_blocks;
  if (max_blocks > width) throw std::logic_error("ModelRunner: block table longer than max_model_len allows");

  std::vector<int32_t> token_ids, positions, slot_mapping, query_start_loc{0}, seq_lens, logits_indices;
  // Block tables go up compact (max_blocks wide) into the device's [rows, width]: a graph's width
  // is max_model_len's, but the kernels read only the blocks each context covers, so the rest is
  // never written (with a 128k context that is 8,192 entries a row a step).
  std::vector<int32_t> block_tables(static_cast<size_t>(rows * max_blocks), 0);
  int max_query_len = 0;
  int max_seq_len = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const SequenceStep& s = batch.seqs[i];
    const auto q_len = static_cast<int32_t>(s.token_ids.size());
    const int32_t seq_len = s.num_cached + q_len;
    if (q_len == 0 || seq_len > max_model_len_ ||
        static_cast<int64_t>(s.block_table.size()) * block_size_ < seq_len) {
      throw std::logic_error("ModelRunner: sequence step without tokens, past max_model_len, or with too few blocks");
    }
    for (int32_t j = 0; j < q_len; ++j) {
      const int32_t pos = s.num_cached + j;
      const int32_t block = s.block_table[pos / block_size_];
      if (block < 0 || block >= num_blocks_) throw std::logic_error("ModelRunner: block id out of range");
      token_ids.push_back(s.token_ids[j]);
      positions.push_back(pos);
      slot_mapping.push_back(static_cast<int32_t>(block * block_size_ + pos % block_size_));
    }
    std::fill(block_tables.begin() + i * max_blocks, block_tables.begin() + (i + 1) * max_blocks, -1);
    std::copy(s.block_table.begin(), s.block_table.end(), block_tables.begin() + i * max_blocks);
    query_start_loc.push_back(static_cast<int32_t>(token_ids.size()));
    seq_lens.push_back(seq_len);
    if (s.sample) logits_indices.push_back(static_cast<int32_t>(token_ids.size()) - 1);
    max_query_len = std::max(max_query_len, q_len);
    max_seq_len = std::max(max_seq_len, seq_len);
  }
  for (int64_t i = num_seqs; i < rows; ++i) {  // graph padding: one token at position 0 of block 0
    token_ids.push_back(0);
    positions.push_back(0);
    slot_mapping.push_back(-1);
    query_start_loc.push_back(static_cast<int32_t>(token_ids.size()));
    seq_lens.push_back(1);
    logits_indices.push_back(static_cast<int32_t>(token_ids.size()) - 1);
  }
  const auto num_sampled = static_cast<int64_t>(decode_only ? num_seqs : logits_indices.size());

  // One host buffer, one copy: the packed arrays become views of one device tensor.
  std::vector<int32_t> packed;
  auto append = [&packed](const std::vector<int32_t>& v) {
    const auto offset = static_cast<int64_t>(packed.size());
    packed.insert(packed.end(), v.begin(), v.end());
    return std::pair{offset, static_cast<int64_t>(v.size())};
  };
  const auto t_ids = append(token_ids), t_pos = append(positions), t_slots = append(slot_mapping),
             t_qsl = append(query_start_loc), t_lens = append(seq_lens), t_logits = append(logits_indices);
  backend_.begin_step();
  Tensor device = backend_.scratch({static_cast<int64_t>(packed.size())}, DType::kI32);
  backend_.copy_from_host(packed.data(), device);
  Tensor tables = backend_.scratch({rows, width}, DType::kI32);
  backend_.copy_from_host_2d(block_tables.data(), max_blocks * sizeof(int32_t), tables, width * sizeof(int32_t),
                             max_blocks * sizeof(int32_t), static_cast<size_t>(rows));
  auto view = [&device](std::pair<int64_t, int64_t> r) { return device.rows(r.first, r.first + r.second); };

  StepInputs in;
  in.token_ids = view(t_ids);
  in.positions = view(t_pos);
  in.logits_indices = view(t_logits);
  in.attn.num_seqs = static_cast<int>(rows);
  in.attn.max_query_len = max_query_len;
  in.attn.max_seq_len = max_seq_len;
  in.attn.block_size = static_cast<int>(block_size_);
  in.attn.query_start_loc = view(t_qsl);
  in.attn.seq_lens = view(t_lens);
  in.attn.block_tables = tables;
  in.attn.slot_mapping = view(t_slots);

  // A step that samples nothing (a non-final prefill chunk) still runs: it fills the cache.
  Tensor logits;
  if (decode_only) {
    Graph& g = graphs_[rows];
    if (g.runs++ == 0) {
      logits = model_.forward(in, kv_cache_);
    } else {
      if (!g.graph) g.graph = backend_.capture([&] { g.logits = model_.forward(in, kv_cache_); });
      backend_.replay(g.graph);
      logits = g.logits;
    }
  } else {
    logits = model_.forward(in, kv_cache_);
  }
  num_sampled_out = num_sampled;
  return logits;
}

std::vector<float> ModelRunner::execute(const Batch& batch) {
  int64_t num_sampled = 0;
  const Tensor logits = run(batch, num_sampled);
  if (num_sampled == 0) return {};
  return backend_.download_f32(logits.rows(0, num_sampled));
}

void ModelRunner::execute_only(const Batch& batch) {
  int64_t num_sampled = 0;
  run(batch, num_sampled);
}

std::vector<SampleResult> ModelRunner::execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) {
  int64_t num_sampled = 0;
  Tensor logits = run(batch, num_sampled);
  if (num_sampled != static_cast<int64_t>(sampled.size())) {
    throw std::logic_error("ModelRunner: the batch samples a different number of sequences than it was given");
  }
  std::vector<SampleResult> results(sampled.size());
  if (num_sampled == 0) return results;
  const int64_t vocab = model_.config().vocab_size;
  if (!backend_.supports_sampling()) {
    const std::vector<float> host = backend_.download_f32(logits.rows(0, num_sampled));
    for (size_t i = 0; i < sampled.size(); ++i) {
      results[i] = sample(*sampled[i], host.data() + static_cast<int64_t>(i) * vocab, vocab);
    }
    return results;
  }
  std::vector<SamplingRow> rows;
  std::vector<PenaltyEntry> entries;
  rows.reserve(sampled.size());
  for (const Sequence* seq : sampled) rows.push_back(device_sampling_row(*seq, entries));
  Tensor view = logits.rows(0, num_sampled).reshaped({num_sampled, vocab});
  SampledRows out;
  backend_.sample(view, rows, entries, out);
  return sample_results(rows, out);
}

}  // namespace shardserve
