// A worker's Prometheus metrics: what only the engine knows. Labelled with the worker's group and
// model (constant labels). Counters that the engine keeps as totals (preemptions, prefix-cache
// blocks) are advanced by the difference since the last update. Thread-safe.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "worker/engine/engine.h"

namespace shardserve {

class WorkerMetrics {
 public:
  WorkerMetrics(const std::string& group, const std::string& model);
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  void queue_time(double seconds);
  void request_finished(const std::string& finish_reason);
  void update(const EngineStats& stats, int64_t in_flight);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Histogram* queue_time_;
  prometheus::Family<prometheus::Counter>* finished_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* in_flight_;
  prometheus::Gauge* kv_usage_;
  prometheus::Gauge* kv_free_blocks_;
  prometheus::Gauge* kv_blocks_;
  prometheus::Counter* preemptions_;
  prometheus::Counter* prefix_hits_;
  prometheus::Counter* prefix_queries_;
  std::mutex mu_;
  EngineStats last_;
};

}  // namespace shardserve
