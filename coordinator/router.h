// Routing: which group replica gets the next request of a model. Pure logic over a snapshot of
// loads, so it is unit-tested without a cluster.
//
// A replica's load is the work it holds relative to its size:
//   outstanding_tokens / kv_capacity_tokens   the coordinator's own count of prompt + max_tokens
//                                             of requests it sent there and that have not ended
//                                             (fresh: updated before the request leaves)
//   + kv_usage                                 the worker's last report (fraction of KV blocks used)
//   + 0.1 * num_waiting                        requests queued in its scheduler (last report)
// The least loaded serving replica wins; ties go round-robin from `rotation`, so idle replicas
// share a trickle of requests instead of one taking them all.
#pragma once

#include <cstdint>
#include <span>

namespace shardserve {

struct ReplicaLoad {
  bool serving = false;  // healthy and accepting (not loading, draining or failed)
  int64_t outstanding_tokens = 0;
  int64_t kv_capacity_tokens = 0;  // blocks x block_size; 0 when not reported yet
  double kv_usage = 0.0;
  int64_t num_waiting = 0;
};

double load_score(const ReplicaLoad& r);

// The index of the replica to use, or -1 when none is serving.
int pick_replica(std::span<const ReplicaLoad> replicas, uint64_t rotation);

}  // namespace shardserve
