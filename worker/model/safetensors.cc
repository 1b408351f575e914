#include "worker/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

using nlohmann::json;

absl::Status bad(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": invalid safetensors file: ", what));
}

}  // namespace

absl::StatusOr<std::map<std::string, TensorInfo>> parse_safetensors_header(
    const std::string& json_text, uint64_t data_size, const std::string& path,
    std::map<std::string, std::string>* metadata) {
  const json header = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return bad(path, "header is not valid JSON");
  if (!header.is_object()) return bad(path, "header is not a JSON object");

  std::map<std::string, TensorInfo> tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return bad(path, "__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) return bad(path, absl::StrCat("__metadata__.", key, " is not a string"));
        if (metadata != nullptr) (*metadata)[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor '", name, "': ");
    if (!entry.is_object()) return bad(path, where + "entry is not an object");
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string())
      return bad(path, where + "missing or non-string dtype");
    if (shape_it == entry.end() || !shape_it->is_array())
      return bad(path, where + "missing or non-array shape");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2)
      return bad(path, where + "data_offsets must be [begin, end]");

    TensorInfo info;
    info.name = name;
    const auto dtype = dtype_from_name(dtype_it->get<std::string>());
    if (!dtype) return bad(path, where + "unsupported dtype " + dtype_it->get<std::string>());
    info.dtype = *dtype;

    uint64_t bytes = dtype_size(info.dtype);
    // The product of the non-zero dims bounds every partial product of the shape, so numel() and
    // slicing cannot overflow even when a zero dim makes the tensor empty ([2^62, 2, 0]).
    uint64_t extent = 1;
    for (const auto& d : *shape_it) {
      if (!d.is_number_unsigned()) return bad(path, where + "shape entries must be non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 62) || __builtin_mul_overflow(bytes, dim, &bytes) ||
          __builtin_mul_overflow(extent, std::max<uint64_t>(dim, 1), &extent) || extent > (uint64_t{1} << 62))
        return bad(path, where + "shape is too large");
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const auto& o : *offsets_it) {
      if (!o.is_number_unsigned()) return bad(path, where + "data_offsets must be non-negative integers");
    }
    info.begin = (*offsets_it)[0].get<uint64_t>();
    info.end = (*offsets_it)[1].get<uint64_t>();
    if (info.end < info.begin) return bad(path, where + "data_offsets end before they begin");
    if (info.end - info.begin != bytes) {
      return bad(path, absl::StrCat(where, "holds ", info.end - info.begin, " bytes but dtype ",
                                    std::string(dtype_name(info.dtype)), " x shape ", shape_string(info.shape),
                                    " needs ", bytes));
    }
    if (info.end > data_size) {
      return bad(path, absl::StrCat(where, "data ends at byte ", info.end, " past the ", data_size,
                                    "-byte data section (truncated file?)"));
    }
    tensors.emplace(name, std::move(info));
  }

  // The tensors must tile the data section exactly: sorted by offset, no gap, no overlap.
  std::vector<const TensorInfo*> order;
  for (const auto& [_, info] : tensors) order.push_back(&info);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const TensorInfo* info : order) {
    if (info->begin != expected) {
      return bad(path, absl::StrCat("tensor '", info->name, "' starts at byte ", info->begin,
                                    " but the previous tensor ends at ", expected,
                                    " (overlapping or non-contiguous data)"));
    }
    expected = info->end;
  }
  if (expected != data_size) {
    return bad(path, absl::StrCat("tensors cover ", expected, " bytes of a ", data_size,
                                  "-byte data section"));
  }
  return tensors;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": cannot stat: ", std::strerror(err)));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return bad(path, absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(map_errno)));

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = static_cast<const uint8_t*>(map);
  file->map_size_ = size;
  file->owns_map_ = true;
  if (absl::Status st = file->parse(); !st.ok()) return st;
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::from_memory(std::string_view bytes,
                                                                              const std::string& path) {
  if (bytes.size() < 8) {
    return bad(path, absl::StrCat("file is ", bytes.size(), " bytes, shorter than the 8-byte header length"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = reinterpret_cast<const uint8_t*>(bytes.data());
  file->map_size_ = bytes.size();
  if (absl::Status st = file->parse(); !st.ok()) return st;
  return file;
}

absl::Status SafetensorsFile::parse() {
  const uint64_t size = map_size_;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_[i];
  if (header_len > kMaxHeaderBytes)
    return bad(path_, absl::StrCat("header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes));
  if (header_len > size - 8)
    return bad(path_, absl::StrCat("header length ", header_len, " runs past the end of the ",
                                   size, "-byte file (truncated file?)"));
  if (header_len == 0 || map_[8] != '{') return bad(path_, "header does not start with '{'");

  const std::string header(reinterpret_cast<const char*>(map_ + 8), header_len);
  auto tensors = parse_safetensors_header(header, size - 8 - header_len, path_, &metadata_);
  if (!tensors.ok()) return tensors.status();
  tensors_ = std::move(*tensors);
  data_ = map_ + 8 + header_len;
  return absl::OkStatus();
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr && owns_map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<HostTensor> SafetensorsFile::view(const std::string& name) const {
  const TensorInfo* info = find(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  return HostTensor{data_ + info->begin, info->dtype, info->shape};
}

absl::Status SafetensorsFile::read_slice(const std::string& name, int dim, int64_t begin,
                                         int64_t end, void* dst) const {
  const TensorInfo* info = find(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  if (dim < 0 || dim >= static_cast<int>(info->shape.size()) || begin < 0 || end < begin ||
      end > info->shape[dim]) {
    return absl::OutOfRangeError(absl::StrCat(path_, ": tensor '", name, "' of shape ",
                                              shape_string(info->shape), " has no slice [", begin,
                                              ", ", end, ") along dimension ", dim));
  }
  // [outer, shape[dim], inner] view: copy `outer` runs of (end - begin) * inner elements.
  uint64_t outer = 1;
  uint64_t inner = dtype_size(info->dtype);
  for (int i = 0; i < dim; ++i) outer *= static_cast<uint64_t>(info->shape[i]);
  for (size_t i = dim + 1; i < info->shape.size(); ++i) inner *= static_cast<uint64_t>(info->shape[i]);
  const uint64_t src_stride = static_cast<uint64_t>(info->shape[dim]) * inner;
  const uint64_t run = static_cast<uint64_t>(end - begin) * inner;
  // An empty slice copies nothing (dst may be null), however many empty runs it has: a shape
  // like [2^40, 0] must not loop 2^40 times.
  if (run == 0) return absl::OkStatus();
  const uint8_t* src = data_ + info->begin + static_cast<uint64_t>(begin) * inner;
  auto* out = static_cast<uint8_t*>(dst);
  for (uint64_t o = 0; o < outer; ++o) std::memcpy(out + o * run, src + o * src_stride, run);
  return absl::OkStatus();
}

}  // namespace shardserve
