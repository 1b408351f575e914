#include "worker/service/worker_metrics.h"

namespace shardserve {

WorkerMetrics::WorkerMetrics(const std::string& group, const std::string& model)
    : registry_(std::make_shared<prometheus::Registry>()) {
  const prometheus::Labels labels = {{"group", group}, {"model", model}};
  auto& r = *registry_;
  queue_time_ = &prometheus::BuildHistogram()
                     .Name("shardserve_request_queue_time_seconds")
                     .Help("From a request's arrival at the worker to the step that produced its first token")
                     .Labels(labels)
                     .Register(r)
                     .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                                       0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0});
  finished_ = &prometheus::BuildCounter()
                   .Name("shardserve_worker_requests_finished_total")
                   .Help("Requests the engine ended, by finish_reason (stop, length, abort)")
                   .Labels(labels)
                   .Register(r);
  auto gauge = [&](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Labels(labels).Register(r).Add({});
  };
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Labels(labels).Register(r).Add({});
  };
  running_ = gauge("shardserve_num_requests_running", "Requests in the running batch");
  waiting_ = gauge("shardserve_num_requests_waiting", "Requests waiting to be scheduled (incl. preempted)");
  in_flight_ = gauge("shardserve_worker_requests_in_flight", "Requests submitted to the engine and not finished");
  kv_usage_ = gauge("shardserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1)");
  kv_free_blocks_ = gauge("shardserve_kv_cache_free_blocks", "KV-cache blocks free or cached (reusable)");
  kv_blocks_ = gauge("shardserve_kv_cache_blocks", "KV-cache blocks in all");
  preemptions_ = counter("shardserve_preemptions_total", "Sequences preempted (recomputed later) for lack of blocks");
  prefix_hits_ = counter("shardserve_prefix_cache_hits_total", "Prompt blocks found in the prefix cache");
  prefix_queries_ = counter("shardserve_prefix_cache_queries_total", "Prompt blocks looked up in the prefix cache");
}

void WorkerMetrics::queue_time(double seconds) { queue_time_->Observe(seconds); }

void WorkerMetrics::request_finished(const std::string& finish_reason) {
  finished_->Add({{"finish_reason", finish_reason}}).Increment();
}

void WorkerMetrics::update(const EngineStats& s, int64_t in_flight) {
  std::lock_guard lock(mu_);
  running_->Set(static_cast<double>(s.num_running));
  waiting_->Set(static_cast<double>(s.num_waiting));
  in_flight_->Set(static_cast<double>(in_flight));
  kv_blocks_->Set(static_cast<double>(s.num_blocks));
  kv_free_blocks_->Set(static_cast<double>(s.num_free_blocks));
  kv_usage_->Set(s.num_blocks > 0 ? 1.0 - static_cast<double>(s.num_free_blocks) / static_cast<double>(s.num_blocks)
                                  : 0.0);
  preemptions_->Increment(static_cast<double>(s.num_preemptions - last_.num_preemptions));
  prefix_hits_->Increment(static_cast<double>(s.prefix_cache_hits - last_.prefix_cache_hits));
  prefix_queries_->Increment(static_cast<double>(s.prefix_cache_queries - last_.prefix_cache_queries));
  last_ = s;
}

}  // namespace shardserve
