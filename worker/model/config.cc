#include "worker/model/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

using nlohmann::json;

absl::StatusOr<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::Status field_error(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", field, " ", what));
}

// Reads a positive integer field; `required` false leaves `out` as it is when absent or null.
absl::Status get_int(const json& j, const char* key, bool required, int64_t* out, int64_t min = 1) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? field_error(key, "is missing") : absl::OkStatus();
  }
  if (!it->is_number_integer()) return field_error(key, "must be an integer");
  *out = it->get<int64_t>();
  if (*out < min) return field_error(key, absl::StrCat("must be >= ", min, ", got ", *out));
  return absl::OkStatus();
}

absl::Status get_number(const json& j, const char* key, double* out) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return field_error(key, "must be a number");
  *out = it->get<double>();
  return absl::OkStatus();
}

// bos/eos ids: an integer, a list of integers, or null.
absl::Status get_token_ids(const json& j, const char* key, std::vector<int64_t>* out) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  out->clear();
  if (it->is_number_integer()) {
    out->push_back(it->get<int64_t>());
    return absl::OkStatus();
  }
  if (!it->is_array()) return field_error(key, "must be an integer or a list of integers");
  for (const auto& v : *it) {
    if (!v.is_number_integer()) return field_error(key, "must be an integer or a list of integers");
    out->push_back(v.get<int64_t>());
  }
  return absl::OkStatus();
}

absl::Status parse_rope(const json& j, ModelConfig* c) {
  // transformers >= 5 writes rope settings as `rope_parameters` (with rope_theta inside);
  // earlier versions as `rope_scaling` beside a top-level `rope_theta`.
  if (auto st = get_number(j, "rope_theta", &c->rope_theta); !st.ok()) return st;
  const json* scaling = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const auto it = j.find(key);
    if (it != j.end() && !it->is_null()) {
      if (!it->is_object()) return field_error(key, "must be an object");
      scaling = &*it;
      if (auto st = get_number(*it, "rope_theta", &c->rope_theta); !st.ok()) return st;
    }
  }
  if (c->rope_theta <= 0) return field_error("rope_theta", "must be positive");
  if (scaling == nullptr) return absl::OkStatus();

  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    const auto it = scaling->find(key);
    if (it != scaling->end() && it->is_string()) type = it->get<std::string>();
  }
  RopeScaling& r = c->rope_scaling;
  r.rope_type = type;
  if (type == "default") return absl::OkStatus();
  if (type != "llama3") {
    return field_error("rope_scaling.rope_type",
                       absl::StrCat("'", type, "' is not supported (supported: default, llama3)"));
  }
  for (auto [key, out] : {std::pair{"factor", &r.factor}, std::pair{"low_freq_factor", &r.low_freq_factor},
                          std::pair{"high_freq_factor", &r.high_freq_factor}}) {
    if (!scaling->contains(key)) return field_error(absl::StrCat("rope_scaling.", key), "is missing");
    if (auto st = get_number(*scaling, key, out); !st.ok()) return st;
  }
  if (auto st = get_int(*scaling, "original_max_position_embeddings", true,
                        &r.original_max_position_embeddings);
      !st.ok()) {
    return field_error("rope_scaling.original_max_position_embeddings", "must be a positive integer");
  }
  if (r.factor < 1.0 || r.low_freq_factor <= 0 || r.high_freq_factor <= r.low_freq_factor) {
    return field_error("rope_scaling", "needs factor >= 1 and 0 < low_freq_factor < high_freq_factor");
  }
  return absl::OkStatus();
}

