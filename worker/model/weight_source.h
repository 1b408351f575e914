// WeightSource: where a model's weights come from, as device tensors of this rank's shard.
// CheckpointSource reads the safetensors files (only the slices a rank needs), in the format the
// model's quantization says (worker/model/quantization.h); SyntheticSource makes random weights
// of the right shapes on the device itself, so a 70B-shaped model can be timed with no files
// (weights with variance 1/in_features, norms 1, so activations keep their scale through the
// layers; quantized: random packed integers / FP8 codes with scales that give the same variance).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/quantization.h"
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
  // The same shard of a projection layer as the backend executes it, in its storage format
  // (dense, INT4, INT8, FP8): what Linear::load uses. Default: the dense matrix().
  virtual absl::StatusOr<LinearWeight> linear(const std::vector<LinearPart>& parts, int64_t in_features,
                                              int64_t col_begin, int64_t col_end, Backend& backend);
  // A whole 1-D tensor (norm weights).
  virtual absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) = 0;
};

class CheckpointSource final : public WeightSource {
 public:
  // `quant`: how the checkpoint's linear layers are stored, or quantized at load (the model
  // config's quantization, after resolve_quantization).
  explicit CheckpointSource(const Checkpoint& ckpt, QuantizationConfig quant = {})
      : ckpt_(ckpt), quant_(std::move(quant)) {}
  // Dense only: an F8_E4M3 tensor here is an INVALID_ARGUMENT (its scales would be lost).
  absl::StatusOr<Tensor> matrix(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                int64_t col_end, Backend& backend) override;
  absl::StatusOr<LinearWeight> linear(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                      int64_t col_end, Backend& backend) override;
  absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) override;

 private:
  const Checkpoint& ckpt_;
  QuantizationConfig quant_;
};

class SyntheticSource final : public WeightSource {
 public:
  // `quant` quantizes the decoder's projections (is_decoder_projection): INT4 (awq / gptq, zero
  // points 7 and 8 alternating), INT8 or FP8, each made of random bits on the device.
  explicit SyntheticSource(uint64_t seed, QuantizationConfig quant = {}) : seed_(seed), quant_(std::move(quant)) {}
  absl::StatusOr<Tensor> matrix(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                int64_t col_end, Backend& backend) override;
  absl::StatusOr<LinearWeight> linear(const std::vector<LinearPart>& parts, int64_t in_features, int64_t col_begin,
                                      int64_t col_end, Backend& backend) override;
  absl::StatusOr<Tensor> vector(const std::string& name, int64_t size, Backend& backend) override;

 private:
  uint64_t seed_;
  QuantizationConfig quant_;
};

}  // namespace shardserve
