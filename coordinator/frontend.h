// Frontend: what a door into the coordinator (the gRPC Generation service, the HTTP front in
// http_server.h) needs from it. There is one request path: every door turns its request into a
// v1::GenerateRequest, admits it, and runs it; validation, routing, tokenization, chat rendering,
// detokenization, stop strings and metrics happen behind this interface, once.
//
// A request in two steps, so that a door can answer admission errors before it commits to a
// response (HTTP sends its status line before the first token):
//   admit()  size limit -> model (NOT_FOUND) -> prompt to ids -> sampling validation
//            (INVALID_ARGUMENT, FAILED_PRECONDITION) -> back-pressure (RESOURCE_EXHAUSTED) ->
//            a serving group of the model exists (UNAVAILABLE); holds an in-flight slot
//   run()    routes to the least loaded serving replica and streams the deltas
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "shardserve/v1/generation.pb.h"

namespace shardserve {

class Tokenizer;

// One admitted request. Destroying it without run() (the client left before it started) frees
// its in-flight slot and counts it as cancelled.
class AdmittedRequest {
 public:
  virtual ~AdmittedRequest() = default;
  // Streams the request's deltas to `emit`, at most once per request. When emit returns false
  // (the client is gone), the request is aborted at once (its KV blocks are freed) and run()
  // returns CANCELLED. Otherwise the status is how the request ended: OK, or why it failed.
  virtual absl::Status run(const std::function<bool(const v1::GenerateResponse&)>& emit) = 0;
  // The served model's name (the request may have left it empty).
  virtual const std::string& model() const = 0;
  virtual const std::string& request_id() const = 0;
  // The model's tokenizer, to name tokens (logprobs); null for a model served without one.
  virtual const Tokenizer* tokenizer() const = 0;
};

struct AdmitOptions {
  // With no max_tokens in the request: generate up to the end of the model's context (OpenAI's
  // chat default) instead of the gRPC API's 16.
  bool max_tokens_to_context_end = false;
};

class Frontend {
 public:
  virtual ~Frontend() = default;
  virtual absl::StatusOr<std::unique_ptr<AdmittedRequest>> admit(const v1::GenerateRequest& request,
                                                                 const AdmitOptions& options) = 0;
  virtual v1::ListModelsResponse list_models() = 0;
  // False once the coordinator drains (SIGTERM): what grpc.health.v1 reports as NOT_SERVING.
  virtual bool serving() const = 0;
};

}  // namespace shardserve
