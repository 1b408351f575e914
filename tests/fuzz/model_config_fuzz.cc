// config.json and generation_config.json of a checkpoint, from untrusted bytes: parse_model_config
// and parse_generation_config (the loaders read the file and call these). An accepted config must
// satisfy what the model code relies on without checking again: positive sizes, heads grouped
// evenly, an even head_dim, EOS ids inside the vocabulary, and finite RoPE frequencies.
#include <cmath>
#include <cstdint>
#include <string>

#include "tests/fuzz/fuzz_check.h"
#include "worker/model/config.h"

using namespace shardserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  auto config = parse_model_config(text);
  if (config.ok()) {
    const ModelConfig& c = *config;
    FUZZ_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 && c.num_hidden_layers > 0,
               "a non-positive size was accepted");
    FUZZ_CHECK(c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
                   c.num_attention_heads % c.num_key_value_heads == 0,
               "query heads not grouped evenly over KV heads");
    FUZZ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "head_dim not positive and even");
    FUZZ_CHECK(c.max_position_embeddings > 0, "max_position_embeddings not positive");
    FUZZ_CHECK(c.rms_norm_eps > 0 && c.rope_theta > 0, "rms_norm_eps or rope_theta not positive");
    for (int64_t id : c.eos_token_ids) FUZZ_CHECK(id >= 0 && id < c.vocab_size, "EOS id outside the vocabulary");
    for (double f : rope_inv_freq(c)) FUZZ_CHECK(std::isfinite(f) && f >= 0, "RoPE frequency not finite");
  } else {
    FUZZ_CHECK(!config.status().message().empty(), "an error without a message");
  }

  auto gen = parse_generation_config(text);
  if (gen.ok()) {
    FUZZ_CHECK(gen->top_k >= 0, "negative top_k accepted");
  } else {
    FUZZ_CHECK(!gen.status().message().empty(), "an error without a message");
  }
  return 0;
}
