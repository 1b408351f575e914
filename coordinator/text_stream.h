// TextStream: one request's generated token ids -> the text its client sees, with stop strings.
//
// Text comes from the IncrementalDetokenizer (never a split character), and is held back while its
// tail could still become a stop string: a client never receives text that a later token turns
// into the start of a stop string. When the text contains a stop string, the stream ends: the text
// before it is emitted, the stop string and anything after it are not (OpenAI's convention).
//
// Without a tokenizer (a model served for prompt_token_ids only) the text is always empty and
// there are no stop strings. Not thread-safe: one per request.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer/detokenizer.h"

namespace shardserve {

class TextStream {
 public:
  TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop, bool skip_special_tokens);

  struct Delta {
    std::string text;
    std::optional<std::string> stop;  // the stop string that ended the stream
  };
  // The text that `ids` complete and that is safe to show. Once a stop string matched, the stream
  // is stopped and further pushes return nothing.
  absl::StatusOr<Delta> push(std::span<const int32_t> ids);
  // The held-back text at the end of generation, cut before a stop string that the flushed
  // end (an unfinished character's U+FFFD) completes; stopped() tells that apart.
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::unique_ptr<IncrementalDetokenizer> detokenizer_;
  std::vector<std::string> stop_;
  std::string held_;  // decoded text not yet emitted: a possible start of a stop string
  bool stopped_ = false;
};

}  // namespace shardserve
