#include "worker/model/presets.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace shardserve {
namespace {

// Published config.json contents (meta-llama/*-Instruct), trimmed to the fields that matter.
const char* kLlama31_8B = R"({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009]})";
const char* kLlama31_70B = R"({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009]})";
const char* kLlama32_1B = R"({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
  "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})";

const std::vector<std::pair<std::string, const char*>>& presets() {
  static const std::vector<std::pair<std::string, const char*>> p = {
      {"llama-3.1-8b", kLlama31_8B}, {"llama-3.1-70b", kLlama31_70B}, {"llama-3.2-1b", kLlama32_1B}};
  return p;
}

}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& [name, _] : presets()) names.push_back(name);
  return names;
}

absl::StatusOr<ModelConfig> preset_or_config(const std::string& name_or_path) {
  for (const auto& [name, json] : presets()) {
    if (name == name_or_path) return parse_model_config(json);
  }
  if (std::filesystem::is_regular_file(name_or_path)) {
    std::ifstream in(name_or_path);
    std::stringstream s;
    s << in.rdbuf();
    return parse_model_config(s.str());
  }
  return absl::NotFoundError(absl::StrCat("'", name_or_path, "' is neither a preset (", absl::StrJoin(preset_names(), ", "),
                                          ") nor a config.json file"));
}

}  // namespace shardserve
