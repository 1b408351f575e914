#include "worker/model/quantization.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

using nlohmann::json;

class Fields {
 public:
  Fields(const json& j, std::string where) : j_(j), where_(std::move(where)) {}

  absl::Status error(const std::string& field, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": ", field, " ", what));
  }
  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  // The first of `keys` present (AutoAWQ spells its fields two ways), or nullptr.
  const json* find(std::initializer_list<const char*> keys, std::string* found = nullptr) const {
    for (const char* k : keys) {
      if (has(k)) {
        if (found) *found = k;
        return &j_[k];
      }
    }
    return nullptr;
  }
  absl::Status get_int(std::initializer_list<const char*> keys, int64_t* out) const {
    std::string key;
    const json* v = find(keys, &key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer()) return error(key, "must be an integer");
    *out = v->get<int64_t>();
    return absl::OkStatus();
  }
  absl::Status get_bool(const char* key, bool* out) const {
    if (!has(key)) return absl::OkStatus();
    if (!j_[key].is_boolean()) return error(key, "must be true or false");
    *out = j_[key].get<bool>();
    return absl::OkStatus();
  }
  absl::Status get_string(std::initializer_list<const char*> keys, std::string* out) const {
    std::string key;
    const json* v = find(keys, &key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return error(key, "must be a string");
    *out = absl::AsciiStrToLower(v->get<std::string>());
    return absl::OkStatus();
  }

 private:
  const json& j_;
  std::string where_;
};

