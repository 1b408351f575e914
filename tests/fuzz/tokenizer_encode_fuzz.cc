// The Llama 3.1 tokenizer and chat format on arbitrary bytes: what a client's text prompt or chat
// message becomes. The first byte picks the mode and options, the rest is the input.
//
// Text (mode bit 2 clear): invalid UTF-8 is INVALID_ARGUMENT; valid UTF-8 encodes, and decoding
// the ids (without the template's BOS) gives back the exact bytes, with special-token strings
// parsed or not. Unparsed, no special id appears.
// Chat (mode bit 2 set): the rest is messages separated by 0x1E, each a role byte and content.
// encode_chat decodes to exactly render_chat's text (structural tokens as ids, content never
// parsed), and, when no content holds a special-token string, equals encoding the rendered text
// with special tokens parsed (what Hugging Face's apply_chat_template(tokenize=True) does).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "coordinator/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

namespace {

const std::string kDir = SHARDSERVE_TEST_DATA_DIR "/llama-3.1-tokenizer";

const Tokenizer& llama() {
  static const std::unique_ptr<Tokenizer> t = [] {
    auto loaded = Tokenizer::load(kDir);
    FUZZ_CHECK(loaded.ok(), "cannot load " + kDir);
    return *std::move(loaded);
  }();
  return *t;
}

const ChatTemplate& chat_template() {
  static const ChatTemplate c = [] {
    auto loaded = ChatTemplate::load(kDir);
    FUZZ_CHECK(loaded.ok(), "cannot load the chat template of " + kDir);
    return *std::move(loaded);
  }();
  return c;
}

void fuzz_text(std::string_view text, const EncodeOptions& options) {
  const Tokenizer& t = llama();
  auto ids = t.encode(text, options);
  if (utf8::first_invalid_offset(text)) {
    FUZZ_CHECK(!ids.ok() && ids.status().code() == absl::StatusCode::kInvalidArgument,
               "invalid UTF-8 was not INVALID_ARGUMENT");
    return;
  }
  FUZZ_CHECK(ids.ok(), "valid UTF-8 failed to encode: " + std::string(ids.status().message()));
  std::vector<int32_t> body = *ids;
  if (options.add_special_tokens) {
    const auto prefix = t.prefix_ids();
    const auto suffix = t.suffix_ids();
    FUZZ_CHECK(body.size() >= prefix.size() + suffix.size() &&
                   std::equal(prefix.begin(), prefix.end(), body.begin()) &&
                   std::equal(suffix.begin(), suffix.end(), body.end() - suffix.size()),
               "add_special_tokens did not wrap the ids in the template");
    body = std::vector<int32_t>(body.begin() + prefix.size(), body.end() - suffix.size());
  }
  for (int32_t id : body) {
    FUZZ_CHECK(t.token_bytes(id).has_value(), "unknown id");
    if (!options.parse_special) FUZZ_CHECK(!t.is_special(id), "a special id from text with parse_special off");
  }
  auto decoded = t.decode(body);
  FUZZ_CHECK(decoded.ok(), "decode of encoded ids failed");
  FUZZ_CHECK(*decoded == text, "decode(encode(text)) != text");
}

void fuzz_chat(std::string_view rest, bool add_generation_prompt) {
  static const char* const kRoles[] = {"system", "user", "assistant", "ipython", "tool", "bogus"};
  std::vector<ChatMessage> messages;
  bool has_special_string = false;
  while (!rest.empty()) {
    const size_t end = rest.find('\x1e');
    std::string_view record = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    if (record.empty()) continue;
    messages.push_back({kRoles[static_cast<uint8_t>(record[0]) % 6], std::string(record.substr(1))});
    has_special_string |= record.find("<|") != std::string_view::npos;
  }
  ChatOptions options;
  options.add_generation_prompt = add_generation_prompt;
  auto rendered = chat_template().render_chat(messages, options);
  auto ids = chat_template().encode_chat(llama(), messages, options);
  FUZZ_CHECK(rendered.ok() == ids.ok(), "render_chat and encode_chat disagree on validity");
  if (!ids.ok()) {
    FUZZ_CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument, "a bad chat was not INVALID_ARGUMENT");
    return;
  }
  auto decoded = llama().decode(*ids);
  FUZZ_CHECK(decoded.ok() && *decoded == *rendered, "decode(encode_chat) != render_chat");
  if (!has_special_string) {
    EncodeOptions parse;
    parse.parse_special = true;
    auto reference = llama().encode(*rendered, parse);
    FUZZ_CHECK(reference.ok() && *reference == *ids, "encode_chat != encode(render_chat, parse_special)");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  llama();
  chat_template();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (mode & 4) {
    fuzz_chat(rest, mode & 1);
  } else {
    EncodeOptions options;
    options.add_special_tokens = mode & 1;
    options.parse_special = mode & 2;
    fuzz_text(rest, options);
  }
  return 0;
}
