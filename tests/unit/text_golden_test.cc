// Text in, tokens and text out, against transformers on the tiny checkpoint that carries the real
// Llama 3.1 tokenizer (tests/data/tiny/llama3-tokenizer-bf16): a plain-text prompt (BOS added) and
// a chat rendered with the chat template must give HF's prompt ids, greedy ids and decoded text.
// Its 128k-entry logits are not stored (37 MB); logits are compared on the small checkpoints.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/unit/cli_util.h"
#include "worker/engine/engine.h"
#include "worker/engine/executor.h"

namespace shardserve {
namespace {

using nlohmann::json;
using testing::run_cli;

const std::string kDir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-tokenizer-bf16";

json golden() { return json::parse(std::ifstream(kDir + "/golden.json")); }

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

TEST(TextGolden, RandomPromptsGiveGoldenTokensThroughTheEngine) {
  const json g = golden();
  auto loaded = load_model({.model_dir = kDir, .num_kv_blocks = 32});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  Engine engine(*loaded->executor, {});
  std::vector<Request> requests;
  for (const auto& p : g["prompts"]) {
    Request r{"", p["prompt_ids"].get<std::vector<int32_t>>(), {}};
    r.params.temperature = 0;
    r.params.ignore_eos = true;
    r.params.max_tokens = g["steps"].get<int64_t>();
    requests.push_back(r);
  }
  auto out = run_to_completion(engine, requests);
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t i = 0; i < out->size(); ++i) {
    EXPECT_EQ((*out)[i].new_token_ids, g["prompts"][i]["token_ids"].get<std::vector<int32_t>>()) << "prompt " << i;
  }
}

TEST(TextGolden, TextAndChatPromptsThroughTheCommandLine) {
  const json g = golden();
  ASSERT_EQ(g["text_prompts"].size(), 2u);
  for (const auto& c : g["text_prompts"]) {
    const std::string kind = c["kind"];
    const std::string flag = kind == "text" ? "--prompt " + shell_quote(c["prompt"].get<std::string>())
                                            : "--chat " + shell_quote(c["chat"].dump());
    const json out = json::parse(run_cli("generate --model " + kDir + " " + flag + " --max-tokens 16 --ignore-eos --output json"));
    EXPECT_EQ(out["prompt_tokens"], c["prompt_ids"].size()) << kind;
    EXPECT_EQ(out["token_ids"].get<std::vector<int32_t>>(), c["token_ids"].get<std::vector<int32_t>>()) << kind;
    EXPECT_EQ(out["text"], c["text"]) << kind;
  }
}

TEST(TextGolden, TextPromptWithoutATokenizerIsAClearError) {
  const std::string cmd = std::string(SHARDSERVE_BIN_DIR) + "/shardserve generate --model " + SHARDSERVE_TEST_DATA_DIR +
                          "/tiny/llama3-gqa-bf16 --prompt hello 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buf[512];
  while (fgets(buf, sizeof buf, pipe) != nullptr) output += buf;
  EXPECT_NE(pclose(pipe), 0);
  EXPECT_NE(output.find("has no tokenizer.json"), std::string::npos) << output;
}

}  // namespace
}  // namespace shardserve
