#include "worker/model/quant_reader.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

// AutoAWQ GEMM packs output features 8c + [0, 2, 4, 6, 1, 3, 5, 7] into nibbles 0..7 of word c;
// output feature 8c + j therefore sits in nibble kAwqNibble[j].
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

std::string prefix_of(const std::string& weight_name) {
  return absl::EndsWith(weight_name, ".weight") ? weight_name.substr(0, weight_name.size() - 7) : weight_name;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor (or elements [begin, end) of dimension `dim`), after checking its shape and that its
// dtype is one of `dtypes`.
absl::StatusOr<HostBuffer> read(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                                std::initializer_list<DType> dtypes, int dim = -1, int64_t begin = 0, int64_t end = 0) {
  auto info = ckpt.info(name);
  if (!info.ok()) return info.status();
  if (std::find(dtypes.begin(), dtypes.end(), info->dtype) == dtypes.end()) {
    std::string expected;
    for (DType d : dtypes) absl::StrAppend(&expected, expected.empty() ? "" : " or ", std::string(dtype_name(d)));
    return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": tensor '", name, "' has dtype ",
                                                   std::string(dtype_name(info->dtype)), ", expected ", expected));
  }
  if (dim >= 0 && begin == 0 && end == shape.at(static_cast<size_t>(dim))) dim = -1;
  return ckpt.read(name, shape, dim, begin, end);
}

template <typename T>
std::vector<T> as_vector(const HostBuffer& b) {
  std::vector<T> v(b.bytes.size() / sizeof(T));
  std::memcpy(v.data(), b.bytes.data(), v.size() * sizeof(T));
  return v;
}

template <typename T>
HostBuffer buffer(const std::vector<T>& v, DType dtype, std::vector<int64_t> shape) {
  HostBuffer b;
  b.dtype = dtype;
  b.shape = std::move(shape);
  b.bytes.resize(v.size() * sizeof(T));
  std::memcpy(b.bytes.data(), v.data(), b.bytes.size());
  return b;
}

