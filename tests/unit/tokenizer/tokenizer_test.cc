// Encoder and decoder of coordinator/tokenizer/tokenizer.h: known Llama 3 ids (checked against the
// vocab of the vendored tokenizer.json), pre-tokenizer behaviour, errors, thread safety, and a
// small synthetic GPT-2 style tokenizer for the loader's variants and the merge order.
#include "coordinator/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "tests/unit/tokenizer/test_util.h"

namespace shardserve {
namespace {

using ::shardserve::testing::decode_or_die;
using ::shardserve::testing::encode_or_die;
using ::shardserve::testing::llama;

int32_t id(std::string_view token) {
  auto found = llama().token_to_id(token);
  EXPECT_TRUE(found.has_value()) << token;
  return found.value_or(-1);
}

TEST(Tokenizer, KnownLlama3Ids) {
  // tokenizer.json: "Hello" 9906, "Ġworld" 1917, "ĠHello" 22691, "ĠĠ" 256, "ĊĊ" 271.
  EXPECT_EQ(encode_or_die("Hello world"), (std::vector<int32_t>{9906, 1917}));
  EXPECT_EQ(encode_or_die(" Hello"), (std::vector<int32_t>{22691}));
  EXPECT_EQ(encode_or_die("  "), (std::vector<int32_t>{256}));
  EXPECT_EQ(encode_or_die("\n\n"), (std::vector<int32_t>{271}));
  EXPECT_EQ(encode_or_die(""), (std::vector<int32_t>{}));
  EXPECT_EQ(llama().vocab_size(), 128256);
  EXPECT_EQ(id("<|begin_of_text|>"), 128000);
  EXPECT_EQ(id("<|eot_id|>"), 128009);
}

TEST(Tokenizer, AddSpecialTokensPrependsBos) {
  EXPECT_EQ(std::vector<int32_t>(llama().prefix_ids().begin(), llama().prefix_ids().end()), std::vector<int32_t>{128000});
  EXPECT_TRUE(llama().suffix_ids().empty());
  EncodeOptions options;
  options.add_special_tokens = true;
  EXPECT_EQ(encode_or_die("Hello world", options), (std::vector<int32_t>{128000, 9906, 1917}));
  EXPECT_EQ(encode_or_die("", options), (std::vector<int32_t>{128000}));
}

TEST(Tokenizer, SpecialTokenStringsArePlainTextByDefault) {
  const std::string text = "Hi<|eot_id|>there";
  const std::vector<int32_t> safe = encode_or_die(text);
  EXPECT_EQ(std::count(safe.begin(), safe.end(), 128009), 0);
  EXPECT_EQ(decode_or_die(safe), text);

  EncodeOptions parse;
  parse.parse_special = true;
  const std::vector<int32_t> parsed = encode_or_die(text, parse);
  EXPECT_EQ(parsed, (std::vector<int32_t>{id("Hi"), 128009, id("there")}));
  // Leftmost-longest, and partial or differently cased strings stay text.
  EXPECT_EQ(encode_or_die("<|eot_id|><|eot_id|>", parse), (std::vector<int32_t>{128009, 128009}));
  EXPECT_EQ(encode_or_die("<|eot_id", parse), encode_or_die("<|eot_id"));
  EXPECT_EQ(encode_or_die("<|EOT_ID|>", parse), encode_or_die("<|EOT_ID|>"));
}

TEST(Tokenizer, NumbersSplitInGroupsOfThree) {
  EXPECT_EQ(encode_or_die("12345"), (std::vector<int32_t>{id("123"), id("45")}));
  EXPECT_EQ(encode_or_die("1234567"), (std::vector<int32_t>{id("123"), id("456"), id("7")}));
}

TEST(Tokenizer, PreTokenizerBranches) {
  // Contractions are case-insensitive: "I'M" is "I" + "'M".
  EXPECT_EQ(encode_or_die("I'M"), (std::vector<int32_t>{id("I"), id("'M")}));
  EXPECT_EQ(encode_or_die("you're"), (std::vector<int32_t>{id("you"), id("'re")}));
  // Whitespace before a word: all but the last space stand alone, the last joins the word.
  EXPECT_EQ(encode_or_die("a   b"), (std::vector<int32_t>{id("a"), id("ĠĠ"), id("Ġb")}));
  // Punctuation takes following newlines; \r\n stays together.
  EXPECT_EQ(encode_or_die("a.\n"), (std::vector<int32_t>{id("a"), id(".Ċ")}));
  EXPECT_EQ(encode_or_die("\r\n"), (std::vector<int32_t>{id("čĊ")}));
}

TEST(Tokenizer, RoundTripsManyScripts) {
  const std::vector<std::string> texts = {
      "Привет, мир!", "你好，世界！", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก", "👨‍👩‍👧‍👦 🇯🇵 👍🏽", "e\u0301",
      "tab\tand\r\nCRLF", "\xF0\xA0\x80\x80 CJK ext B", "a\u180eb", std::string(5000, 'x')};
  for (const std::string& text : texts) {
    EXPECT_EQ(decode_or_die(encode_or_die(text)), text);
  }
}

TEST(Tokenizer, VeryLongInputs) {
  for (const std::string& text : {std::string(100000, ' '), std::string(100000, 'a'), std::string(20000, '\n') + "x",
                                  std::string(30000, '!')}) {
    auto ids = llama().encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(decode_or_die(*ids), text);
  }
}

TEST(Tokenizer, InvalidUtf8IsAnError) {
  const std::pair<std::string, int> cases[] = {
      {"\xFF", 0}, {"abc\xC3", 3}, {"ok \xED\xA0\x80 surrogate", 3}, {"\xC0\xAF overlong", 0},
      {"x\xF4\x90\x80\x80 too large", 1}, {"\x80", 0}, {"ab\xE2\x82", 2}};
  for (const auto& [text, offset] : cases) {
    auto ids = llama().encode(text);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(ids.status().message().find(absl::StrCat("byte offset ", offset)), absl::string_view::npos)
        << ids.status();
  }
}

TEST(Tokenizer, DecodeRejectsUnknownIds) {
  EXPECT_EQ(llama().decode(std::vector<int32_t>{9906, 128256}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(llama().decode(std::vector<int32_t>{-1}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Tokenizer, DecodeSkipsSpecialTokensOnRequest) {
  const std::vector<int32_t> ids = {128000, 9906, 128009, 1917};
  EXPECT_EQ(decode_or_die(ids), "<|begin_of_text|>Hello<|eot_id|> world");
  EXPECT_EQ(decode_or_die(ids, true), "Hello world");
}

TEST(Tokenizer, DecodeReplacesInvalidBytesLikeHuggingFace) {
  // The one-byte tokens of 0xF0 and 0x9F: "ð" and "Ł" in ByteLevel form.
  const int32_t f0 = id("ð"), x9f = id("Ł");
  EXPECT_EQ(decode_or_die({f0, x9f}), "\xEF\xBF\xBD");  // a truncated character is one U+FFFD
  EXPECT_EQ(decode_or_die({x9f, x9f, id("a")}), "\xEF\xBF\xBD\xEF\xBF\xBD" "a");
  EXPECT_EQ(decode_or_die({f0, id("a")}), "\xEF\xBF\xBD" "a");
}

TEST(Tokenizer, ConcurrentEncodesAgree) {
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(absl::StrCat("Request ", i, ": the quick brown fox ", i * 7919, " 😀 héllo"));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(encode_or_die(t));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches = 0;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = llama().encode(texts[(i + t) % texts.size()]);
          if (!ids.ok() || *ids != expected[(i + t) % texts.size()]) ++mismatches;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(Tokenizer, LoadErrors) {
  EXPECT_EQ(Tokenizer::load("/nonexistent/dir").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Tokenizer::from_json("{not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tokenizer::from_json("{\"model\": 3}").status().code(), absl::StatusCode::kInvalidArgument);
}

// A GPT-2 style tokenizer: every byte in the vocab, a few merges, ByteLevel with its own regex.
nlohmann::json tiny_tokenizer(bool array_merges, bool ignore_merges) {
  nlohmann::json vocab = nlohmann::json::object();
  int next = 0;
  // GPT-2's bytes_to_unicode, written out: printable bytes as themselves, others from U+0100.
  int shifted = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : shifted++;
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[s] = next++;
  }
  // Ranks: "b c" before "a b", so "abc" is a + bc, never ab + c.
  const std::vector<std::pair<std::string, std::string>> merges = {{"b", "c"}, {"a", "b"}, {"a", "bc"}, {"Ġ", "a"}};
  for (const auto& [l, r] : merges) vocab[l + r] = next++;
  vocab["xyz"] = next++;  // reachable only through ignore_merges
  nlohmann::json merge_list = nlohmann::json::array();
  for (const auto& [l, r] : merges) {
    merge_list.push_back(array_merges ? nlohmann::json::array({l, r}) : nlohmann::json(l + " " + r));
  }
  return {
      {"version", "1.0"},
      {"added_tokens", {{{"id", next}, {"content", "<|endoftext|>"}, {"special", true}, {"lstrip", false},
                         {"rstrip", false}, {"single_word", false}, {"normalized", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                 {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                 {"ignore_merges", ignore_merges}, {"vocab", vocab}, {"merges", merge_list}}},
  };
}

TEST(Tokenizer, SyntheticMergesInBothFormsAndRankOrder) {
  auto strings = Tokenizer::from_json(tiny_tokenizer(false, false).dump());
  auto arrays = Tokenizer::from_json(tiny_tokenizer(true, false).dump());
  ASSERT_TRUE(strings.ok()) << strings.status();
  ASSERT_TRUE(arrays.ok()) << arrays.status();
  const int32_t bc = *(*strings)->token_to_id("bc"), abc = *(*strings)->token_to_id("abc");
  const int32_t ab = *(*strings)->token_to_id("ab"), space_a = *(*strings)->token_to_id("Ġa");
  for (const auto* tok : {strings->get(), arrays->get()}) {
    EXPECT_EQ(*tok->encode("abc"), (std::vector<int32_t>{abc}));  // b c, then a bc
    EXPECT_EQ(*tok->encode("abab"), (std::vector<int32_t>{ab, ab}));
    EXPECT_EQ(*tok->encode("bcbc"), (std::vector<int32_t>{bc, bc}));
    // " abc": b c (rank 0), then a bc (rank 2) before Ġ a (rank 3) could apply.
    EXPECT_EQ(*tok->encode("x abc"), (std::vector<int32_t>{'x', ' ', abc}));
    EXPECT_EQ(*tok->encode(" a"), (std::vector<int32_t>{space_a}));
    EXPECT_EQ(*tok->decode(*tok->encode("x abc")), "x abc");
    // xyz is in the vocab but no merge makes it.
    EXPECT_EQ(*tok->encode("xyz"), (std::vector<int32_t>{'x', 'y', 'z'}));
    // Non-Latin text goes through the byte tokens.
    EXPECT_EQ(*tok->decode(*tok->encode("é 😀")), "é 😀");
  }
  auto ignoring = Tokenizer::from_json(tiny_tokenizer(false, true).dump());
  ASSERT_TRUE(ignoring.ok());
  EXPECT_EQ(*(*ignoring)->encode("xyz"), (std::vector<int32_t>{*(*ignoring)->token_to_id("xyz")}));
}

// Found by fuzzing (tests/fuzz/tokenizer_json_fuzz.cc): a float id was cast to int32 (undefined
// behaviour), a negative added-token id indexed before the id table, and a huge one made the load
// allocate gigabytes. All are INVALID_ARGUMENT now.
TEST(Tokenizer, IdsMustBeSmallNonNegativeIntegers) {
  nlohmann::json j = tiny_tokenizer(false, false);
  j["model"]["vocab"]["xyz"] = 1e41;
  EXPECT_EQ(Tokenizer::from_json(j.dump()).status().code(), absl::StatusCode::kInvalidArgument);
  j = tiny_tokenizer(false, false);
  j["added_tokens"][0]["id"] = -3;
  EXPECT_EQ(Tokenizer::from_json(j.dump()).status().code(), absl::StatusCode::kInvalidArgument);
  j = tiny_tokenizer(false, false);
  j["added_tokens"][0]["id"] = 2000000000;
  auto huge = Tokenizer::from_json(j.dump());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(huge.status().message().find("2000000000"), std::string::npos) << huge.status();
}

TEST(Tokenizer, UnsupportedFeaturesAreRejectedAtLoad) {
  nlohmann::json j = tiny_tokenizer(false, false);
  j["normalizer"] = {{"type", "NFC"}};
  EXPECT_EQ(Tokenizer::from_json(j.dump()).status().code(), absl::StatusCode::kUnimplemented);
  j = tiny_tokenizer(false, false);
  j["model"]["merges"].push_back("q zz");
  EXPECT_EQ(Tokenizer::from_json(j.dump()).status().code(), absl::StatusCode::kInvalidArgument);
  j = tiny_tokenizer(false, false);
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  EXPECT_EQ(Tokenizer::from_json(j.dump()).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace shardserve
