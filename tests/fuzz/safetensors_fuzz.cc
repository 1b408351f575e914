// A whole .safetensors file from untrusted bytes: SafetensorsFile::from_memory runs the checks of
// open() (header length, JSON, dtypes, shapes, offsets tiling the data). An accepted file must
// then be safe to read everywhere: every tensor viewed and sliced along every dimension (ASan
// catches a read outside the input), the tensors exactly tile the data section, and a full slice
// along any dimension equals the tensor's bytes.
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "tests/fuzz/fuzz_check.h"
#include "worker/model/safetensors.h"

using namespace shardserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto file = SafetensorsFile::from_memory(bytes, "fuzz.safetensors");
  if (!file.ok()) {
    FUZZ_CHECK(!file.status().message().empty(), "an error without a message");
    return 0;
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  const uint64_t data_size = size - 8 - header_len;

  uint64_t covered = 0;
  for (const auto& [name, info] : (*file)->tensors()) {
    FUZZ_CHECK(info.end - info.begin == static_cast<uint64_t>(info.numel()) * dtype_size(info.dtype),
               "byte range does not match dtype x shape for " + name);
    FUZZ_CHECK(info.end <= data_size, "tensor past the data section: " + name);
    covered += info.end - info.begin;

    auto view = (*file)->view(name);
    FUZZ_CHECK(view.ok(), "view of a listed tensor failed");
    const size_t nbytes = info.end - info.begin;
    const auto* whole = static_cast<const uint8_t*>(view->data);
    // Read every byte of the view: ASan checks that it lies inside the input.
    const std::vector<uint8_t> copy(whole, whole + nbytes);
    FUZZ_CHECK(nbytes == 0 || std::memcmp(copy.data(), whole, nbytes) == 0, "the view does not read back");

    for (int dim = 0; dim < static_cast<int>(info.shape.size()); ++dim) {
      const int64_t extent = info.shape[dim];
      std::vector<uint8_t> out(nbytes);
      FUZZ_CHECK((*file)->read_slice(name, dim, 0, extent, out.data()).ok(), "full slice failed");
      FUZZ_CHECK(nbytes == 0 || std::memcmp(out.data(), whole, nbytes) == 0, "full slice differs from the view");
      if (extent >= 2) {  // the second half: the shard a tensor-parallel rank 1 of 2 reads
        const int64_t rows = extent - extent / 2;
        std::vector<uint8_t> half(nbytes / static_cast<size_t>(extent) * static_cast<size_t>(rows));
        FUZZ_CHECK((*file)->read_slice(name, dim, extent / 2, extent, half.data()).ok(), "half slice failed");
      }
      FUZZ_CHECK(!(*file)->read_slice(name, dim, 0, extent + 1, out.data()).ok(), "a slice past the end was allowed");
    }
    FUZZ_CHECK(!(*file)->read_slice(name, static_cast<int>(info.shape.size()), 0, 0, nullptr).ok(),
               "a slice along a missing dimension was allowed");
  }
  FUZZ_CHECK(covered == data_size, "the tensors do not cover the data section");
  return 0;
}