absl::Status parse_dtype(const json& j, ModelConfig* c) {
  for (const char* key : {"torch_dtype", "dtype"}) {
    const auto it = j.find(key);
    if (it == j.end() || !it->is_string()) continue;
    const std::string name = it->get<std::string>();
    if (name == "bfloat16") c->dtype = DType::kBF16;
    else if (name == "float16") c->dtype = DType::kF16;
    else if (name == "float32") c->dtype = DType::kF32;
    else return field_error(key, absl::StrCat("'", name, "' is not supported (bfloat16, float16, float32)"));
    return absl::OkStatus();
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> parse_model_config(const std::string& json_text) {
  const json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json: not a JSON object");
  }
  ModelConfig c;
  if (j.contains("model_type")) {
    if (!j["model_type"].is_string()) return field_error("model_type", "must be a string");
    c.model_type = j["model_type"].get<std::string>();
  }
  if (c.model_type != "llama") {
    return field_error("model_type", absl::StrCat("'", c.model_type, "' is not supported (llama)"));
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return field_error("hidden_act", "must be \"silu\" for a Llama model");
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (j.contains(key) && j[key] == true) return field_error(key, "true is not supported");
  }
  for (auto [key, out] : {std::pair{"vocab_size", &c.vocab_size}, std::pair{"hidden_size", &c.hidden_size},
                          std::pair{"intermediate_size", &c.intermediate_size},
                          std::pair{"num_hidden_layers", &c.num_hidden_layers},
                          std::pair{"num_attention_heads", &c.num_attention_heads}}) {
    if (auto st = get_int(j, key, true, out); !st.ok()) return st;
  }
  c.num_key_value_heads = c.num_attention_heads;
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.max_position_embeddings = 2048;
  if (auto st = get_int(j, "num_key_value_heads", false, &c.num_key_value_heads); !st.ok()) return st;
  if (auto st = get_int(j, "head_dim", false, &c.head_dim); !st.ok()) return st;
  if (auto st = get_int(j, "max_position_embeddings", false, &c.max_position_embeddings); !st.ok()) return st;
  // Far beyond any Llama (vocab 128256, FFN 53248, 128 heads of 128, 126 layers): a larger size is
  // a corrupt or hostile file, which would only make loading allocate without bound (the RoPE
  // table of a head_dim of 4e9 is 16 GB).
  constexpr int64_t kMaxSize = int64_t{1} << 20;
  for (auto [key, value] : {std::pair{"vocab_size", c.vocab_size}, std::pair{"hidden_size", c.hidden_size},
                            std::pair{"intermediate_size", c.intermediate_size},
                            std::pair{"num_hidden_layers", c.num_hidden_layers},
                            std::pair{"num_attention_heads", c.num_attention_heads},
                            std::pair{"num_key_value_heads", c.num_key_value_heads}, std::pair{"head_dim", c.head_dim}}) {
    if (value > kMaxSize) return field_error(key, absl::StrCat("must be <= ", kMaxSize, ", got ", value));
  }
  if (auto st = get_number(j, "rms_norm_eps", &c.rms_norm_eps); !st.ok()) return st;
  if (c.rms_norm_eps <= 0) return field_error("rms_norm_eps", "must be positive");
  if (auto st = parse_rope(j, &c); !st.ok()) return st;
  if (auto st = parse_dtype(j, &c); !st.ok()) return st;
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean()) return field_error("tie_word_embeddings", "must be a boolean");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  std::vector<int64_t> bos;
  if (auto st = get_token_ids(j, "bos_token_id", &bos); !st.ok()) return st;
  if (!bos.empty()) c.bos_token_id = bos.front();
  if (auto st = get_token_ids(j, "eos_token_id", &c.eos_token_ids); !st.ok()) return st;

  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return field_error("num_key_value_heads",
                       absl::StrCat(c.num_key_value_heads, " does not divide num_attention_heads ",
                                    c.num_attention_heads));
  }
  if (c.head_dim % 2 != 0) return field_error("head_dim", "must be even for rotary embeddings");
  if (c.head_dim * c.num_attention_heads != c.hidden_size && !j.contains("head_dim")) {
    return field_error("hidden_size", "is not divisible by num_attention_heads (set head_dim)");
  }
  for (int64_t id : c.eos_token_ids) {
    if (id < 0 || id >= c.vocab_size) return field_error("eos_token_id", absl::StrCat(id, " is outside the vocabulary"));
  }
  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    auto q = parse_quantization_config(j["quantization_config"].dump(), "config.json quantization_config");
    if (!q.ok()) return q.status();
    c.quantization = *q;
  }
  return c;
}

absl::StatusOr<ModelConfig> load_model_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  auto text = read_file(path);
  if (!text.ok()) return text.status();
  auto config = parse_model_config(*text);
  if (!config.ok()) return absl::Status(config.status().code(), absl::StrCat(dir, "/", config.status().message()));
  const std::string quant_path = (std::filesystem::path(dir) / "quant_config.json").string();
  if (!config->quantization.quantized() && std::filesystem::exists(quant_path)) {
    auto quant_text = read_file(quant_path);
    if (!quant_text.ok()) return quant_text.status();
    auto q = parse_quantization_config(*quant_text, "quant_config.json");
    if (!q.ok()) return absl::Status(q.status().code(), absl::StrCat(dir, "/", q.status().message()));
    config->quantization = *q;
  }
  return config;
}

absl::StatusOr<GenerationConfig> parse_generation_config(const std::string& json_text) {
  const json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("generation_config.json: not a JSON object");
  }
  GenerationConfig g;
  std::vector<int64_t> bos;
  if (auto st = get_token_ids(j, "bos_token_id", &bos); !st.ok()) return st;
  if (!bos.empty()) g.bos_token_id = bos.front();
  if (auto st = get_token_ids(j, "eos_token_id", &g.eos_token_ids); !st.ok()) return st;
  if (j.contains("do_sample") && j["do_sample"].is_boolean()) g.do_sample = j["do_sample"].get<bool>();
  if (auto st = get_number(j, "temperature", &g.temperature); !st.ok()) return st;
  if (auto st = get_number(j, "top_p", &g.top_p); !st.ok()) return st;
  if (auto st = get_int(j, "top_k", false, &g.top_k, 0); !st.ok()) return st;
  return g;
}

absl::StatusOr<GenerationConfig> load_generation_config(const std::string& dir,
                                                        const ModelConfig& model) {
  const std::string path = (std::filesystem::path(dir) / "generation_config.json").string();
  GenerationConfig g;
  g.bos_token_id = model.bos_token_id;
  g.eos_token_ids = model.eos_token_ids;
  if (!std::filesystem::exists(path)) return g;
  auto text = read_file(path);
  if (!text.ok()) return text.status();
  auto parsed = parse_generation_config(*text);
  if (!parsed.ok()) return parsed.status();
  if (parsed->bos_token_id < 0) parsed->bos_token_id = g.bos_token_id;
  if (parsed->eos_token_ids.empty()) parsed->eos_token_ids = g.eos_token_ids;
  return parsed;
}

std::vector<int64_t> stop_token_ids(const ModelConfig& model, const GenerationConfig& gen) {
  return gen.eos_token_ids.empty() ? model.eos_token_ids : gen.eos_token_ids;
}

std::vector<double> rope_inv_freq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / static_cast<double>(c.head_dim));
  }
  const RopeScaling& r = c.rope_scaling;
  if (r.rope_type != "llama3") return inv_freq;
  // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between
  // interpolated smoothly (the reference implementation's _compute_llama3_parameters).
  const double old_len = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / r.low_freq_factor;
  const double high_freq_wavelen = old_len / r.high_freq_factor;
  for (double& f : inv_freq) {
    const double wavelen = 2.0 * std::numbers::pi / f;
    if (wavelen > low_freq_wavelen) {
      f = f / r.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      f = (1.0 - smooth) * f / r.factor + smooth * f;
    }
  }
  return inv_freq;
}

}  // namespace shardserve
