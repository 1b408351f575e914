// tokenizer.json from untrusted bytes: Tokenizer::from_json (Tokenizer::load reads the file and
// calls it). A load either fails with a message or gives a tokenizer that works: encoding a few
// texts succeeds (with and without special-token parsing and the post-processor's template),
// every id it returns names a token, and decoding those ids gives valid UTF-8.
#include <cstdint>
#include <string>
#include <string_view>

#include "coordinator/tokenizer/tokenizer.h"
#include "coordinator/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tok = Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!tok.ok()) {
    FUZZ_CHECK(!tok.status().message().empty(), "an error without a message");
    return 0;
  }
  const Tokenizer& t = **tok;
  FUZZ_CHECK(t.vocab_size() >= 256, "a byte-level vocab without 256 byte tokens was accepted");
  for (std::string_view text : {std::string_view("Hello, world! 123"), std::string_view(" a  b\n\n\tc"),
                                std::string_view("\xC3\xA9t\xC3\xA9 \xF0\x9F\x98\x80 <|eot_id|><s>")}) {
    for (int flags = 0; flags < 4; ++flags) {
      EncodeOptions options;
      options.add_special_tokens = flags & 1;
      options.parse_special = flags & 2;
      auto ids = t.encode(text, options);
      FUZZ_CHECK(ids.ok(), "encoding valid UTF-8 failed: " + std::string(ids.status().message()));
      for (int32_t id : *ids) FUZZ_CHECK(t.token_bytes(id).has_value(), "encode returned an unknown id");
      auto decoded = t.decode(*ids);
      FUZZ_CHECK(decoded.ok(), "decoding encoded ids failed");
      FUZZ_CHECK(!utf8::first_invalid_offset(*decoded), "decode returned invalid UTF-8");
    }
  }
  return 0;
}
