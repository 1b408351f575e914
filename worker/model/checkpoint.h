// Checkpoint: the safetensors files of one Hugging Face model directory, as one name -> tensor
// map. A single `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
// All files are opened and validated up front; tensors are read (whole or as a slice along one
// dimension, for tensor-parallel shards) on demand, each read checking the shape the caller
// expects, so a checkpoint that disagrees with its config fails naming the file and tensor.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/safetensors.h"

namespace shardserve {

// Host bytes of a tensor read out of a checkpoint.
struct HostBuffer {
  std::vector<uint8_t> bytes;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  HostTensor view() const { return HostTensor{bytes.data(), dtype, shape}; }
};

class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  // NOT_FOUND naming the checkpoint when absent.
  absl::StatusOr<TensorInfo> info(const std::string& name) const;
  // Reads the whole tensor, or elements [begin, end) along `dim` when dim >= 0, after checking that
  // the stored shape equals `expected_shape`.
  absl::StatusOr<HostBuffer> read(const std::string& name, const std::vector<int64_t>& expected_shape,
                                  int dim = -1, int64_t begin = 0, int64_t end = 0) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

}  // namespace shardserve
