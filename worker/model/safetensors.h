// SafetensorsFile: one .safetensors file, memory-mapped and validated before any tensor is read.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the
// data; offsets are relative to the data. `open` rejects anything that could make a later read go
// out of bounds or misread: a header over kMaxHeaderBytes or past the end of the file, JSON that is
// not an object of tensor entries, unknown dtypes, negative dims, byte ranges that do not match
// dtype x shape, and data that is not exactly covered by the tensors in order with no gaps or
// overlaps. Every error names the file (and the tensor).
//
// Reads touch only the bytes they copy: the file is mapped, not read, so loading a tensor-parallel
// shard pulls only that shard's pages from disk.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/runtime/tensor.h"

namespace shardserve {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offset into the data section
  uint64_t end = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100 * 1000 * 1000;

  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  // The same checks on a whole file already in memory, named `path` in errors; `bytes` must
  // outlive the result (tests and fuzzing).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> from_memory(std::string_view bytes,
                                                                      const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;

  // A view of the whole tensor in the mapping (valid while this file is open). The format does not
  // align tensors for their dtype: read the bytes (memcpy), not through a typed pointer.
  absl::StatusOr<HostTensor> view(const std::string& name) const;
  // Copies elements [begin, end) along dimension `dim` into `dst` (sized by the caller:
  // numel / shape[dim] * (end - begin) elements), touching only those bytes of the mapping.
  absl::Status read_slice(const std::string& name, int dim, int64_t begin, int64_t end,
                          void* dst) const;

 private:
  SafetensorsFile() = default;
  // Reads and validates the header of the bytes at map_.
  absl::Status parse();
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  bool owns_map_ = false;  // munmap on destruction (open), or the caller's bytes (from_memory)
  const uint8_t* data_ = nullptr;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Parses and validates a header (the JSON text) against a data section of data_size bytes.
// Exposed for tests and fuzzing; `open` uses it.
absl::StatusOr<std::map<std::string, TensorInfo>> parse_safetensors_header(
    const std::string& json_text, uint64_t data_size, const std::string& path,
    std::map<std::string, std::string>* metadata);

}  // namespace shardserve
