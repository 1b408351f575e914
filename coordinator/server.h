// The coordinator: the public Generation service (proto/shardserve/v1), the Registry service that
// workers register with, health (grpc.health.v1) and reflection, /metrics, and optionally the
// OpenAI-compatible HTTP API (http_server.h), a second door to the same request path (frontend.h).
//
// One request, in order: size limit -> model (NOT_FOUND) -> prompt to ids (tokenizer, chat
// template; FAILED_PRECONDITION without a tokenizer) -> sampling validation against the model's
// limits -> back-pressure (RESOURCE_EXHAUSTED past max_in_flight) -> route to the least loaded
// serving replica -> stream the worker's token ids back through a TextStream (detokenization and
// stop strings). The worker call is a child of the client's call: its deadline and cancellation
// propagate, so a client that goes away frees its KV blocks at once. If the replica fails before
// the first token, the request moves to another replica; after it, the request ends UNAVAILABLE.
//
// Drain (SIGTERM): health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight requests get
// up to shutdown_timeout to finish, then the server stops.
//
// Security (all optional): TLS on the gRPC port and the HTTP port (one certificate for both; with
// a client CA, clients must present a certificate it signed), and an API key that every call of
// the public API must carry (gRPC metadata `authorization: Bearer KEY`, the HTTP header
// `Authorization: Bearer KEY`, as OpenAI's SDKs send it); health endpoints answer without it.
// Workers cannot present either, so with TLS or an API key the Registry service moves to a
// plaintext worker_port of its own, meant for the cluster's internal network only. Requests name
// models only by the names of the cluster config: nothing in a request becomes a path.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/config.h"

namespace shardserve {

class Frontend;

struct CoordinatorOptions {
  std::string host = "0.0.0.0";
  int port = 50051;       // 0: any free port
  int metrics_port = -1;  // -1: no /metrics; 0: any free port
  int http_port = -1;     // -1: no HTTP API (http_server.h); 0: any free port
  int http_threads = 64;  // HTTP connections served at once
  // Written (JSON: address, metrics_address, http_address, groups) once the server listens and every group
  // replica of the config is serving; a launcher or test waits for it.
  std::string ready_file;
  int64_t max_in_flight = 1024;           // Generate calls at once; more get RESOURCE_EXHAUSTED
  int64_t max_request_bytes = 1 << 20;    // larger requests get INVALID_ARGUMENT (HTTP bodies: 413)
  // -1: the Registry service (worker registration) is on `port`; else its own plaintext port
  // (0: any free port). Required with TLS or an API key.
  int worker_port = -1;
  std::string tls_cert;       // PEM certificate chain; with tls_key, TLS on the gRPC and HTTP ports
  std::string tls_key;        // PEM private key
  std::string tls_client_ca;  // PEM CA bundle: clients must present a certificate it signed (mTLS)
  std::string api_key;        // empty: no key is asked for
  std::chrono::milliseconds health_interval{500};
  std::chrono::milliseconds health_timeout{1000};
  std::chrono::milliseconds dead_after{10000};
  std::chrono::milliseconds shutdown_timeout{30000};
  // A GenerateStream whose client has taken no message for this long (a write blocked on its
  // flow-control window) is cancelled, freeing its slot, thread and KV blocks; 0: never. A client
  // that sets no deadline and stops reading would otherwise hold them until it disconnects.
  std::chrono::milliseconds stream_stall_timeout{300000};
};

class Coordinator {
 public:
  // Loads the tokenizers, starts the servers and the health checks.
  static absl::StatusOr<std::unique_ptr<Coordinator>> start(const CoordinatorOptions& options, ClusterConfig config);
  ~Coordinator();
  int port() const;
  int http_port() const;    // -1 without the HTTP API
  int worker_port() const;  // where workers register: port() unless worker_port was set
  // The request path behind every door (frontend.h), for in-process callers: the request
  // validation fuzzer (tests/fuzz) admits requests through it without a network call.
  Frontend& frontend();
  // NOT_SERVING, wait for in-flight requests (up to shutdown_timeout), stop.
  void drain_and_stop();

 private:
  struct Impl;
  explicit Coordinator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardserve
