// The gRPC API's request validation: a v1::GenerateRequest parsed from untrusted bytes (as gRPC
// does; bytes that are not a valid message never reach our handlers) and admitted through the
// coordinator's one request path (frontend.h: size limit, model lookup, prompt to ids with the
// tokenizer and chat template, sampling validation against the model's limits, back-pressure).
//
// The coordinator runs in-process with two models and no workers: "llama" (the Llama 3.1
// tokenizer and chat template) and "ids-only" (no tokenizer). So no request can be admitted:
// every one must end INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION with a message, or, when
// it is valid, UNAVAILABLE (no healthy group). A request that gets UNAVAILABLE must satisfy the
// contract written in generation.proto (ranges of the sampling fields, stop strings, ids).
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include "coordinator/config.h"
#include "coordinator/frontend.h"
#include "coordinator/server.h"
#include "google/protobuf/stubs/logging.h"
#include "shardserve/v1/generation.pb.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

namespace {

Coordinator& coordinator() {
  static const std::unique_ptr<Coordinator> c = [] {
    ClusterConfig config;
    config.models.push_back({"llama", SHARDSERVE_TEST_DATA_DIR "/tiny/llama3-tokenizer-bf16", ""});
    config.models.push_back({"ids-only", SHARDSERVE_TEST_DATA_DIR "/tiny/llama3-gqa-bf16", ""});
    GroupSpec g;
    g.name = "llama-group";
    g.model = "llama";
    config.groups.push_back(g);
    g.name = "ids-group";
    g.model = "ids-only";
    config.groups.push_back(g);
    CoordinatorOptions options;
    options.host = "127.0.0.1";
    options.port = 0;
    auto started = Coordinator::start(options, std::move(config));
    FUZZ_CHECK(started.ok(), "the coordinator did not start: " + std::string(started.status().message()));
    return *std::move(started);
  }();
  return *c;
}

void check_accepted(const v1::GenerateRequest& r) {
  const auto in = [](double v, double lo, double hi) { return std::isfinite(v) && v >= lo && v <= hi; };
  FUZZ_CHECK(r.model() == "llama" || r.model() == "ids-only", "a request for no served model was valid");
  if (r.has_max_tokens()) FUZZ_CHECK(r.max_tokens() >= 1, "max_tokens < 1 accepted");
  if (r.has_temperature()) FUZZ_CHECK(in(r.temperature(), 0, INFINITY), "temperature out of range accepted");
  if (r.has_top_k()) FUZZ_CHECK(r.top_k() >= -1, "top_k < -1 accepted");
  if (r.has_top_p()) FUZZ_CHECK(in(r.top_p(), 0, 1) && r.top_p() > 0, "top_p outside (0, 1] accepted");
  if (r.has_min_p()) FUZZ_CHECK(in(r.min_p(), 0, 1), "min_p outside [0, 1] accepted");
  if (r.has_repetition_penalty()) {
    FUZZ_CHECK(in(r.repetition_penalty(), 0, INFINITY) && r.repetition_penalty() > 0,
               "repetition_penalty <= 0 accepted");
  }
  if (r.has_presence_penalty()) FUZZ_CHECK(in(r.presence_penalty(), -2, 2), "presence_penalty out of range accepted");
  if (r.has_frequency_penalty()) FUZZ_CHECK(in(r.frequency_penalty(), -2, 2), "frequency_penalty out of range accepted");
  if (r.has_logprobs()) FUZZ_CHECK(r.logprobs() >= -1 && r.logprobs() <= 20, "logprobs out of range accepted");
  for (const std::string& s : r.stop()) FUZZ_CHECK(!s.empty(), "an empty stop string accepted");
  // The vocabulary of "llama" is its tokenizer's; "ids-only" has none until a worker reports it,
  // so only its sign is checked here (the replica's own limits are checked when routing).
  const int64_t vocab = r.model() == "llama" ? 128256 : int64_t{1} << 31;
  for (int32_t id : r.stop_token_ids()) FUZZ_CHECK(id >= 0 && id < vocab, "a stop token id outside the vocab accepted");
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText:
      FUZZ_CHECK(r.model() == "llama" && !r.text().empty(), "a text prompt accepted without a tokenizer or text");
      break;
    case v1::GenerateRequest::kPromptTokenIds:
      FUZZ_CHECK(r.prompt_token_ids().ids_size() > 0, "an empty prompt accepted");
      for (int32_t id : r.prompt_token_ids().ids()) FUZZ_CHECK(id >= 0 && id < vocab, "a prompt id outside the vocab accepted");
      break;
    case v1::GenerateRequest::kChat:
      FUZZ_CHECK(r.model() == "llama" && r.chat().messages_size() > 0, "a chat accepted without a template or messages");
      break;
    default:
      FUZZ_CHECK(false, "a request without a prompt accepted");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::warn);
  // Protobuf logs every string field with invalid UTF-8 that it refuses; the refusal is the test.
  google::protobuf::SetLogHandler(nullptr);
  coordinator();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  for (bool to_context_end : {false, true}) {
    AdmitOptions options;
    options.max_tokens_to_context_end = to_context_end;
    auto admitted = coordinator().frontend().admit(request, options);
    FUZZ_CHECK(!admitted.ok(), "a request was admitted with no worker running");
    const absl::Status& s = admitted.status();
    FUZZ_CHECK(!s.message().empty(), "an error without a message");
    switch (s.code()) {
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kFailedPrecondition:
        break;
      case absl::StatusCode::kNotFound:
        FUZZ_CHECK(request.model() != "llama" && request.model() != "ids-only", "NOT_FOUND for a served model");
        break;
      case absl::StatusCode::kUnavailable:
        check_accepted(request);
        break;
      default:
        FUZZ_CHECK(false, "unexpected status " + s.ToString());
    }
  }
  return 0;
}
