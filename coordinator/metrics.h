// The coordinator's Prometheus metrics (prometheus-cpp), as clients see the service: per model
// request counts by gRPC status, latencies, token counts, in-flight requests; per group replica
// its health. Worker-side metrics (queue time, running/waiting, KV cache, prefix cache,
// preemptions) are in worker/service/worker_metrics.h. Thread-safe.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace shardserve {

class CoordinatorMetrics {
 public:
  CoordinatorMetrics();
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // One model's series, looked up once per request: recording through them is lock-free.
  struct Model {
    prometheus::Histogram* time_to_first_token;
    prometheus::Histogram* inter_token_latency;
    prometheus::Histogram* e2e_latency;
    prometheus::Counter* prompt_tokens;
    prometheus::Counter* generation_tokens;
    prometheus::Counter* retries;
    prometheus::Gauge* in_flight;
  };
  const Model& model(const std::string& name);

  // status: the gRPC code's canonical name in lower case ("ok", "invalid_argument", ...).
  void request_done(const std::string& model, const std::string& status);
  void group_healthy(const std::string& group, int replica, const std::string& model, bool healthy);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Histogram>& itl_;
  prometheus::Family<prometheus::Histogram>& e2e_;
  prometheus::Family<prometheus::Counter>& prompt_tokens_;
  prometheus::Family<prometheus::Counter>& generation_tokens_;
  prometheus::Family<prometheus::Counter>& retries_;
  prometheus::Family<prometheus::Gauge>& in_flight_;
  prometheus::Family<prometheus::Gauge>& group_healthy_;
  std::mutex mu_;
  std::map<std::string, Model> models_;
};

// The lower-case canonical name of a gRPC status code number ("ok", "not_found", ...).
std::string status_label(int grpc_code);

}  // namespace shardserve
