// The OpenAI HTTP API as shapes: request JSON -> v1::GenerateRequest, GenerateResponse deltas ->
// response JSON and server-sent events, absl::Status -> HTTP status and OpenAI error body. Pure
// translation, no I/O: the serving itself is the coordinator's one request path (frontend.h).
//
// Endpoints (the request fields each takes):
//   /v1/completions       model, prompt (a string, or token ids; one prompt per request),
//                         max_tokens (default 16), logprobs (top N)
//   /v1/chat/completions  model, messages (content a string or text parts; role "developer" is
//                         "system"), max_tokens or max_completion_tokens (default: the rest of
//                         the context), logprobs (bool) + top_logprobs
//   /generate             the deployment guide's body: {"messages": [...]} (or "prompt"), answered
//                         {"text": ..., "tokens": N, "finish_reason": ...}; no streaming
// and, on all three, temperature, top_p, seed, stop (a string or a list), presence_penalty,
// frequency_penalty, n (1 only), stream, stream_options.include_usage, and vLLM's extensions
// top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens. Fields that
// would change the answer and are not supported (n > 1, best_of > 1, echo, suffix, logit_bias,
// tools, a response_format other than text) are INVALID_ARGUMENT naming the field; other unknown
// fields (user, metadata, ...) are ignored, as OpenAI-compatible servers do.
//
// Errors: INVALID_ARGUMENT and FAILED_PRECONDITION -> 400, NOT_FOUND -> 404, RESOURCE_EXHAUSTED
// -> 429, UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, CANCELLED -> 499, anything else -> 500;
// body {"error": {"message", "type", "param", "code"}}.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "shardserve/v1/generation.pb.h"

namespace shardserve {

class Tokenizer;

namespace openai {

enum class Endpoint { kCompletions, kChat, kGenerate };

struct Request {
  Endpoint endpoint = Endpoint::kCompletions;
  v1::GenerateRequest generate;  // what the coordinator serves
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // answer with logprobs (generate.logprobs holds the top N)
};

// INVALID_ARGUMENT naming the field (also as the error's "param", see error_body) for a body that
// is not JSON or does not fit the endpoint.
absl::StatusOr<Request> parse_request(Endpoint endpoint, std::string_view body);

struct HttpError {
  int status = 500;
  nlohmann::json body;  // {"error": {...}}
};
HttpError http_error(const absl::Status& status);
// The same for an error the HTTP layer finds itself (unknown path, body over the limit).
HttpError http_error(int http_status, const std::string& message);

// JSON as sent: compact, invalid UTF-8 (a token's bytes may end inside a character) replaced.
std::string dump(const nlohmann::json& j);

// One request's answer, built from its deltas: the whole body (unary) or one event per delta
// (stream). Not thread-safe: one per request.
class ResponseBuilder {
 public:
  // `id` as OpenAI's (with "cmpl-"/"chatcmpl-"), `model` the served model's name, `tokenizer` to
  // name tokens in logprobs (null: "token_id:N"), `created` Unix seconds.
  ResponseBuilder(const Request& request, std::string id, std::string model, const Tokenizer* tokenizer,
                  int64_t created);

  // Unary: take one delta; body() once the last one was added.
  void add(const v1::GenerateResponse& delta);
  nlohmann::json body() const;

  // Streaming: the server-sent events of one delta ("data: {...}\n\n"; empty when the delta
  // carries nothing to show), and those that end the stream (the usage chunk when asked, then
  // "data: [DONE]"). stream_error() is the event for a request that fails mid-stream.
  std::string stream_event(const v1::GenerateResponse& delta);
  std::string stream_end() const;
  static std::string stream_error(const absl::Status& status);

 private:
  nlohmann::json chunk(nlohmann::json choice) const;
  nlohmann::json usage_json() const;
  nlohmann::json logprobs_json(const v1::GenerateResponse& delta);
  std::string token_name(int32_t id) const;

  Endpoint endpoint_;
  bool include_usage_;
  bool logprobs_;
  std::string id_, model_;
  const Tokenizer* tokenizer_;
  int64_t created_;
  bool sent_role_ = false;
  std::string text_;
  nlohmann::json all_logprobs_;  // accumulated (unary)
  int64_t text_offset_ = 0;      // completions' logprobs.text_offset, in bytes of token text
  v1::FinishReason finish_reason_ = v1::FINISH_REASON_UNSPECIFIED;
  v1::Usage usage_;
};

}  // namespace openai
}  // namespace shardserve
