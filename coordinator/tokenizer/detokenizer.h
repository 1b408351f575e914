// Streaming detokenization: token ids in one at a time, text out as soon as it is complete.
//
// A byte-level token can end inside a UTF-8 character (an emoji is often 2-4 tokens), so the bytes
// of an unfinished character are held back until the token that completes them arrives. Text that
// is emitted is never taken back, and the stream never shows U+FFFD for a character that was merely
// split across tokens.
//
// Invariant (fuzz-tested): the concatenation of everything push() returns plus finish() equals
// Tokenizer::decode(all ids, skip_special_tokens), which is Hugging Face's decode: bytes that are
// genuinely invalid become U+FFFD (as soon as they are known to be invalid), and an unfinished
// character still held at the end becomes one U+FFFD in finish().
//
// State: `pending_` holds at most 3 bytes, a valid prefix of one character. Not thread-safe: one
// detokenizer per sequence. The Tokenizer must outlive it.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer/tokenizer.h"

namespace shardserve {

class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens) {}

  // The text completed by `id` (often empty while a character is unfinished). INVALID_ARGUMENT for
  // an id that names no token; the state is then unchanged.
  absl::StatusOr<std::string> push(int32_t id);
  absl::StatusOr<std::string> push(std::span<const int32_t> ids);

  // Ends the stream: the held bytes of an unfinished character as U+FFFD (or ""). pending -> empty.
  std::string finish();

  // Bytes held back, waiting for the rest of their character.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;
};

}  // namespace shardserve
