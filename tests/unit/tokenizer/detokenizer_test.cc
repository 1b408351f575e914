// Streaming detokenization (coordinator/tokenizer/detokenizer.h): pieces are complete UTF-8, never
// a U+FFFD for a split character, and all pieces together equal decode() of all ids. Fuzzed with
// random Unicode text and random ids in random chunk sizes (fixed seeds).
#include "coordinator/tokenizer/detokenizer.h"

#include <gtest/gtest.h>

#include <random>

#include "coordinator/tokenizer/utf8.h"
#include "tests/unit/tokenizer/test_util.h"

namespace shardserve {
namespace {

using ::shardserve::testing::decode_or_die;
using ::shardserve::testing::encode_or_die;
using ::shardserve::testing::llama;

constexpr std::string_view kFffd = "\xEF\xBF\xBD";

bool valid_utf8(std::string_view s) { return !utf8::first_invalid_offset(s).has_value(); }

// Streams `ids` in chunks of random size; returns the pieces.
std::vector<std::string> stream(const std::vector<int32_t>& ids, bool skip_special, std::mt19937& rng) {
  IncrementalDetokenizer detok(llama(), skip_special);
  std::vector<std::string> pieces;
  size_t i = 0;
  while (i < ids.size()) {
    const size_t n = std::min(ids.size() - i, static_cast<size_t>(std::uniform_int_distribution<>(1, 4)(rng)));
    absl::StatusOr<std::string> piece = n == 1 ? detok.push(ids[i])
                                               : detok.push(std::span<const int32_t>(ids.data() + i, n));
    EXPECT_TRUE(piece.ok()) << piece.status();
    pieces.push_back(piece.value_or(""));
    EXPECT_LE(detok.pending_bytes(), 3u);
    i += n;
  }
  pieces.push_back(detok.finish());
  EXPECT_EQ(detok.pending_bytes(), 0u);
  return pieces;
}

std::string join(const std::vector<std::string>& pieces) {
  std::string all;
  for (const auto& p : pieces) all += p;
  return all;
}

// Random text from the scripts and symbols that a chat sees, including 4-byte characters.
std::string random_text(std::mt19937& rng) {
  static const std::vector<std::pair<char32_t, char32_t>> ranges = {
      {0x20, 0x7E}, {0xA0, 0x17F}, {0x391, 0x3C9}, {0x410, 0x44F}, {0x5D0, 0x5EA}, {0x627, 0x64A}, {0x905, 0x939},
      {0xE01, 0xE2E}, {0x3041, 0x3096}, {0x4E00, 0x9FA5}, {0xAC00, 0xD7A3}, {0x1F300, 0x1F64F}, {0x1F900, 0x1F9FF},
      {0x20000, 0x2A6D6}, {0x200D, 0x200D}, {0xFE0F, 0xFE0F}, {0x0A, 0x0A}};
  std::string out;
  const int n = std::uniform_int_distribution<>(1, 60)(rng);
  for (int i = 0; i < n; ++i) {
    const auto& [lo, hi] = ranges[std::uniform_int_distribution<size_t>(0, ranges.size() - 1)(rng)];
    const char32_t c = std::uniform_int_distribution<char32_t>(lo, hi)(rng);
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

TEST(IncrementalDetokenizer, HoldsSplitCharacters) {
  // An emoji that the Llama 3 vocab splits over several tokens.
  const std::string text = "ok 🫠 done";
  const std::vector<int32_t> ids = encode_or_die(text);
  ASSERT_GT(ids.size(), 3u);
  IncrementalDetokenizer detok(llama());
  std::string all;
  bool held = false;
  for (int32_t id : ids) {
    auto piece = detok.push(id);
    ASSERT_TRUE(piece.ok());
    EXPECT_TRUE(valid_utf8(*piece));
    EXPECT_EQ(piece->find(kFffd), std::string::npos);
    held |= detok.pending_bytes() > 0;
    all += *piece;
  }
  EXPECT_TRUE(held) << "the test needs a character split across tokens";
  EXPECT_EQ(detok.finish(), "");
  EXPECT_EQ(all, text);
}

TEST(IncrementalDetokenizer, InvalidBytesBecomeReplacementCharacters) {
  const int32_t f0 = *llama().token_to_id("ð");  // 0xF0, the lead byte of a 4-byte character
  IncrementalDetokenizer detok(llama());
  EXPECT_EQ(*detok.push(f0), "");
  EXPECT_EQ(detok.pending_bytes(), 1u);
  EXPECT_EQ(detok.finish(), kFffd);  // truncated at the end: one U+FFFD, as decode() gives

  IncrementalDetokenizer again(llama());
  EXPECT_EQ(*again.push(f0), "");
  EXPECT_EQ(*again.push(9906), std::string(kFffd) + "Hello");  // known invalid as soon as "H" arrives
}

TEST(IncrementalDetokenizer, SkipsSpecialTokens) {
  const std::vector<int32_t> ids = {128000, 9906, 128009, 1917};
  std::mt19937 rng(1);
  EXPECT_EQ(join(stream(ids, true, rng)), "Hello world");
  EXPECT_EQ(join(stream(ids, false, rng)), "<|begin_of_text|>Hello<|eot_id|> world");
}

TEST(IncrementalDetokenizer, UnknownIdLeavesStateUnchanged) {
  IncrementalDetokenizer detok(llama());
  EXPECT_EQ(*detok.push(*llama().token_to_id("ð")), "");
  EXPECT_EQ(detok.push(200000).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(detok.push(std::vector<int32_t>{9906, -5}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(detok.pending_bytes(), 1u);
}

TEST(IncrementalDetokenizer, FuzzRandomUnicodeText) {
  std::mt19937 rng(20240726);
  for (int round = 0; round < 500; ++round) {
    const std::string text = random_text(rng);
    const std::vector<int32_t> ids = encode_or_die(text);
    const std::vector<std::string> pieces = stream(ids, false, rng);
    for (const auto& p : pieces) {
      ASSERT_TRUE(valid_utf8(p));
      ASSERT_EQ(p.find(kFffd), std::string::npos) << "U+FFFD streamed for text " << text;
    }
    ASSERT_EQ(join(pieces), text);
  }
}

TEST(IncrementalDetokenizer, FuzzRandomIdsEqualsDecode) {
  std::mt19937 rng(7);
  // Byte-fragment tokens make broken UTF-8 common: "ð" (0xF0) "Ł" (0x9F) "¤" (0xA4) "Ģ" (0x82) "ãģ" ...
  std::vector<int32_t> fragments;
  for (std::string_view t : {"ð", "Ł", "¤", "Ģ", "ãģ", "Ġð", "ðŁ", "Ĳ", "ĺ", "Ã", "Â", "ä"}) {
    if (auto found = llama().token_to_id(t)) fragments.push_back(*found);
  }
  ASSERT_GE(fragments.size(), 8u);
  for (int round = 0; round < 2000; ++round) {
    std::vector<int32_t> ids(std::uniform_int_distribution<>(0, 30)(rng));
    for (int32_t& id : ids) {
      const int kind = std::uniform_int_distribution<>(0, 9)(rng);
      if (kind < 5) {
        id = fragments[std::uniform_int_distribution<size_t>(0, fragments.size() - 1)(rng)];
      } else if (kind < 6) {
        id = std::uniform_int_distribution<int32_t>(128000, 128255)(rng);
      } else {
        id = std::uniform_int_distribution<int32_t>(0, 127999)(rng);
      }
    }
    for (bool skip : {false, true}) {
      const std::vector<std::string> pieces = stream(ids, skip, rng);
      for (const auto& p : pieces) ASSERT_TRUE(valid_utf8(p));
      ASSERT_EQ(join(pieces), decode_or_die(ids, skip));
    }
  }
}

}  // namespace
}  // namespace shardserve
