#include "coordinator/metrics.h"

namespace shardserve {
namespace {

using prometheus::Histogram;

// Latencies from a millisecond to minutes; inter-token ones from 0.5 ms to 2 s.
const Histogram::BucketBoundaries kLatency = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                              0.5,   1.0,    2.5,   5.0,  10.0,  20.0, 40.0, 80.0};
const Histogram::BucketBoundaries kInterToken = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.075,  0.1,   0.15,   0.2,   0.3,  0.5,   1.0, 2.0};

}  // namespace

CoordinatorMetrics::CoordinatorMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("shardserve_requests_total")
                    .Help("Generate requests that ended, by model and gRPC status")
                    .Register(*registry_)),
      ttft_(prometheus::BuildHistogram()
                .Name("shardserve_time_to_first_token_seconds")
                .Help("From the request's arrival to its first generated token")
                .Register(*registry_)),
      itl_(prometheus::BuildHistogram()
               .Name("shardserve_inter_token_latency_seconds")
               .Help("Between consecutive generated tokens of a request")
               .Register(*registry_)),
      e2e_(prometheus::BuildHistogram()
               .Name("shardserve_e2e_request_latency_seconds")
               .Help("From the request's arrival to its end")
               .Register(*registry_)),
      prompt_tokens_(prometheus::BuildCounter()
                         .Name("shardserve_prompt_tokens_total")
                         .Help("Prompt tokens of the requests sent to workers")
                         .Register(*registry_)),
      generation_tokens_(prometheus::BuildCounter()
                             .Name("shardserve_generation_tokens_total")
                             .Help("Tokens generated")
                             .Register(*registry_)),
      retries_(prometheus::BuildCounter()
                   .Name("shardserve_request_retries_total")
                   .Help("Requests moved to another group replica because theirs failed before the first token")
                   .Register(*registry_)),
      in_flight_(prometheus::BuildGauge()
                     .Name("shardserve_requests_in_flight")
                     .Help("Generate requests being served by the coordinator")
                     .Register(*registry_)),
      group_healthy_(prometheus::BuildGauge()
                         .Name("shardserve_group_healthy")
                         .Help("1 when the group replica is serving, else 0")
                         .Register(*registry_)) {}

void CoordinatorMetrics::request_done(const std::string& model, const std::string& status) {
  requests_.Add({{"model", model}, {"status", status}}).Increment();
}
const CoordinatorMetrics::Model& CoordinatorMetrics::model(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = models_.find(name);
  if (it != models_.end()) return it->second;
  const prometheus::Labels l = {{"model", name}};
  Model m{&ttft_.Add(l, kLatency),       &itl_.Add(l, kInterToken),        &e2e_.Add(l, kLatency),
          &prompt_tokens_.Add(l),        &generation_tokens_.Add(l),       &retries_.Add(l),
          &in_flight_.Add(l)};
  return models_.emplace(name, m).first->second;
}

void CoordinatorMetrics::group_healthy(const std::string& group, int replica, const std::string& model, bool healthy) {
  group_healthy_.Add({{"group", group}, {"replica", std::to_string(replica)}, {"model", model}})
      .Set(healthy ? 1.0 : 0.0);
}

std::string status_label(int code) {
  static const char* const kNames[] = {"ok",
                                       "cancelled",
                                       "unknown",
                                       "invalid_argument",
                                       "deadline_exceeded",
                                       "not_found",
                                       "already_exists",
                                       "permission_denied",
                                       "resource_exhausted",
                                       "failed_precondition",
                                       "aborted",
                                       "out_of_range",
                                       "unimplemented",
                                       "internal",
                                       "unavailable",
                                       "data_loss",
                                       "unauthenticated"};
  if (code < 0 || code > 16) return "unknown";
  return kNames[code];
}

}  // namespace shardserve
