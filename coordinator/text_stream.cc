#include "coordinator/text_stream.h"

#include <algorithm>

namespace shardserve {

TextStream::TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop, bool skip_special_tokens)
    : stop_(std::move(stop)) {
  if (tokenizer) detokenizer_ = std::make_unique<IncrementalDetokenizer>(*tokenizer, skip_special_tokens);
}

absl::StatusOr<TextStream::Delta> TextStream::push(std::span<const int32_t> ids) {
  Delta delta;
  if (!detokenizer_ || stopped_) return delta;
  auto text = detokenizer_->push(ids);
  if (!text.ok()) return text.status();
  held_ += *text;

  // The earliest stop string wins (the first a reader would see).
  size_t stop_at = std::string::npos;
  for (const std::string& s : stop_) {
    const size_t pos = held_.find(s);
    if (pos != std::string::npos && pos < stop_at) {
      stop_at = pos;
      delta.stop = s;
    }
  }
  if (delta.stop) {
    delta.text = held_.substr(0, stop_at);
    held_.clear();
    stopped_ = true;
    return delta;
  }
  // Hold back the longest tail that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stop_) {
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k) {
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
    }
  }
  delta.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return delta;
}

std::string TextStream::finish() {
  if (!detokenizer_ || stopped_) return "";
  std::string rest = std::move(held_) + detokenizer_->finish();
  held_.clear();
  // The flushed tail (U+FFFD for an unfinished character) can complete a stop string too.
  size_t stop_at = std::string::npos;
  for (const std::string& s : stop_) stop_at = std::min(stop_at, rest.find(s));
  if (stop_at != std::string::npos) {
    rest.resize(stop_at);
    stopped_ = true;
  }
  return rest;
}

}  // namespace shardserve
