#include "worker/model/weight_source.h"

#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"

namespace shardserve {

absl::StatusOr<Tensor> CheckpointSource::matrix(const std::vector<LinearPart>& parts, int64_t in_features,
                                                int64_t col_begin, int64_t col_end, Backend& backend) {
  const bool all_cols = col_begin == 0 && col_end == in_features;
  HostBuffer fused;
  int64_t total_rows = 0;
  for (const LinearPart& part : parts) {
    const bool all_rows = part.row_begin == 0 && part.row_end == part.rows;
    if (!all_rows && !all_cols) {
      return absl::InternalError(absl::StrCat(part.name, ": a shard is a row or a column slice, not both"));
    }
    absl::StatusOr<HostBuffer> buf =
        all_rows && all_cols ? ckpt_.read(part.name, {part.rows, in_features})
        : all_cols           ? ckpt_.read(part.name, {part.rows, in_features}, 0, part.row_begin, part.row_end)
                             : ckpt_.read(part.name, {part.rows, in_features}, 1, col_begin, col_end);
    if (!buf.ok()) return buf.status();
    if (!is_float(buf->dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", part.name, "' has dtype ",
                                                     std::string(dtype_name(buf->dtype)), ", expected a float type"));
    }
    total_rows += buf->shape[0];
    if (fused.bytes.empty()) {
      fused = std::move(*buf);
    } else if (buf->dtype != fused.dtype) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", part.name, "' is ",
                                                     std::string(dtype_name(buf->dtype)), " but '", parts.front().name,
                                                     "' is ", std::string(dtype_name(fused.dtype))));
    } else {
      fused.bytes.insert(fused.bytes.end(), buf->bytes.begin(), buf->bytes.end());
    }
  }
  fused.shape = {total_rows, col_end - col_begin};
  return backend.upload(fused.view(), backend.activation_dtype());
}

absl::StatusOr<Tensor> CheckpointSource::vector(const std::string& name, int64_t size, Backend& backend) {
  auto buf = ckpt_.read(name, {size});
  if (!buf.ok()) return buf.status();
  return backend.upload(buf->view(), backend.activation_dtype());
}

absl::StatusOr<Tensor> SyntheticSource::matrix(const std::vector<LinearPart>& parts, int64_t in_features,
                                               int64_t col_begin, int64_t col_end, Backend& backend) {
  int64_t rows = 0;
  for (const LinearPart& part : parts) rows += part.row_end - part.row_begin;
  Tensor t = backend.empty({rows, col_end - col_begin}, backend.activation_dtype());
  // Uniform on [-a, a) has variance a^2 / 3: a = sqrt(3 / in_features) gives 1 / in_features.
  const auto scale = static_cast<float>(std::sqrt(3.0 / static_cast<double>(in_features)));
  const uint64_t seed = seed_ ^ std::hash<std::string>{}(parts.front().name) ^ static_cast<uint64_t>(col_begin);
  backend.fill_uniform(t, seed, scale);
  return t;
}

absl::StatusOr<Tensor> SyntheticSource::vector(const std::string&, int64_t size, Backend& backend) {
  const std::vector<float> ones(static_cast<size_t>(size), 1.0f);
  return backend.upload(HostTensor{ones.data(), DType::kF32, {size}}, backend.activation_dtype());
}

}  // namespace shardserve
