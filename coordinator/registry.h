// Registry: the coordinator's view of the cluster. Each configured group has `replicas` slots; a
// slot is filled by the rank-0 worker that registers for it, health-checked (GetStats, which also
// reports load), and chosen for requests by the router.
//
// Replica states (each transition is written where it happens):
//   empty     -> loading     rank 0 registers (register_worker)
//   loading   -> serving     a health check reports SERVING
//   serving   -> draining    a health check reports DRAINING (the worker got SIGTERM)
//   any live  -> unhealthy   a health check fails or times out, or a request's stream to it breaks
//   unhealthy -> (reported)  a health check succeeds again
//   unhealthy -> empty       failing for longer than dead_after: a new worker may take the slot
//   unhealthy -> loading     a new rank 0 registers while no slot of its group is empty (the
//                            worker restarted before dead_after): it takes the slot failing longest
//
// Registration is also the NCCL rendezvous for GPU groups: rank 0 registers the group's
// ncclUniqueId, and followers (rank > 0) registering later receive it (UNAVAILABLE, to be retried,
// until rank 0 is there). On the CPU backend a group is one process whose rank 0 runs every rank
// as a thread, so only rank 0 registers.
//
// Thread-safe: gRPC handlers and the health-check thread share it under one mutex; no gRPC call is
// made while it is held.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/statusor.h"
#include "coordinator/config.h"
#include "coordinator/metrics.h"
#include "shardserve/worker/v1/worker.grpc.pb.h"

namespace shardserve {

struct RegistryOptions {
  std::chrono::milliseconds health_interval{500};
  std::chrono::milliseconds health_timeout{1000};
  std::chrono::milliseconds dead_after{10000};
};

class Registry {
 public:
  Registry(const ClusterConfig& config, RegistryOptions options, CoordinatorMetrics* metrics);
  ~Registry();

  void start_health_checks();
  void stop_health_checks();

  absl::StatusOr<worker::v1::Assignment> register_worker(const worker::v1::RegisterRequest& request);

  // A replica chosen for one request; `cost` (prompt + max_tokens) counts as its outstanding
  // work until release().
  struct Route {
    int replica = -1;
    std::string name;  // "group/replica", for messages
    std::shared_ptr<worker::v1::Worker::Stub> stub;
    int64_t vocab_size = 0;
    int64_t max_model_len = 0;
    int64_t cost = 0;
    std::string worker_id;  // the worker that had the slot: a replaced one's cost is not returned
  };
  // The least loaded serving replica of `model` not in `excluded`. UNAVAILABLE when there is none.
  absl::StatusOr<Route> acquire(const std::string& model, const std::vector<int>& excluded, int64_t cost);
  void release(const Route& route);
  // A request's stream to the replica broke: stop routing to it until a health check passes
  // (unless another worker has taken the slot since the route was acquired).
  void report_failure(const Route& route, const std::string& why);

  struct ModelState {
    int num_groups = 0;  // replica slots
    int num_serving = 0;
    int64_t vocab_size = 0;  // as last reported by a replica of the model; 0 before any did
    int64_t max_model_len = 0;
  };
  ModelState model_state(const std::string& model) const;
  bool all_serving() const;
  // Every replica: group, replica, model, state, address, metrics_address.
  nlohmann::json describe() const;

  // One round of health checks (the health thread calls it every health_interval, every 100 ms
  // while a replica is loading, and at once when a rank 0 registers).
  void check_health();

 private:
  enum class State { kEmpty, kLoading, kServing, kDraining, kUnhealthy };
  struct Replica {
    const GroupSpec* group = nullptr;
    int index = 0;
    State state = State::kEmpty;
    std::string address, metrics_address, worker_id, nccl_unique_id;
    std::string group_address;  // rank 0's, where its followers connect
    std::set<int> follower_ranks;
    std::shared_ptr<worker::v1::Worker::Stub> stub;
    bool has_stats = false;
    worker::v1::WorkerStats stats;
    int64_t outstanding_tokens = 0;
    std::chrono::steady_clock::time_point failing_since{};
  };
  static const char* state_name(State s);
  worker::v1::Assignment assignment_for(const Replica& r, int rank) const;
  void set_state(Replica& r, State s, const std::string& why);

  const ClusterConfig config_;
  const RegistryOptions options_;
  CoordinatorMetrics* metrics_;
  mutable std::mutex mu_;
  std::vector<Replica> replicas_;
  std::atomic<uint64_t> rotation_{0};

  std::mutex health_mu_;
  std::condition_variable health_cv_;
  bool health_stop_ = false;
  std::thread health_thread_;
};

}  // namespace shardserve