std::vector<float> to_f32(const HostBuffer& b) {
  std::vector<float> out(b.bytes.size() / dtype_size(b.dtype));
  convert_to_f32(b.bytes.data(), b.dtype, out.size(), out.data());
  return out;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status check_shard(const PartShard& s) {
  const bool rows = s.row_begin != 0 || s.row_end != s.rows;
  const bool cols = s.col_begin != 0 || s.col_end != s.cols;
  if (rows && cols) return absl::InternalError(absl::StrCat(s.weight_name, ": a shard is a row or a column slice, not both"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<WeightFormat> stored_format(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                           const std::string& weight_name) {
  const std::string prefix = prefix_of(weight_name);
  const bool int4_config = (quant.method == QuantMethod::kAwq || quant.method == QuantMethod::kGptq) && !quant.at_load;
  if (ckpt.contains(prefix + ".qweight")) {
    if (int4_config) return WeightFormat::kInt4;
    return absl::InvalidArgumentError(absl::StrCat(
        ckpt.dir(), ": '", prefix, ".qweight' is a packed INT4 tensor, but the model's quantization is ",
        quant.describe(), ": config.json needs the checkpoint's quantization_config (quant_method awq or gptq)"));
  }
  if (ckpt.contains(weight_name)) {
    auto info = ckpt.info(weight_name);
    if (!info.ok()) return info.status();
    if (info->dtype == DType::kF8E4M3) {
      if (quant.method == QuantMethod::kFp8 && !quant.at_load) return WeightFormat::kFp8;
      return absl::InvalidArgumentError(absl::StrCat(
          ckpt.dir(), ": '", weight_name, "' is F8_E4M3, but the model's quantization is ", quant.describe(),
          ": FP8 weights need the checkpoint's FP8 quantization_config (their scales are separate tensors)"));
    }
  }
  if (int4_config) {
    // A layer the quantizer left dense (modules_to_not_convert) is fine; a missing one is not.
    if (!ckpt.contains(weight_name)) {
      return absl::NotFoundError(absl::StrCat(ckpt.dir(), ": checkpoint has neither '", prefix, ".qweight' (",
                                              quant.name(), ") nor '", weight_name, "'"));
    }
  }
  return WeightFormat::kDense;
}

absl::StatusOr<HostLinearWeight> read_int4_shard(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                 const PartShard& s) {
  if (auto st = check_shard(s); !st.ok()) return st;
  const std::string p = prefix_of(s.weight_name);
  const bool awq = quant.method == QuantMethod::kAwq;
  const int64_t n_all = s.rows;
  const int64_t k_all = s.cols;
  const int64_t r0 = s.row_begin, r1 = s.row_end, c0 = s.col_begin, c1 = s.col_end;
  const bool row_shard = r0 != 0 || r1 != n_all;
  const bool col_shard = c0 != 0 || c1 != k_all;
  auto invalid = [&](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(p, ": ", what)); };
  if (n_all % 8 != 0 || k_all % 8 != 0) {
    return invalid(absl::StrCat("[", n_all, ", ", k_all, "] is not a whole number of 8-feature packs in both dimensions, "
                                "as INT4 weights and zero points are packed 8 to an int32"));
  }
  const int64_t group = quant.group_size > 0 ? quant.group_size : k_all;

  auto scales_info = ckpt.info(p + ".scales");
  if (!scales_info.ok()) return scales_info.status();
  if (scales_info->shape.size() != 2 || scales_info->shape[1] != n_all) {
    return invalid(absl::StrCat("scales have shape ", shape_string(scales_info->shape), ", expected [groups, ", n_all, "]"));
  }
  const int64_t num_groups = scales_info->shape[0];
  const int64_t expected_groups = awq ? k_all / group : ceil_div(k_all, group);
  if ((awq && k_all % group != 0) || num_groups != expected_groups) {
    return invalid(absl::StrCat(k_all, " input features in groups of ", group, " (group_size of the quantization_config) "
                                "do not make the ", num_groups, " groups its scales hold"));
  }

  // GPTQ's g_idx: trivial (k / group) unless the checkpoint was quantized with act-order.
  std::vector<int32_t> g_idx;
  bool act_order = false;
  if (!awq && ckpt.contains(p + ".g_idx")) {
    auto buf = read(ckpt, p + ".g_idx", {k_all}, {DType::kI32});
    if (!buf.ok()) return buf.status();
    g_idx = as_vector<int32_t>(*buf);
    for (int64_t k = 0; k < k_all; ++k) {
      if (g_idx[k] < 0 || g_idx[k] >= num_groups) {
        return invalid(absl::StrCat("g_idx[", k, "] = ", g_idx[k], " is not a group of its ", num_groups, " groups"));
      }
      act_order = act_order || g_idx[k] != k / group;
    }
  }

  // The groups this shard reads, and its local group size.
  int64_t g_begin = 0, g_end = num_groups, local_group = group;
  if (col_shard && act_order) {
    const auto [lo, hi] = std::minmax_element(g_idx.begin() + c0, g_idx.begin() + c1);
    g_begin = *lo;
    g_end = *hi + 1;
  } else if (col_shard && num_groups == 1) {
    local_group = c1 - c0;  // one group over all of K: every slice is within it
  } else if (col_shard) {
    if (c0 % group != 0 || (c1 % group != 0 && c1 != k_all)) {
      return invalid(absl::StrCat(
          "tp_size ", k_all / (c1 - c0), " splits its ", k_all, " input features into shards of ", c1 - c0,
          ", which is not a whole number of its quantization groups (group_size ", group,
          "): use a tp_size for which ", k_all, " / tp_size is a multiple of ", group, ", or tp_size 1"));
    }
    g_begin = c0 / group;
    g_end = ceil_div(c1, group);
  }
  if (col_shard && (c0 % 8 != 0 || c1 % 8 != 0)) {
    return invalid(absl::StrCat("tensor-parallel shard of input features [", c0, ", ", c1, ") does not start and end on ",
                                "a multiple of 8 (INT4 packs 8 input features to an int32)"));
  }
  if (row_shard && (r0 % 8 != 0 || r1 % 8 != 0)) {
    return invalid(absl::StrCat("tensor-parallel shard of output features [", r0, ", ", r1, ") does not start and end on ",
                                "a multiple of 8 (INT4 zero points pack 8 output features to an int32): choose a tp_size "
                                "that keeps each rank's share of the heads and FFN a multiple of 8 features"));
  }
  const int64_t nn = r1 - r0, kk = c1 - c0, ng = g_end - g_begin;

  // qweight -> canonical words [nn, kk / 8]: input feature k in nibble k % 8 of word k / 8.
  std::vector<uint32_t> words(static_cast<size_t>(nn * kk / 8), 0);
  if (awq) {
    auto buf = col_shard ? read(ckpt, p + ".qweight", {k_all, n_all / 8}, {DType::kI32}, 0, c0, c1)
                         : read(ckpt, p + ".qweight", {k_all, n_all / 8}, {DType::kI32}, 1, r0 / 8, r1 / 8);
    if (!buf.ok()) return buf.status();
    const auto packed = as_vector<uint32_t>(*buf);  // [kk, nn / 8]
    for (int64_t k = 0; k < kk; ++k) {
      for (int64_t n = 0; n < nn; ++n) {
        const uint32_t q = (packed[k * (nn / 8) + n / 8] >> (4 * kAwqNibble[n % 8])) & 0xFu;
        words[n * (kk / 8) + k / 8] |= q << (4 * (k % 8));
      }
    }
  } else {
    // GPTQ packs along K already: the canonical words are its words transposed.
    auto buf = col_shard ? read(ckpt, p + ".qweight", {k_all / 8, n_all}, {DType::kI32}, 0, c0 / 8, c1 / 8)
                         : read(ckpt, p + ".qweight", {k_all / 8, n_all}, {DType::kI32}, 1, r0, r1);
    if (!buf.ok()) return buf.status();
    const auto packed = as_vector<uint32_t>(*buf);  // [kk / 8, nn]
    for (int64_t kb = 0; kb < kk / 8; ++kb) {
      for (int64_t n = 0; n < nn; ++n) words[n * (kk / 8) + kb] = packed[kb * nn + n];
    }
  }

  // qzeros [groups, N / 8] -> zeros [nn, ng].
  std::vector<uint8_t> zeros(static_cast<size_t>(nn * ng));
  {
    auto buf = row_shard ? read(ckpt, p + ".qzeros", {num_groups, n_all / 8}, {DType::kI32}, 1, r0 / 8, r1 / 8)
                         : read(ckpt, p + ".qzeros", {num_groups, n_all / 8}, {DType::kI32}, 0, g_begin, g_end);
    if (!buf.ok()) return buf.status();
    const auto packed = as_vector<uint32_t>(*buf);  // [ng, nn / 8]
    for (int64_t g = 0; g < ng; ++g) {
      for (int64_t n = 0; n < nn; ++n) {
        const int nibble = awq ? kAwqNibble[n % 8] : static_cast<int>(n % 8);
        uint32_t z = (packed[g * (nn / 8) + n / 8] >> (4 * nibble)) & 0xFu;
        if (!awq && !quant.gptq_v2) {
          // v1 stores z - 1. A stored 15 would be z = 16, which no 4-bit zero point is: it is what
          // AutoGPTQ's v1 packing leaves for z = 0 (its -1 overflows), so the data is damaged.
          if (z == 15) {
            return invalid(absl::StrCat("qzeros of group ", g_begin + g, ", output feature ", r0 + n,
                                        " stores 15, which GPTQ v1's +1 offset makes 16, outside 4 bits (a zero point of "
                                        "0 that the v1 packing cannot hold); re-export with checkpoint_format gptq_v2"));
          }
          ++z;
        }
        zeros[n * ng + g] = static_cast<uint8_t>(z);
      }
    }
  }

  // scales [groups, N] -> [nn, ng], F16 kept, BF16 / F32 as F32.
  HostLinearWeight out;
  {
    auto buf = row_shard ? read(ckpt, p + ".scales", {num_groups, n_all}, {DType::kF16, DType::kBF16, DType::kF32}, 1, r0, r1)
                         : read(ckpt, p + ".scales", {num_groups, n_all}, {DType::kF16, DType::kBF16, DType::kF32}, 0,
                                g_begin, g_end);
    if (!buf.ok()) return buf.status();
    if (buf->dtype == DType::kF16) {
      const auto v = as_vector<uint16_t>(*buf);
      std::vector<uint16_t> t(v.size());
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t n = 0; n < nn; ++n) t[n * ng + g] = v[g * nn + n];
      }
      out.scales = buffer(t, DType::kF16, {nn, ng});
    } else {
      const auto v = to_f32(*buf);
      std::vector<float> t(v.size());
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t n = 0; n < nn; ++n) t[n * ng + g] = v[g * nn + n];
      }
      out.scales = buffer(t, DType::kF32, {nn, ng});
    }
  }
  out.format = WeightFormat::kInt4;
  out.weight = buffer(words, DType::kI32, {nn, kk / 8});
  out.zeros = buffer(zeros, DType::kU8, {nn, ng});
  out.group_size = local_group;
  if (act_order) {
    std::vector<int32_t> local(g_idx.begin() + c0, g_idx.begin() + c1);
    for (int32_t& g : local) g -= static_cast<int32_t>(g_begin);
    out.g_idx = buffer(local, DType::kI32, {kk});
  }
  return out;
}

