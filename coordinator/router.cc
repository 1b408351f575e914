#include "coordinator/router.h"

#include <algorithm>

namespace shardserve {

double load_score(const ReplicaLoad& r) {
  const double capacity = static_cast<double>(std::max<int64_t>(r.kv_capacity_tokens, 1));
  return static_cast<double>(r.outstanding_tokens) / capacity + r.kv_usage + 0.1 * static_cast<double>(r.num_waiting);
}

int pick_replica(std::span<const ReplicaLoad> replicas, uint64_t rotation) {
  const size_t n = replicas.size();
  int best = -1;
  double best_score = 0.0;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (rotation + k) % n;
    if (!replicas[i].serving) continue;
    const double score = load_score(replicas[i]);
    if (best < 0 || score < best_score) {
      best = static_cast<int>(i);
      best_score = score;
    }
  }
  return best;
}

}  // namespace shardserve
