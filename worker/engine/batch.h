// Batch: what one engine step asks the model to do, as plain host data (no device types).
// The scheduler builds it; ModelRunner turns it into device buffers.
#pragma once

#include <cstdint>
#include <vector>

namespace shardserve {

struct SequenceStep {
  std::vector<int32_t> token_ids;    // this step's query tokens (a prefill chunk or one decode token)
  int32_t num_cached = 0;            // tokens already in the cache: the first query token's position
  std::vector<int32_t> block_table;  // cache blocks covering positions [0, num_cached + len)
  bool sample = true;                // return logits for the last query token
};

struct Batch {
  std::vector<SequenceStep> seqs;
};

}  // namespace shardserve
