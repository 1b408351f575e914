// The coordinator's HTTP door (cpp-httplib): the OpenAI-compatible API and the deployment
// guide's /generate, plus health probes. The same engine as the gRPC API behind a second door:
// every request becomes a v1::GenerateRequest and goes through Frontend (frontend.h); openai.h
// holds the JSON shapes.
//
//   POST /v1/completions, /v1/chat/completions   unary JSON or server-sent events ("stream": true),
//                                                one event per delta, written to the socket as it
//                                                comes, then "data: [DONE]"
//   POST /generate                               {"messages": [...]} -> {"text", "tokens"}
//   GET  /v1/models, /v1/models/{id}
//   GET  /health                                 liveness: 200 until the coordinator drains, then
//                                                503 (what grpc.health.v1 reports)
//   GET  /ready                                  readiness: 200 when serving and every configured
//                                                model has a healthy group, else 503
//
// Admission errors get their HTTP status before anything is sent; a stream that fails after its
// first event ends with an error event instead of [DONE]. A streaming client that disconnects is
// noticed at the next write: its request is aborted upstream and its KV blocks freed. (A unary
// request whose client leaves runs to its end: nothing is written to the socket before then.)
// Bodies over max_body_bytes get 413.
//
// With tls_cert and tls_key it serves HTTPS only (and with tls_client_ca, only to clients with a
// certificate that CA signed). With api_key, every route but /health and /ready answers 401
// unless the request carries `Authorization: Bearer KEY`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/frontend.h"

namespace shardserve {

struct HttpOptions {
  std::string host = "0.0.0.0";
  int port = 0;      // 0: any free port
  int threads = 64;  // connections served at once (an idle keep-alive connection holds one)
  int64_t max_body_bytes = 1 << 20;
  std::string tls_cert, tls_key, tls_client_ca;  // PEM files (server.h)
  std::string api_key;                           // empty: none asked for
};

class HttpServer {
 public:
  // Listens (UNAVAILABLE when the port is taken) and serves on its own threads.
  static absl::StatusOr<std::unique_ptr<HttpServer>> start(Frontend* frontend, const HttpOptions& options);
  ~HttpServer();
  int port() const;
  // Stops accepting connections and waits for the requests being served.
  void stop();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardserve
