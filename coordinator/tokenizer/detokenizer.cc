#include "coordinator/tokenizer/detokenizer.h"

#include "absl/strings/str_cat.h"
#include "coordinator/tokenizer/utf8.h"

namespace shardserve {

absl::StatusOr<std::string> IncrementalDetokenizer::push(int32_t id) {
  const std::optional<std::string_view> bytes = tokenizer_->token_bytes(id);
  if (!bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is not in the vocabulary (size ", tokenizer_->vocab_size(), ")"));
  }
  std::string text;
  if (skip_special_tokens_ && tokenizer_->is_special(id)) return text;
  pending_.append(*bytes);
  const size_t held = utf8::append_lossy(pending_, /*final=*/false, text);
  pending_.erase(0, pending_.size() - held);
  return text;
}

absl::StatusOr<std::string> IncrementalDetokenizer::push(std::span<const int32_t> ids) {
  // Validate first so that a bad id leaves the state unchanged, as for a single push.
  for (int32_t id : ids) {
    if (!tokenizer_->token_bytes(id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is not in the vocabulary (size ", tokenizer_->vocab_size(), ")"));
    }
  }
  std::string text;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = push(id);
    if (!piece.ok()) return piece.status();
    text += *piece;
  }
  return text;
}

std::string IncrementalDetokenizer::finish() {
  std::string text;
  utf8::append_lossy(pending_, /*final=*/true, text);
  pending_.clear();
  return text;
}

}  // namespace shardserve