absl::StatusOr<HostLinearWeight> read_fp8_shard(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                const PartShard& s) {
  if (auto st = check_shard(s); !st.ok()) return st;
  const std::string p = prefix_of(s.weight_name);
  const bool row_shard = s.row_begin != 0 || s.row_end != s.rows;
  const int64_t nn = s.row_end - s.row_begin;
  HostLinearWeight out;
  out.format = WeightFormat::kFp8;
  auto weight = row_shard ? read(ckpt, s.weight_name, {s.rows, s.cols}, {DType::kF8E4M3}, 0, s.row_begin, s.row_end)
                          : read(ckpt, s.weight_name, {s.rows, s.cols}, {DType::kF8E4M3}, 1, s.col_begin, s.col_end);
  if (!weight.ok()) return weight.status();
  out.weight = std::move(*weight);

  auto scale_info = ckpt.info(p + ".weight_scale");
  if (!scale_info.ok()) return scale_info.status();
  const int64_t scale_count = numel(scale_info->shape);
  const std::initializer_list<DType> float_types = {DType::kF32, DType::kBF16, DType::kF16};
  std::vector<float> scales;
  if (scale_count == 1) {
    auto buf = read(ckpt, p + ".weight_scale", scale_info->shape, float_types);
    if (!buf.ok()) return buf.status();
    scales.assign(static_cast<size_t>(nn), to_f32(*buf)[0]);  // per tensor: the same scale on every row
  } else if (scale_count == s.rows && (scale_info->shape.size() == 1 ||
                                       (scale_info->shape.size() == 2 && scale_info->shape[1] == 1))) {
    auto buf = read(ckpt, p + ".weight_scale", scale_info->shape, float_types, 0, s.row_begin, s.row_end);
    if (!buf.ok()) return buf.status();
    scales = to_f32(*buf);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        ckpt.dir(), ": '", p, ".weight_scale' has shape ", shape_string(scale_info->shape),
        ", expected one element (per tensor) or [", s.rows, ", 1] (per output channel): block-wise FP8 is not supported"));
  }
  out.scales = buffer(scales, DType::kF32, {nn});
  if (quant.static_activations) {
    const std::string name = p + ".input_scale";
    if (!ckpt.contains(name)) {
      return absl::NotFoundError(absl::StrCat(ckpt.dir(), ": '", name, "' is missing, but ", quant.source,
                                              " says activations have static scales"));
    }
    auto info = ckpt.info(name);
    if (!info.ok()) return info.status();
    if (numel(info->shape) != 1) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": '", name, "' has shape ", shape_string(info->shape),
                                                     ", expected one element (a per-tensor activation scale)"));
    }
    auto buf = read(ckpt, name, info->shape, float_types);
    if (!buf.ok()) return buf.status();
    out.input_scale = buffer(to_f32(*buf), DType::kF32, {1});
  }
  return out;
}

