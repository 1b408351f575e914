// The byte-level BPE tokenizer of Llama 3 / 3.1 (GPT-2 style tokenizers load too), read from a
// Hugging Face tokenizer.json. Encoding equals Hugging Face tokenizers' for any valid UTF-8 text.
//
// Pipeline of encode():
//   1. reject invalid UTF-8 (INVALID_ARGUMENT with the byte offset; never a silent U+FFFD);
//   2. split out added tokens: non-special ones always, special ones ("<|eot_id|>") only when
//      EncodeOptions::parse_special is set, leftmost-longest as Hugging Face does;
//   3. pre-tokenize each remaining text run: the Split regex of tokenizer.json (PCRE2, UTF + UCP;
//      `\s` is rewritten to the Unicode White_Space set that Oniguruma, HF's engine, uses),
//      behaviour Isolated; ByteLevel (its GPT-2 regex when use_regex is set);
//   4. BPE on each pre-token: with ignore_merges a pre-token that is itself in the vocab is one
//      id; otherwise merges are applied lowest rank first (leftmost on ties) with a priority
//      queue over a linked list of symbols. The vocab is keyed by raw bytes (the ByteLevel
//      byte-to-unicode map is undone once at load), so encoding never builds mapped strings;
//   5. with add_special_tokens, the post-processor's template (Llama 3: BOS in front).
//
// Special-token strings in text: Hugging Face turns "<|eot_id|>" in any input into id 128009.
// That lets untrusted text forge turn boundaries, so here the DEFAULT treats such strings as plain
// text (parse_special = false, like Meta's reference tokenizer); set parse_special for HF's
// behaviour (trusted text, golden comparisons). The chat encoder (chat_template.h) inserts the
// template's own structural tokens as ids and encodes message content with parse_special = false.
//
// Threading: a Tokenizer is immutable after load except for its pre-token cache, which is sharded
// and mutex-protected; encode() and decode() may be called from any number of threads at once.
// The cache is bounded (a shard is cleared when it fills), so memory does not grow with traffic.
//
// Not supported (load fails with UNIMPLEMENTED rather than encoding differently): normalizers,
// BPE dropout / byte_fallback / subword prefixes, added tokens with lstrip/rstrip/single_word,
// Split behaviours other than Isolated and Removed, post-processors other than ByteLevel and
// TemplateProcessing, decoders other than ByteLevel.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace shardserve {

struct EncodeOptions {
  // Hugging Face's add_special_tokens=True: wrap the ids in the post-processor's template
  // (Llama 3: prepend <|begin_of_text|>).
  bool add_special_tokens = false;
  // Recognise special-token strings inside the text (Hugging Face's behaviour). Off by default:
  // safe for untrusted input, see above.
  bool parse_special = false;
};

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a directory that holds one.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> load(const std::string& path);
  // The contents of a tokenizer.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> from_json(std::string_view json);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // INVALID_ARGUMENT when `text` is not valid UTF-8.
  absl::StatusOr<std::vector<int32_t>> encode(std::string_view text, const EncodeOptions& options = {}) const;

  // The text of `ids`: token bytes concatenated, invalid UTF-8 replaced by U+FFFD as Hugging Face
  // does (no clean_up_tokenization_spaces: that is lossy and wrong for streaming). INVALID_ARGUMENT
  // for an id that names no token.
  absl::StatusOr<std::string> decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // The raw bytes a token decodes to (may end inside a UTF-8 character); nullopt for an unknown id.
  std::optional<std::string_view> token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;
  // The id of a token named as in tokenizer.json: an added token's content ("<|eot_id|>") or a
  // vocab entry in its ByteLevel form ("Ġworld").
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // One past the largest id.
  int32_t vocab_size() const { return static_cast<int32_t>(id_to_bytes_.size()); }
  // The ids that add_special_tokens puts before and after the text.
  std::span<const int32_t> prefix_ids() const { return prefix_ids_; }
  std::span<const int32_t> suffix_ids() const { return suffix_ids_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct AddedToken {
    std::string content;
    int32_t id;
    bool special;
  };
  struct PreTokenizerStep;
  struct CacheShard;

  Tokenizer();
  absl::Status append_text_ids(std::string_view text, std::vector<int32_t>& ids) const;
  void append_piece_ids(std::string_view piece, std::vector<int32_t>& ids) const;
  void bpe(std::string_view piece, std::vector<int32_t>& ids) const;

  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;  // vocab entries, by raw bytes
  absl::flat_hash_map<uint64_t, Merge> merges_;            // (left id << 32 | right id) -> merge
  std::array<int32_t, 256> byte_ids_{};                    // the one-byte tokens
  bool ignore_merges_ = false;
  std::vector<std::string> id_to_bytes_;
  std::vector<uint8_t> id_flags_;  // kKnown | kSpecial
  std::vector<AddedToken> added_;  // longest first, so the first match at a position is the longest
  bool has_plain_added_ = false;   // an added token that is not special (always split out)
  std::array<bool, 256> added_first_byte_{};  // bytes that start some added token
  std::vector<std::unique_ptr<PreTokenizerStep>> pre_tokenizer_;
  std::vector<int32_t> prefix_ids_, suffix_ids_;
  std::unique_ptr<CacheShard[]> cache_;
};

}  // namespace shardserve
