// Streaming detokenization of arbitrary id sequences (what a worker sends back), with the Llama 3.1
// tokenizer: the IncrementalDetokenizer, and the TextStream that adds stop strings on top.
//
// Invariants checked for every input:
//  - each piece the detokenizer returns is valid UTF-8, it holds at most 3 bytes, and all pieces
//    plus finish() equal Tokenizer::decode of all the ids (detokenizer.h);
//  - an unknown id (alone or inside a chunk) is INVALID_ARGUMENT and changes nothing;
//  - TextStream: what it emits is a prefix of the full decoded text; when it stops (in a push or
//    in finish()), a stop string starts right where the emitted text ends and the emitted text
//    holds no stop string; when it does not stop, emitted text plus finish() is the whole text.
// Bytes: 1 flag byte (skip_special_tokens), 2 bytes picking stop strings (substrings of the
// decoded text, so that they match), then chunks: a length byte (1..4) and 3 bytes per id.
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "coordinator/text_stream.h"
#include "coordinator/tokenizer/detokenizer.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "coordinator/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

namespace {

const Tokenizer& llama() {
  static const std::unique_ptr<Tokenizer> t = [] {
    auto loaded = Tokenizer::load(SHARDSERVE_TEST_DATA_DIR "/llama-3.1-tokenizer");
    FUZZ_CHECK(loaded.ok(), "cannot load the Llama 3.1 tokenizer");
    return *std::move(loaded);
  }();
  return *t;
}

bool valid_utf8(const std::string& s) { return !utf8::first_invalid_offset(s).has_value(); }

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  llama();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const Tokenizer& t = llama();
  const bool skip_special = data[0] & 1;
  const uint8_t stop_a = data[1], stop_b = data[2];
  data += 3;
  size -= 3;

  // Chunks of ids; an id is 3 bytes, mostly in the vocabulary, sometimes just past it.
  std::vector<std::vector<int32_t>> chunks;
  size_t i = 0;
  while (i < size) {
    const size_t n = 1 + data[i++] % 4;
    std::vector<int32_t> chunk;
    for (size_t k = 0; k < n && i + 3 <= size; ++k, i += 3) {
      const uint32_t v = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16);
      chunk.push_back(static_cast<int32_t>(v % (static_cast<uint32_t>(t.vocab_size()) + 16)) - 8);
    }
    if (!chunk.empty()) chunks.push_back(std::move(chunk));
    else break;
  }

  // The reference: decode of every id of the chunks that are entirely valid.
  std::vector<int32_t> accepted;
  for (const auto& chunk : chunks) {
    bool ok = true;
    for (int32_t id : chunk) ok &= t.token_bytes(id).has_value();
    if (ok) accepted.insert(accepted.end(), chunk.begin(), chunk.end());
  }
  auto full = t.decode(accepted, skip_special);
  FUZZ_CHECK(full.ok(), "decode of known ids failed");

  IncrementalDetokenizer detok(t, skip_special);
  std::string streamed;
  for (const auto& chunk : chunks) {
    bool known = true;
    for (int32_t id : chunk) known &= t.token_bytes(id).has_value();
    const size_t pending_before = detok.pending_bytes();
    auto piece = chunk.size() == 1 ? detok.push(chunk[0]) : detok.push(std::span<const int32_t>(chunk));
    if (!known) {
      FUZZ_CHECK(!piece.ok() && piece.status().code() == absl::StatusCode::kInvalidArgument,
                 "an unknown id was not INVALID_ARGUMENT");
      FUZZ_CHECK(detok.pending_bytes() == pending_before, "a rejected push changed the state");
      continue;
    }
    FUZZ_CHECK(piece.ok(), "push of known ids failed");
    FUZZ_CHECK(valid_utf8(*piece), "a streamed piece is not valid UTF-8");
    FUZZ_CHECK(detok.pending_bytes() <= 3, "more than 3 bytes held");
    streamed += *piece;
  }
  const std::string tail = detok.finish();
  FUZZ_CHECK(valid_utf8(tail), "finish() is not valid UTF-8");
  streamed += tail;
  FUZZ_CHECK(detok.pending_bytes() == 0, "bytes held after finish()");
  FUZZ_CHECK(streamed == *full, "streamed text != decode of all ids");

  // Stop strings: two substrings of the text (when it has any) and one that never occurs whole.
  std::vector<std::string> stops = {"\x01\x02\x03"};
  for (uint8_t pick : {stop_a, stop_b}) {
    if (full->empty()) break;
    const size_t at = (pick * 131u) % full->size();
    stops.push_back(full->substr(at, 1 + pick % 5));
  }
  TextStream stream(&t, stops, skip_special);
  std::string emitted;
  std::optional<std::string> stopped_by;
  for (const auto& chunk : chunks) {
    auto delta = stream.push(chunk);
    bool known = true;
    for (int32_t id : chunk) known &= t.token_bytes(id).has_value();
    if (!known && !stream.stopped()) {
      FUZZ_CHECK(!delta.ok(), "TextStream accepted an unknown id");
      continue;
    }
    if (!delta.ok()) continue;
    FUZZ_CHECK(!stopped_by || (delta->text.empty() && !delta->stop), "text after the stream stopped");
    emitted += delta->text;
    if (delta->stop) stopped_by = delta->stop;
  }
  emitted += stream.finish();
  FUZZ_CHECK(full->compare(0, emitted.size(), emitted) == 0, "emitted text is not a prefix of the text");
  if (stream.stopped()) {
    // Stopped by a push (stopped_by) or by the text finish() flushed (the stop is not reported).
    bool follows = false;
    for (const std::string& s : stops) {
      if ((!stopped_by || s == *stopped_by) && full->compare(emitted.size(), s.size(), s) == 0) follows = true;
    }
    FUZZ_CHECK(follows, "no stop string follows the emitted text");
    for (const std::string& s : stops) FUZZ_CHECK(emitted.find(s) == std::string::npos, "a stop string was emitted");
  } else {
    FUZZ_CHECK(emitted == *full, "without a stop, emitted text != the whole text");
    for (const std::string& s : stops) FUZZ_CHECK(full->find(s) == std::string::npos, "a stop string was missed");
  }
  return 0;
}