absl::StatusOr<HostLinearWeight> quantize_shard_at_load(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                        const PartShard& s) {
  if (auto st = check_shard(s); !st.ok()) return st;
  auto info = ckpt.info(s.weight_name);
  if (!info.ok()) return info.status();
  if (!is_float(info->dtype) || info->dtype == DType::kF8E4M3) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": tensor '", s.weight_name, "' has dtype ",
                                                   std::string(dtype_name(info->dtype)), "; quantization at load needs 16- or 32-bit weights"));
  }
  // Whole rows, even for a K slice: a row's scale is its max over all of K.
  auto buf = ckpt.read(s.weight_name, {s.rows, s.cols}, s.row_begin == 0 && s.row_end == s.rows ? -1 : 0, s.row_begin,
                       s.row_end);
  if (!buf.ok()) return buf.status();
  const std::vector<float> w = to_f32(*buf);
  const int64_t nn = s.row_end - s.row_begin, kk = s.col_end - s.col_begin;
  const bool fp8 = quant.method == QuantMethod::kFp8;
  std::vector<uint8_t> q(static_cast<size_t>(nn * kk));
  std::vector<float> scales(static_cast<size_t>(nn));
  for (int64_t n = 0; n < nn; ++n) {
    const float* row = w.data() + n * s.cols;
    float max_abs = 0.0f;
    for (int64_t k = 0; k < s.cols; ++k) max_abs = std::max(max_abs, std::fabs(row[k]));
    const float scale = quantization_scale(quant.method, max_abs);
    scales[n] = scale;
    for (int64_t k = 0; k < kk; ++k) {
      const float x = row[s.col_begin + k];
      q[n * kk + k] = fp8 ? quantize_fp8(x, scale) : static_cast<uint8_t>(quantize_int8(x, scale));
    }
  }
  HostLinearWeight out;
  out.format = fp8 ? WeightFormat::kFp8 : WeightFormat::kInt8;
  out.weight = buffer(q, fp8 ? DType::kF8E4M3 : DType::kI8, {nn, kk});
  out.scales = buffer(scales, DType::kF32, {nn});
  return out;
}

