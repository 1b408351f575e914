#include "worker/model/linear.h"

#include "absl/strings/str_cat.h"

namespace shardserve {

absl::StatusOr<Linear> Linear::load(WeightSource& source, const std::vector<LinearPart>& parts,
                                    int64_t in_features, ParallelStyle style, Backend& backend,
                                    Communicator& comm) {
  Linear layer;
  layer.style_ = style;
  layer.comm_ = &comm;
  const int world = comm.world_size();
  int64_t col_begin = 0;
  int64_t col_end = in_features;
  if (style == ParallelStyle::kRow) {
    if (in_features % world != 0) {
      return absl::InvalidArgumentError(absl::StrCat(parts.front().name, ": in_features ", in_features,
                                                     " is not divisible by tp_size ", world));
    }
    col_begin = comm.rank() * (in_features / world);
    col_end = col_begin + in_features / world;
  }
  auto weight = source.linear(parts, in_features, col_begin, col_end, backend);
  if (!weight.ok()) return weight.status();
  layer.weight_ = std::move(*weight);
  return layer;
}

void Linear::forward(Backend& backend, const Tensor& x, Tensor& out) const {
  backend.linear(x, weight_, out);
  if (style_ == ParallelStyle::kRow && comm_->world_size() > 1) comm_->all_reduce(out);
}

}  // namespace shardserve
