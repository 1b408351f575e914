// Linear: a projection layer that owns its weight format and its place in tensor parallelism.
//
// Column-parallel layers hold a slice of the output features (rows of the HF [N, K] weight) and
// need no communication; row-parallel layers hold a slice of the input features (columns) and
// all-reduce their partial outputs; replicated layers hold everything. A fused layer (QKV,
// gate/up) is the row-wise concatenation of each part's own shard, so every rank's output keeps
// the [part 0 shard | part 1 shard | ...] order the ops expect.
//
// The weight is in whatever format the source stores it (dense, INT4, INT8, FP8; see LinearWeight
// in worker/runtime/backend.h): the layer only places it in the group, the backend computes.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/weight_source.h"
#include "worker/runtime/backend.h"
#include "worker/runtime/communicator.h"

namespace shardserve {

enum class ParallelStyle { kReplicated, kColumn, kRow };

class Linear {
 public:
  // Loads the parts ([rows, in_features] each) in this rank's shard. Row-parallel layers take
  // the input-feature columns [rank * K / N, (rank + 1) * K / N) of a single part; a quantized
  // layer whose groups that split would cut is an INVALID_ARGUMENT naming it.
  static absl::StatusOr<Linear> load(WeightSource& source, const std::vector<LinearPart>& parts,
                                     int64_t in_features, ParallelStyle style, Backend& backend,
                                     Communicator& comm);

  // out = x W^T, all-reduced over the group for a row-parallel layer.
  void forward(Backend& backend, const Tensor& x, Tensor& out) const;
  int64_t out_features() const { return weight_.out_features(); }
  int64_t in_features() const { return weight_.in_features(); }
  const LinearWeight& weight() const { return weight_; }

 private:
  LinearWeight weight_;
  ParallelStyle style_ = ParallelStyle::kReplicated;
  Communicator* comm_ = nullptr;
};

}  // namespace shardserve
