// shardserve-coordinator: the public gRPC API of a cluster (no CUDA), and with --http-port the
// OpenAI-compatible HTTP API. Workers find it with --coordinator ADDR; clients call it. SIGTERM or
// SIGINT drains it.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "coordinator/config.h"
#include "coordinator/server.h"

int main(int argc, char** argv) {
  // A parent may have left them ignored (background jobs of a script): an ignored signal is
  // dropped, never waited for. Then blocked before any thread starts, so that only sigwait below sees them.
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  CLI::App app{"shardserve-coordinator: routes gRPC Generate calls to worker groups"};
  std::string config_path;
  shardserve::CoordinatorOptions o;
  int64_t health_interval_ms = o.health_interval.count(), health_timeout_ms = o.health_timeout.count();
  int64_t dead_after_ms = o.dead_after.count();
  double shutdown_timeout_s = 30;
  std::string log_level = "info";
  app.add_option("--config", config_path, "Cluster config (YAML): models and worker groups")->required()
      ->check(CLI::ExistingFile);
  app.add_option("--host", o.host, "Address to listen on")->capture_default_str();
  app.add_option("--port", o.port, "gRPC port (0: any free port)")->capture_default_str();
  app.add_option("--metrics-port", o.metrics_port, "Prometheus /metrics port (0: any free port; -1: off)")
      ->capture_default_str();
  app.add_option("--http-port", o.http_port,
                 "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /generate, /health, "
                 "/ready; 0: any free port; -1: off)")
      ->capture_default_str();
  app.add_option("--http-threads", o.http_threads, "HTTP connections served at once")->capture_default_str();
  app.add_option("--ready-file", o.ready_file,
                 "Write this JSON file (address, metrics_address, http_address, groups) once every group is "
                 "serving");
  app.add_option("--max-in-flight", o.max_in_flight, "Generate calls served at once; more get RESOURCE_EXHAUSTED")
      ->capture_default_str();
  app.add_option("--max-request-bytes", o.max_request_bytes,
                 "Largest request; larger ones get INVALID_ARGUMENT (HTTP: 413)")
      ->capture_default_str();
  app.add_option("--worker-port", o.worker_port,
                 "Plaintext port where workers register (0: any free port; -1: on --port). Required with TLS or "
                 "an API key, which workers cannot present; keep it on the cluster's internal network")
      ->capture_default_str();
  app.add_option("--tls-cert", o.tls_cert, "PEM certificate (chain): serve gRPC and HTTP over TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", o.tls_key, "PEM private key of --tls-cert")->check(CLI::ExistingFile);
  app.add_option("--tls-client-ca", o.tls_client_ca,
                 "PEM CA bundle: require client certificates signed by it (mutual TLS)")
      ->check(CLI::ExistingFile);
  app.add_option("--api-key", o.api_key,
                 "Require 'authorization: Bearer KEY' on every API call (health checks exempt); default: "
                 "$SHARDSERVE_API_KEY, which keeps the key out of the process list");
  app.add_option("--health-interval-ms", health_interval_ms, "Between health checks of each worker")
      ->capture_default_str();
  app.add_option("--health-timeout-ms", health_timeout_ms, "A health check slower than this fails")
      ->capture_default_str();
  app.add_option("--dead-after-ms", dead_after_ms, "A worker failing checks this long loses its slot")
      ->capture_default_str();
  app.add_option("--shutdown-timeout", shutdown_timeout_s, "Seconds in-flight requests get to finish on SIGTERM")
      ->capture_default_str();
  int64_t stream_stall_timeout_ms = o.stream_stall_timeout.count();
  app.add_option("--stream-stall-timeout-ms", stream_stall_timeout_ms,
                 "Cancel a stream whose client has taken no message for this long (0: never)")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")->capture_default_str();
  bool check_config = false;
  app.add_flag("--check-config", check_config, "Only parse and check --config, print its groups, and exit");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  if (o.api_key.empty()) {
    if (const char* key = std::getenv("SHARDSERVE_API_KEY")) o.api_key = key;
  }
  o.health_interval = std::chrono::milliseconds(health_interval_ms);
  o.health_timeout = std::chrono::milliseconds(health_timeout_ms);
  o.dead_after = std::chrono::milliseconds(dead_after_ms);
  o.shutdown_timeout = std::chrono::milliseconds(static_cast<int64_t>(shutdown_timeout_s * 1000));
  o.stream_stall_timeout = std::chrono::milliseconds(stream_stall_timeout_ms);

  auto config = shardserve::load_cluster_config(config_path);
  if (!config.ok()) {
    std::cerr << "error: " << config.status().message() << "\n";
    return 1;
  }
  if (check_config) {
    for (const shardserve::GroupSpec& g : config->groups) {
      std::cout << "group " << g.name << ": model " << g.model << ", tp_size " << g.tp_size << ", backend "
                << g.backend << ", quantization " << g.quantization << ", replicas " << g.replicas << "\n";
    }
    return 0;
  }
  auto coordinator = shardserve::Coordinator::start(o, std::move(*config));
  if (!coordinator.ok()) {
    std::cerr << "error: " << coordinator.status().message() << "\n";
    return 1;
  }
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("got {}; draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*coordinator)->drain_and_stop();
  return 0;
}