absl::Status check_bits(const Fields& f, const char* method) {
  int64_t bits = 4;
  if (auto st = f.get_int({"bits", "w_bit"}, &bits); !st.ok()) return st;
  if (bits != 4) {
    return f.error("bits", absl::StrCat(bits, " is not supported: ", method, " checkpoints load only with 4-bit weights"));
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizationConfig> parse_awq(const Fields& f, QuantizationConfig q) {
  q.method = QuantMethod::kAwq;
  if (auto st = check_bits(f, "AWQ"); !st.ok()) return st;
  int64_t group = 0;
  if (auto st = f.get_int({"group_size", "q_group_size"}, &group); !st.ok()) return st;
  if (group <= 0) return f.error("group_size", "must be a positive number of input features per group (AutoAWQ GEMM)");
  q.group_size = group;
  std::string version = "gemm";
  if (auto st = f.get_string({"version"}, &version); !st.ok()) return st;
  if (version != "gemm") {
    return f.error("version", absl::StrCat("'", version, "' is not supported: only AutoAWQ GEMM packing (version gemm) loads"));
  }
  bool zero_point = true;
  if (auto st = f.get_bool("zero_point", &zero_point); !st.ok()) return st;
  if (!zero_point) return f.error("zero_point", "false is not supported: AutoAWQ GEMM checkpoints carry zero points");
  return q;
}

absl::StatusOr<QuantizationConfig> parse_gptq(const Fields& f, QuantizationConfig q) {
  q.method = QuantMethod::kGptq;
  if (auto st = check_bits(f, "GPTQ"); !st.ok()) return st;
  int64_t group = -1;
  if (auto st = f.get_int({"group_size"}, &group); !st.ok()) return st;
  if (group == 0 || group < -1) return f.error("group_size", absl::StrCat(group, " must be positive, or -1 for one group"));
  q.group_size = group == -1 ? 0 : group;
  if (auto st = f.get_bool("desc_act", &q.desc_act); !st.ok()) return st;
  if (auto st = f.get_bool("sym", &q.sym); !st.ok()) return st;
  bool marlin = false;
  if (auto st = f.get_bool("is_marlin_format", &marlin); !st.ok()) return st;
  // GPTQModel writes checkpoint_format (older releases: format).
  std::string format = marlin ? "marlin" : "gptq";
  if (auto st = f.get_string({"checkpoint_format", "format"}, &format); !st.ok()) return st;
  if (format == "gptq_v2") {
    q.gptq_v2 = true;
  } else if (format != "gptq") {
    return f.error("checkpoint_format",
                   absl::StrCat("'", format, "' is not supported (gptq, gptq_v2): re-export the model in GPTQ format"));
  }
  return q;
}

// One config group's "weights" or "input_activations" scheme of a compressed-tensors checkpoint.
absl::Status check_fp8_scheme(const Fields& f, const json& s, const std::string& field, bool weights, bool* dynamic) {
  if (!s.is_object()) return f.error(field, "must be an object");
  // json::value throws on a value of another type (and casts a float): check the types first.
  if (s.contains("num_bits") && !s["num_bits"].is_number_integer()) return f.error(field + ".num_bits", "must be an integer");
  for (const char* key : {"type", "strategy"}) {
    if (s.contains(key) && !s[key].is_string()) return f.error(absl::StrCat(field, ".", key), "must be a string");
  }
  const int64_t bits = s.value("num_bits", int64_t{0});
  const std::string type = s.value("type", std::string());
  if (bits != 8 || type != "float") {
    return f.error(field, absl::StrCat("is ", bits, "-bit ", type.empty() ? "?" : type,
                                       ": only FP8 (num_bits 8, type float) compressed-tensors checkpoints load"));
  }
  if (s.contains("symmetric") && s["symmetric"] == false) return f.error(field, "symmetric false is not supported for FP8");
  const std::string strategy = s.value("strategy", std::string("tensor"));
  *dynamic = s.contains("dynamic") && s["dynamic"] == true;
  if (weights) {
    if (strategy != "tensor" && strategy != "channel") {
      return f.error(field + ".strategy", absl::StrCat("'", strategy, "' is not supported for FP8 weights (tensor, channel)"));
    }
    if (*dynamic) return f.error(field + ".dynamic", "true is not supported for weights");
  } else if (*dynamic ? strategy != "token" : strategy != "tensor") {
    return f.error(field, absl::StrCat("strategy '", strategy, "' with dynamic ", *dynamic ? "true" : "false",
                                       " is not supported (dynamic per-token, or static per-tensor activation scales)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizationConfig> parse_compressed_tensors(const json& j, const Fields& f, QuantizationConfig q) {
  q.method = QuantMethod::kFp8;
  std::string format;
  if (auto st = f.get_string({"format"}, &format); !st.ok()) return st;
  if (format != "float-quantized") {
    return f.error("format", absl::StrCat("'", format, "' is not supported: only FP8 (float-quantized) compressed-tensors "
                                          "checkpoints load"));
  }
  if (!j.contains("config_groups") || !j["config_groups"].is_object() || j["config_groups"].empty()) {
    return f.error("config_groups", "is missing or empty");
  }
  bool first = true;
  for (const auto& [name, group] : j["config_groups"].items()) {
    const std::string where = absl::StrCat("config_groups.", name);
    if (!group.is_object() || !group.contains("weights") || group["weights"].is_null()) {
      return f.error(where + ".weights", "is missing");
    }
    bool weights_dynamic = false;
    if (auto st = check_fp8_scheme(f, group["weights"], where + ".weights", true, &weights_dynamic); !st.ok()) return st;
    if (!group.contains("input_activations") || group["input_activations"].is_null()) {
      return f.error(where + ".input_activations",
                     "is null: weight-only FP8 is not supported (W8A8 with static or dynamic activation scales is)");
    }
    bool dynamic = false;
    if (auto st = check_fp8_scheme(f, group["input_activations"], where + ".input_activations", false, &dynamic); !st.ok()) {
      return st;
    }
    if (!first && q.static_activations == dynamic) {
      return f.error("config_groups", "mix static and dynamic activation scales");
    }
    q.static_activations = !dynamic;
    first = false;
  }
  return q;
}

absl::StatusOr<QuantizationConfig> parse_fp8(const Fields& f, QuantizationConfig q) {
  q.method = QuantMethod::kFp8;
  if (f.has("weight_block_size")) return f.error("weight_block_size", "is set: block-wise FP8 scales are not supported");
  std::string scheme = "dynamic";
  if (auto st = f.get_string({"activation_scheme"}, &scheme); !st.ok()) return st;
  if (scheme != "static" && scheme != "dynamic") {
    return f.error("activation_scheme", absl::StrCat("'", scheme, "' is not one of static, dynamic"));
  }
  q.static_activations = scheme == "static";
  return q;
}

}  // namespace

std::string quant_method_name(QuantMethod method) {
  switch (method) {
    case QuantMethod::kNone: return "none";
    case QuantMethod::kAwq: return "awq";
    case QuantMethod::kGptq: return "gptq";
    case QuantMethod::kFp8: return "fp8";
    case QuantMethod::kInt8: return "int8";
  }
  return "?";
}

std::string QuantizationConfig::name() const { return quant_method_name(method); }

std::string QuantizationConfig::describe() const {
  const std::string groups = group_size > 0 ? absl::StrCat("group_size ", group_size) : "one group per output feature";
  switch (method) {
    case QuantMethod::kNone: return "none (16-bit weights)";
    case QuantMethod::kAwq: return absl::StrCat("awq (AutoAWQ GEMM, 4-bit, ", groups, ")");
    case QuantMethod::kGptq:
      return absl::StrCat("gptq (4-bit, ", groups, desc_act ? ", act-order" : "", sym ? ", symmetric" : ", asymmetric",
                          gptq_v2 ? ", gptq_v2 zeros)" : ", v1 zeros)");
    case QuantMethod::kFp8:
      return absl::StrCat("fp8 (E4M3 weights with per-output-channel scales", at_load ? ", quantized at load" : "",
                          static_activations ? ", static activation scales)" : ", dynamic per-token activation scales)");
    case QuantMethod::kInt8: return "int8 (weight-only, per-output-channel scales, quantized at load)";
  }
  return "?";
}

absl::StatusOr<QuantizationConfig> parse_quantization_config(const std::string& json_text, const std::string& source) {
  const json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  const Fields f(j, source);
  QuantizationConfig q;
  q.source = source;
  std::string method;
  if (auto st = f.get_string({"quant_method"}, &method); !st.ok()) return st;
  // AutoAWQ's quant_config.json names no method: its w_bit / q_group_size say what it is.
  if (method.empty() && (f.has("w_bit") || f.has("q_group_size"))) method = "awq";
  if (method == "awq") return parse_awq(f, q);
  if (method == "gptq") return parse_gptq(f, q);
  if (method == "compressed-tensors") return parse_compressed_tensors(j, f, q);
  if (method == "fp8") return parse_fp8(f, q);
  return f.error("quant_method", absl::StrCat("'", method, "' is not supported (awq, gptq, compressed-tensors FP8, fp8)"));
}

absl::StatusOr<QuantizationConfig> resolve_quantization(const QuantizationConfig& checkpoint, const std::string& requested) {
  if (requested.empty() || requested == "none") return checkpoint;
  if (requested != "awq" && requested != "gptq" && requested != "fp8" && requested != "int8") {
    return absl::InvalidArgumentError(
        absl::StrCat("quantization '", requested, "' is not one of none, awq, gptq, fp8, int8"));
  }
  if (checkpoint.quantized()) {
    if (requested == checkpoint.name()) return checkpoint;
    return absl::InvalidArgumentError(absl::StrCat(
        "quantization '", requested, "' was requested, but the checkpoint is already quantized as ", checkpoint.describe(),
        " (", checkpoint.source, "); a quantized checkpoint loads only as published: leave quantization unset (or none), "
        "or set it to ", checkpoint.name()));
  }
  if (requested == "awq" || requested == "gptq") {
    return absl::InvalidArgumentError(absl::StrCat(
        "quantization '", requested, "' needs a checkpoint published in that format, but this one has 16-bit weights (no "
        "quantization_config in config.json); ", requested, " cannot be made at load: use fp8 or int8 to quantize at load"));
  }
  QuantizationConfig q;
  q.method = requested == "fp8" ? QuantMethod::kFp8 : QuantMethod::kInt8;
  q.at_load = true;
  q.source = absl::StrCat("quantization ", requested, " at load");
  return q;
}

absl::StatusOr<QuantizationConfig> synthetic_quantization(const std::string& requested) {
  QuantizationConfig q;
  q.source = absl::StrCat("synthetic ", requested);
  if (requested.empty() || requested == "none") return QuantizationConfig{};
  if (requested == "awq" || requested == "gptq") {
    q.method = requested == "awq" ? QuantMethod::kAwq : QuantMethod::kGptq;
    q.group_size = 128;
    return q;
  }
  if (requested == "fp8") {
    q.method = QuantMethod::kFp8;
    return q;
  }
  if (requested == "int8") {
    q.method = QuantMethod::kInt8;
    return q;
  }
  return absl::InvalidArgumentError(absl::StrCat("quantization '", requested, "' is not one of none, awq, gptq, fp8, int8"));
}

bool is_decoder_projection(const std::string& weight_name) {
  return absl::StartsWith(weight_name, "model.layers.") && absl::EndsWith(weight_name, "_proj.weight");
}

float quantization_scale(QuantMethod method, float max_abs) {
  if (!(max_abs > 0.0f) || !std::isfinite(max_abs)) return 1.0f;
  return max_abs / (method == QuantMethod::kFp8 ? 448.0f : 127.0f);
}

uint8_t quantize_fp8(float w, float scale) { return f32_to_fp8e4m3(w / scale); }

int8_t quantize_int8(float w, float scale) {
  const float q = std::nearbyint(w / scale);
  return static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
}

}  // namespace shardserve
