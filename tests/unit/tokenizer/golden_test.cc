// Equality with Hugging Face on every committed case: encodings, decodes and chat renderings made
// by transformers/tokenizers from the vendored files (scripts/make_tokenizer_golden.py). A missing
// golden file is a failure, not a skip.
#include <gtest/gtest.h>

#include <random>

#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/detokenizer.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "tests/unit/tokenizer/test_util.h"

namespace shardserve {
namespace {

using ::shardserve::testing::ids_of;
using ::shardserve::testing::kDataDir;
using ::shardserve::testing::kLlamaDir;
using ::shardserve::testing::llama;
using ::shardserve::testing::read_jsonl;

const std::string kGoldenDir = kDataDir + "/tokenizer";

// Whether `text` holds any special-token string (then HF's ids differ from the safe default).
bool has_special_string(std::string_view text) {
  EncodeOptions parse;
  parse.parse_special = true;
  const std::vector<int32_t> ids = *llama().encode(text, parse);
  return std::any_of(ids.begin(), ids.end(), [](int32_t id) { return llama().is_special(id); });
}

std::string stream_decode(const std::vector<int32_t>& ids, bool skip_special, std::mt19937& rng) {
  IncrementalDetokenizer detok(llama(), skip_special);
  std::string text;
  size_t i = 0;
  while (i < ids.size()) {
    const size_t n = std::min(ids.size() - i, static_cast<size_t>(std::uniform_int_distribution<>(1, 3)(rng)));
    text += detok.push(std::span<const int32_t>(ids.data() + i, n)).value();
    i += n;
  }
  return text + detok.finish();
}

TEST(HuggingFaceGolden, Encode) {
  const auto cases = read_jsonl(kGoldenDir + "/golden.jsonl", "golden file");
  const auto inputs = read_jsonl(kGoldenDir + "/cases.jsonl", "test input file");
  EXPECT_EQ(cases.size(), inputs.size()) << "golden.jsonl is stale: rerun the golden script";
  EncodeOptions hf;  // Hugging Face parses special-token strings in text
  hf.parse_special = true;
  EncodeOptions hf_bos = hf;
  hf_bos.add_special_tokens = true;
  int failures = 0;
  for (size_t i = 0; i < cases.size() && failures < 20; ++i) {
    const std::string text = cases[i]["text"].get<std::string>();
    const std::vector<int32_t> ids = *llama().encode(text, hf);
    if (ids != ids_of(cases[i]["ids"])) {
      ++failures;
      ADD_FAILURE() << "case " << i << " encode differs from HF: " << nlohmann::json(text).dump() << "\n  ours "
                    << nlohmann::json(ids).dump() << "\n  HF   " << cases[i]["ids"].dump();
    }
    EXPECT_EQ(*llama().encode(text, hf_bos), ids_of(cases[i]["ids_bos"])) << "case " << i;
    if (!has_special_string(text)) {
      EXPECT_EQ(*llama().encode(text), ids) << "case " << i << ": safe path differs";
    }
  }
  std::printf("[golden] %zu encode cases compared\n", cases.size());
}

TEST(HuggingFaceGolden, DecodeAndStream) {
  auto cases = read_jsonl(kGoldenDir + "/golden.jsonl", "golden file");
  const auto id_cases = read_jsonl(kGoldenDir + "/decode_golden.jsonl", "decode golden file");
  std::vector<std::pair<std::vector<int32_t>, const nlohmann::json*>> all;
  for (const auto& c : cases) all.emplace_back(ids_of(c["ids_bos"]), &c);
  for (const auto& c : id_cases) all.emplace_back(ids_of(c["ids"]), &c);
  std::mt19937 rng(11);
  for (size_t i = 0; i < all.size(); ++i) {
    const auto& [ids, golden] = all[i];
    for (bool skip : {false, true}) {
      const std::string expected = (*golden)[skip ? "decoded_skip" : "decoded"].get<std::string>();
      EXPECT_EQ(*llama().decode(ids, skip), expected) << "case " << i << " skip " << skip;
      EXPECT_EQ(stream_decode(ids, skip, rng), expected) << "case " << i << " skip " << skip << " (streamed)";
    }
  }
  std::printf("[golden] %zu decode cases compared (x2 skip_special_tokens, x2 whole/streamed)\n", all.size());
}

TEST(HuggingFaceGolden, Chat) {
  const auto cases = read_jsonl(kGoldenDir + "/chat_golden.jsonl", "chat golden file");
  auto chat = ChatTemplate::load(kLlamaDir);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EncodeOptions hf;
  hf.parse_special = true;
  int safe_compared = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    auto messages = parse_chat_messages(cases[i]["messages"]);
    ASSERT_TRUE(messages.ok()) << messages.status();
    ChatOptions options;
    options.add_generation_prompt = cases[i]["add_generation_prompt"].get<bool>();
    auto text = chat->render_chat(*messages, options);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, cases[i]["text"].get<std::string>()) << "chat case " << i;
    const std::vector<int32_t> golden_ids = ids_of(cases[i]["ids"]);
    EXPECT_EQ(*llama().encode(*text, hf), golden_ids) << "chat case " << i << " (HF path: specials parsed)";
    bool content_has_special = false;
    for (const ChatMessage& m : *messages) content_has_special |= has_special_string(m.content);
    auto safe = chat->encode_chat(llama(), *messages, options);
    ASSERT_TRUE(safe.ok()) << safe.status();
    if (content_has_special) {
      EXPECT_NE(*safe, golden_ids) << "chat case " << i << ": content specials must not become ids";
    } else {
      EXPECT_EQ(*safe, golden_ids) << "chat case " << i << " (encode_chat)";
      ++safe_compared;
    }
  }
  std::printf("[golden] %zu chat cases compared, %d through encode_chat\n", cases.size(), safe_compared);
}

}  // namespace
}  // namespace shardserve
