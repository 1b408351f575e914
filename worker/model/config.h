// ModelConfig and GenerationConfig: what a Hugging Face Llama checkpoint's config.json and
// generation_config.json say, checked. Llama 2, 3, 3.1 and 3.2 configs parse; anything this code
// cannot run faithfully (another architecture, activation or rope type, biases, a quantization
// format it cannot load exactly) is an INVALID_ARGUMENT naming the field, never a silently wrong
// model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/quantization.h"
#include "worker/runtime/dtype.h"

namespace shardserve {

struct RopeScaling {
  // "default" (none) or "llama3".
  std::string rope_type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string model_type = "llama";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads (no GQA)
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  DType dtype = DType::kBF16;  // torch_dtype (or dtype) of the checkpoint
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  // How the linear layers are stored (config.json quantization_config, or AutoAWQ's
  // quant_config.json); load_model replaces it by what the model loads with
  // (resolve_quantization: a --quantization request may quantize a 16-bit checkpoint at load).
  QuantizationConfig quantization;
};

struct GenerationConfig {
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  bool do_sample = false;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;
};

absl::StatusOr<ModelConfig> parse_model_config(const std::string& json_text);
// Reads DIR/config.json (and DIR/quant_config.json, AutoAWQ's older place for its quantization,
// when config.json has no quantization_config).
absl::StatusOr<ModelConfig> load_model_config(const std::string& dir);
absl::StatusOr<GenerationConfig> parse_generation_config(const std::string& json_text);
// Reads DIR/generation_config.json; a missing file gives the model config's bos/eos.
absl::StatusOr<GenerationConfig> load_generation_config(const std::string& dir,
                                                        const ModelConfig& model);

// The EOS ids generation stops at: generation_config's when it names any, else config.json's.
std::vector<int64_t> stop_token_ids(const ModelConfig& model, const GenerationConfig& gen);

// RoPE inverse frequencies (head_dim / 2 of them) with the config's scaling applied.
std::vector<double> rope_inv_freq(const ModelConfig& config);

}  // namespace shardserve
