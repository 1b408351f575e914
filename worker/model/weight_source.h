// WeightSource: where a model's weights come from, as device tensors of this rank's shard.
// CheckpointSource reads the safetensors files (only the slices a rank needs); SyntheticSource
// makes random weights of the right shapes on the device itself, so a 70B-shaped model can be
// timed with no files (values uniform with variance 1/in_features, norms 1, so activations keep
// their scale through the layers).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/runtime/backend.h"

namespace shardserve {

// One checkpoint tensor of a (possibly fused) layer and the rows this rank takes from it.
struct LinearPart {
  std::string name;
  int64_t rows = 0;       // out features in the checkpoint
  int64_t row_begin = 0;  // this rank's rows [row_begin, row_end) (column-parallel)
  int64_t row_end = 0;
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Rows [row_begin, row_end) of each part ([rows, in_features] each), stacked in order, keeping
  // columns [col_begin, col_end); in the backend's activation dtype.
  virtual absl::StatusOr<Tensor> matrix(const std::vector<LinearPart>& parts, int64_t in_features,
                                        int64_t col_begin, int64_t col_end, Backend& backend) = 0;
  // A whole 1-D tensor (norm weights).
  virtual absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) = 0;
};

class CheckpointSource final : public WeightSource {
 public:
  explicit CheckpointSource(const Checkpoint& ckpt) : ckpt_(ckpt) {}
  absl::StatusOr<Tensor> matrix(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                int64_t col_end, Backend& backend) override;
  absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) override;

 private:
  const Checkpoint& ckpt_;
};

class SyntheticSource final : public WeightSource {
 public:
  explicit SyntheticSource(uint64_t seed) : seed_(seed) {}
  absl::StatusOr<Tensor> matrix(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                int64_t col_end, Backend& backend) override;
  absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) override;

 private:
  uint64_t seed_;
};

}  // namespace shardserve
