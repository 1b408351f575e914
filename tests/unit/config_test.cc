// config.json parsing against the published Llama configs, written out here field by field from
// the files that ship with meta-llama/Llama-3.1-8B-Instruct, Llama-3.1-70B-Instruct and
// Llama-2-7b-hf, and the errors for what we do not run.
#include "worker/model/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

namespace shardserve {
namespace {

const char* kLlama31_8B = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 128256})";

const char* kLlama31_70B = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 128256})";

const char* kLlama2_7B = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "tie_word_embeddings": false,
  "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": true,
  "vocab_size": 32000})";

TEST(ModelConfig, Llama31_8B) {
  auto c = parse_model_config(kLlama31_8B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->intermediate_size, 14336);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->dtype, DType::kBF16);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
}

TEST(ModelConfig, Llama31_70B) {
  auto c = parse_model_config(kLlama31_70B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 8192);
  EXPECT_EQ(c->num_hidden_layers, 80);
  EXPECT_EQ(c->num_attention_heads, 64);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->intermediate_size, 28672);
  // The design's KV figure: 2 x 80 layers x 8 KV heads x 128 x 2 bytes per token in BF16.
  EXPECT_EQ(2 * c->num_hidden_layers * c->num_key_value_heads * c->head_dim * 2, 327680);
}

TEST(ModelConfig, Llama2_7BHasNoGqaAndNoScaling) {
  auto c = parse_model_config(kLlama2_7B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->rope_scaling.rope_type, "default");
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->dtype, DType::kF16);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{2}));
}

TEST(ModelConfig, Llama3RopeFrequencies) {
  auto c = parse_model_config(kLlama31_8B);
  ASSERT_TRUE(c.ok());
  const std::vector<double> f = rope_inv_freq(*c);
  ASSERT_EQ(f.size(), 64u);
  auto base = [](int i) { return std::pow(500000.0, -2.0 * i / 128.0); };
  // Wavelength under 8192/4 = 2048 positions: unchanged.
  EXPECT_DOUBLE_EQ(f[0], 1.0);
  EXPECT_DOUBLE_EQ(f[20], base(20));
  // Over 8192: divided by the factor 8.
  EXPECT_DOUBLE_EQ(f[63], base(63) / 8.0);
  EXPECT_DOUBLE_EQ(f[40], base(40) / 8.0);
  // Between: wavelength 2*pi/base(30) ~ 2950 positions, interpolated.
  const double wavelen = 2 * std::numbers::pi / base(30);
  ASSERT_GT(wavelen, 2048);
  ASSERT_LT(wavelen, 8192);
  const double smooth = (8192.0 / wavelen - 1.0) / 3.0;
  EXPECT_NEAR(f[30], (1 - smooth) * base(30) / 8 + smooth * base(30), 1e-15);
  EXPECT_LT(f[30], base(30));
  EXPECT_GT(f[30], base(30) / 8);
}

TEST(ModelConfig, TransformersV5RopeParameters) {
  auto c = parse_model_config(R"({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "rope_parameters": {"rope_type": "llama3",
    "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c->head_dim, 4);
  EXPECT_EQ(c->num_key_value_heads, 2);
}

void expect_error(const std::string& json, const std::string& fragment) {
  auto c = parse_model_config(json);
  ASSERT_FALSE(c.ok()) << "accepted: " << json;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(fragment), std::string::npos) << c.status();
}

TEST(ModelConfig, ClearErrors) {
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2)";
  expect_error("{" + base + R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})", "'yarn' is not supported");
  expect_error("{" + base + R"(, "rope_scaling": {"type": "linear", "factor": 2.0}})", "'linear' is not supported");
  expect_error("{" + base + R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})", "rope_scaling.low_freq_factor is missing");
  expect_error("{" + base + R"(, "model_type": "mistral"})", "'mistral' is not supported");
  expect_error("{" + base + R"(, "hidden_act": "gelu"})", "hidden_act");
  expect_error("{" + base + R"(, "attention_bias": true})", "attention_bias");
  expect_error("{" + base + R"(, "num_key_value_heads": 3})", "3 does not divide num_attention_heads 2");
  expect_error("{" + base + R"(, "eos_token_id": 10})", "eos_token_id 10 is outside the vocabulary");
  expect_error("{" + base + R"(, "eos_token_id": "x"})", "eos_token_id must be an integer or a list");
  expect_error("{" + base + R"(, "torch_dtype": "float64"})", "'float64' is not supported");
  expect_error(R"({"vocab_size": 10, "hidden_size": 8})", "intermediate_size is missing");
  expect_error(R"({"vocab_size": 10, "hidden_size": 0, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1})",
               "hidden_size must be >= 1");
  // Found by fuzzing: a huge size made loading allocate 16 GB for the RoPE table.
  expect_error("{" + base + R"(, "head_dim": 4000000000})", "head_dim must be <= 1048576");
  expect_error("[1, 2]", "not a JSON object");
  expect_error("{", "not a JSON object");
}

// Found by fuzzing (tests/fuzz/model_config_fuzz.cc): a compressed-tensors scheme with a field of
// the wrong type threw out of the parser (json::value), ending the worker instead of an error.
TEST(ModelConfig, QuantizationFieldsOfTheWrongTypeAreErrors) {
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2)";
  const std::string fp8 = R"("quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": )";
  expect_error("{" + base + ", " + fp8 + R"({"num_bits": "8", "type": "float"}}}}})", "weights.num_bits must be an integer");
  expect_error("{" + base + ", " + fp8 + R"({"num_bits": 8, "type": 1}}}}})", "weights.type must be a string");
  expect_error("{" + base + ", " + fp8 + R"({"num_bits": 8, "type": "float", "strategy": null}}}}})",
               "weights.strategy must be a string");
}

TEST(GenerationConfig, EosListsAndFallback) {
  auto g = parse_generation_config(R"({"bos_token_id": 128000, "do_sample": true,
      "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9})");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_TRUE(g->do_sample);
  EXPECT_DOUBLE_EQ(g->temperature, 0.6);
  auto model = parse_model_config(kLlama2_7B);
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(stop_token_ids(*model, GenerationConfig{}), (std::vector<int64_t>{2}));
  EXPECT_EQ(stop_token_ids(*model, *g), (std::vector<int64_t>{128001, 128008, 128009}));
}

}  // namespace
}  // namespace shardserve
