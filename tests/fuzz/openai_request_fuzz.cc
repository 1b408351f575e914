// The HTTP API's request bodies: openai::parse_request on untrusted bytes for each endpoint
// (/v1/completions, /v1/chat/completions, /generate; the first byte picks it, the rest is the
// body). A body is either a GenerateRequest that fits the endpoint or INVALID_ARGUMENT whose
// HTTP answer is a 400 with OpenAI's error body, serialisable as JSON.
#include <cstdint>
#include <string_view>

#include "coordinator/openai.h"
#include "google/protobuf/stubs/logging.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field with invalid UTF-8 that it refuses to parse back; the
  // refusal is what is checked.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto endpoint = static_cast<openai::Endpoint>(data[0] % 3);
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  auto request = openai::parse_request(endpoint, body);
  if (!request.ok()) {
    FUZZ_CHECK(request.status().code() == absl::StatusCode::kInvalidArgument, "not INVALID_ARGUMENT: " +
                                                                                 request.status().ToString());
    const openai::HttpError e = openai::http_error(request.status());
    FUZZ_CHECK(e.status == 400, "a bad body is not a 400");
    FUZZ_CHECK(e.body.contains("error") && e.body["error"]["message"].is_string(), "error body without a message");
    const std::string dumped = openai::dump(e.body);
    FUZZ_CHECK(!nlohmann::json::parse(dumped, nullptr, false).is_discarded(), "the error body is not JSON");
    return 0;
  }
  const v1::GenerateRequest& g = request->generate;
  FUZZ_CHECK(request->endpoint == endpoint, "endpoint changed");
  switch (endpoint) {
    case openai::Endpoint::kCompletions:
      FUZZ_CHECK(g.has_text() || g.has_prompt_token_ids(), "a completion without a prompt");
      break;
    case openai::Endpoint::kChat:
      FUZZ_CHECK(g.has_chat(), "a chat completion without messages");
      break;
    case openai::Endpoint::kGenerate:
      FUZZ_CHECK(g.has_chat() || g.has_text() || g.has_prompt_token_ids(), "/generate without a prompt");
      FUZZ_CHECK(!request->stream, "/generate accepted stream");
      break;
  }
  FUZZ_CHECK(!request->logprobs || g.has_logprobs(), "logprobs asked but not passed on");
  // What the coordinator receives must survive the proto's own encoding (valid UTF-8 strings).
  std::string wire;
  FUZZ_CHECK(g.SerializeToString(&wire), "the request does not serialise");
  v1::GenerateRequest back;
  FUZZ_CHECK(back.ParseFromString(wire), "the request does not parse back (invalid UTF-8 in a string?)");
  return 0;
}
