#include "worker/model/weight_source.h"

#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "worker/model/quant_reader.h"

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
    if (buf->dtype == DType::kF8E4M3) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", part.name, "' is F8_E4M3, which loads only ",
                                                     "as a quantized linear layer with its scales"));
    }
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

absl::StatusOr<LinearWeight> WeightSource::linear(const std::vector<LinearPart>& parts, int64_t in_features,
                                                  int64_t col_begin, int64_t col_end, Backend& backend) {
  auto dense = matrix(parts, in_features, col_begin, col_end, backend);
  if (!dense.ok()) return dense.status();
  return LinearWeight(std::move(*dense));
}

absl::StatusOr<LinearWeight> CheckpointSource::linear(const std::vector<LinearPart>& parts, int64_t in_features,
                                                      int64_t col_begin, int64_t col_end, Backend& backend) {
  auto format = stored_format(ckpt_, quant_, parts.front().name);
  if (!format.ok()) return format.status();
  for (size_t i = 1; i < parts.size(); ++i) {
    auto other = stored_format(ckpt_, quant_, parts[i].name);
    if (!other.ok()) return other.status();
    if (*other != *format) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": '", parts.front().name, "' and '", parts[i].name,
                                                     "' form one fused layer but are stored in different formats"));
    }
  }
  const bool at_load = *format == WeightFormat::kDense && quant_.at_load && is_decoder_projection(parts.front().name);
  if (*format == WeightFormat::kDense && !at_load) return WeightSource::linear(parts, in_features, col_begin, col_end, backend);

  std::vector<HostLinearWeight> shards;
  std::vector<std::string> names;
  for (const LinearPart& part : parts) {
    const PartShard shard{part.name, part.rows, in_features, part.row_begin, part.row_end, col_begin, col_end};
    absl::StatusOr<HostLinearWeight> host = at_load                          ? quantize_shard_at_load(ckpt_, quant_, shard)
                                            : *format == WeightFormat::kInt4 ? read_int4_shard(ckpt_, quant_, shard)
                                                                             : read_fp8_shard(ckpt_, quant_, shard);
    if (!host.ok()) return host.status();
    shards.push_back(std::move(*host));
    names.push_back(part.name);
  }
  auto fused = concat_rows(std::move(shards), names);
  if (!fused.ok()) return fused.status();
  LinearWeight w = upload_linear(*fused, backend);
  backend.prepare_linear(w);
  return w;
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

absl::StatusOr<LinearWeight> SyntheticSource::linear(const std::vector<LinearPart>& parts, int64_t in_features,
                                                     int64_t col_begin, int64_t col_end, Backend& backend) {
  if (!quant_.quantized() || !is_decoder_projection(parts.front().name)) {
    return WeightSource::linear(parts, in_features, col_begin, col_end, backend);
  }
  int64_t rows = 0;
  for (const LinearPart& part : parts) rows += part.row_end - part.row_begin;
  const int64_t cols = col_end - col_begin;
  const uint64_t seed = seed_ ^ std::hash<std::string>{}(parts.front().name) ^ static_cast<uint64_t>(col_begin);
  // Each format's codes q are uniform random bits; a scale s = 1 / sqrt(E[q^2] x in_features)
  // gives the weights variance 1 / in_features, as the dense synthetic weights have.
  auto scale_for = [&](double mean_square) {
    return static_cast<float>(1.0 / std::sqrt(mean_square * static_cast<double>(in_features)));
  };
  LinearWeight w;
  if (quant_.method == QuantMethod::kAwq || quant_.method == QuantMethod::kGptq) {
    const int64_t group = quant_.group_size > 0 ? quant_.group_size : in_features;
    if (in_features % group != 0 || col_begin % group != 0 || cols % group != 0 || cols % 8 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          parts.front().name, ": input features [", col_begin, ", ", col_end, ") of ", in_features,
          " are not a whole number of quantization groups (group_size ", group, "): use a tp_size for which ",
          in_features, " / tp_size is a multiple of ", group));
    }
    const int64_t groups = cols / group;
    w.format = WeightFormat::kInt4;
    w.weight = backend.empty({rows, cols / 8}, DType::kI32);
    backend.fill_random_bits(w.weight, seed);
    // q is uniform on [0, 15] (mean 7.5): zero points alternate 7 and 8 over rows and groups so
    // the weights have mean 0; either way E[(q - z)^2] = 21.25 + 0.25 = 21.5.
    std::vector<uint8_t> zeros(static_cast<size_t>(rows * groups));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) zeros[r * groups + g] = static_cast<uint8_t>(7 + ((r + g) & 1));
    }
    const std::vector<uint16_t> scales(static_cast<size_t>(rows * groups), f32_to_f16(scale_for(21.5)));
    w.zeros = backend.upload(HostTensor{zeros.data(), DType::kU8, {rows, groups}}, DType::kU8);
    w.scales = backend.upload(HostTensor{scales.data(), DType::kF16, {rows, groups}}, DType::kF16);
    w.group_size = group;
    backend.prepare_linear(w);
    return w;
  }
  const bool fp8 = quant_.method == QuantMethod::kFp8;
  double mean_square = 0.0;  // over the 256 byte values fill_random_bits makes equally likely
  for (int b = 0; b < 256; ++b) {
    const float q = fp8 ? fp8e4m3_to_f32(static_cast<uint8_t>(b & 0xBF)) : static_cast<float>(static_cast<int8_t>(b));
    mean_square += static_cast<double>(q) * q / 256.0;
  }
  w.format = fp8 ? WeightFormat::kFp8 : WeightFormat::kInt8;
  w.weight = backend.empty({rows, cols}, fp8 ? DType::kF8E4M3 : DType::kI8);
  backend.fill_random_bits(w.weight, seed);
  const std::vector<float> scales(static_cast<size_t>(rows), scale_for(mean_square));
  w.scales = backend.upload(HostTensor{scales.data(), DType::kF32, {rows}}, DType::kF32);
  backend.prepare_linear(w);
  return w;
}

absl::StatusOr<Tensor> SyntheticSource::vector(const std::string&, int64_t size, Backend& backend) {
  const std::vector<float> ones(static_cast<size_t>(size), 1.0f);
  return backend.upload(HostTensor{ones.data(), DType::kF32, {size}}, backend.activation_dtype());
}

}  // namespace shardserve