absl::StatusOr<HostLinearWeight> concat_rows(std::vector<HostLinearWeight> parts, const std::vector<std::string>& names) {
  HostLinearWeight out = std::move(parts.front());
  auto append = [](HostBuffer& dst, const HostBuffer& src) {
    dst.bytes.insert(dst.bytes.end(), src.bytes.begin(), src.bytes.end());
    dst.shape[0] += src.shape[0];
  };
  for (size_t i = 1; i < parts.size(); ++i) {
    const HostLinearWeight& part = parts[i];
    auto mismatch = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("fused layer parts '", names.front(), "' and '", names[i], "' ", what));
    };
    if (part.format != out.format) return mismatch("are stored in different formats (one quantized, one not?)");
    if (part.weight.dtype != out.weight.dtype || part.weight.shape[1] != out.weight.shape[1]) {
      return mismatch("have different weight dtypes or input features");
    }
    if (part.scales.dtype != out.scales.dtype) return mismatch("have scales of different dtypes");
    if (out.format == WeightFormat::kInt4) {
      if (part.group_size != out.group_size || part.zeros.shape[1] != out.zeros.shape[1]) {
        return mismatch("have different quantization groups");
      }
      if (part.g_idx.bytes != out.g_idx.bytes) {
        return mismatch("have different g_idx: the parts of a fused layer read the same input, so GPTQ act-order must "
                        "order their input features alike");
      }
      append(out.zeros, part.zeros);
    }
    if (out.format == WeightFormat::kFp8 && part.input_scale.bytes.empty() != out.input_scale.bytes.empty()) {
      return mismatch("disagree on static activation scales (input_scale)");
    }
    if (!out.input_scale.bytes.empty()) {
      float a = 0.0f, b = 0.0f;
      std::memcpy(&a, out.input_scale.bytes.data(), 4);
      std::memcpy(&b, part.input_scale.bytes.data(), 4);
      a = std::max(a, b);
      std::memcpy(out.input_scale.bytes.data(), &a, 4);
    }
    append(out.weight, part.weight);
    append(out.scales, part.scales);
  }
  return out;
}

LinearWeight upload_linear(const HostLinearWeight& host, Backend& backend) {
  LinearWeight w;
  w.format = host.format;
  w.weight = backend.upload(host.weight.view(), host.weight.dtype);
  if (!host.scales.bytes.empty()) w.scales = backend.upload(host.scales.view(), host.scales.dtype);
  if (!host.zeros.bytes.empty()) w.zeros = backend.upload(host.zeros.view(), host.zeros.dtype);
  if (!host.g_idx.bytes.empty()) w.g_idx = backend.upload(host.g_idx.view(), host.g_idx.dtype);
  if (!host.input_scale.bytes.empty()) w.input_scale = backend.upload(host.input_scale.view(), host.input_scale.dtype);
  w.group_size = host.group_size;
  return w;
}

}  // namespace shardserve
