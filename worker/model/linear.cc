#include "worker/model/linear.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace shardserve {

absl::StatusOr<Linear> Linear::load(const Checkpoint& ckpt, const std::vector<LinearPart>& parts,
                                    int64_t in_features, ParallelStyle style, Backend& backend,
                                    Communicator& comm) {
  Linear layer;
  layer.style_ = style;
  layer.comm_ = &comm;
  const int world = comm.world_size();
  const int rank = comm.rank();

  HostBuffer fused;
  int64_t total_rows = 0;
  int64_t cols = in_features;
  for (const LinearPart& part : parts) {
    absl::StatusOr<HostBuffer> buf;
    if (style == ParallelStyle::kRow) {
      if (in_features % world != 0) {
        return absl::InvalidArgumentError(absl::StrCat(part.name, ": in_features ", in_features,
                                                       " is not divisible by tp_size ", world));
      }
      cols = in_features / world;
      buf = ckpt.read(part.name, {part.rows, in_features}, 1, rank * cols, (rank + 1) * cols);
    } else if (part.row_begin == 0 && part.row_end == part.rows) {
      buf = ckpt.read(part.name, {part.rows, in_features});
    } else {
      buf = ckpt.read(part.name, {part.rows, in_features}, 0, part.row_begin, part.row_end);
    }
    if (!buf.ok()) return buf.status();
    if (!is_float(buf->dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": tensor '", part.name, "' has dtype ",
                                                     std::string(dtype_name(buf->dtype)), ", expected a float type"));
    }
    total_rows += buf->shape[0];
    if (fused.bytes.empty()) {
      fused = std::move(*buf);
    } else {
      if (buf->dtype != fused.dtype) {
        return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": tensor '", part.name, "' is ",
                                                       std::string(dtype_name(buf->dtype)), " but '", parts.front().name,
                                                       "' is ", std::string(dtype_name(fused.dtype))));
      }
      fused.bytes.insert(fused.bytes.end(), buf->bytes.begin(), buf->bytes.end());
    }
  }
  fused.shape = {total_rows, cols};
  layer.weight_.weight = backend.upload(fused.view(), backend.activation_dtype());
  return layer;
}

void Linear::forward(Backend& backend, const Tensor& x, Tensor& out) const {
  backend.linear(x, weight_, out);
  if (style_ == ParallelStyle::kRow && comm_->world_size() > 1) comm_->all_reduce(out);
}

}  // namespace shardserve
