// Registration and the NCCL rendezvous, without a network: Register calls go straight to the
// Registry (channels to the registered addresses are created but never used).
#include "coordinator/registry.h"

#include <gtest/gtest.h>

namespace shardserve {
namespace {

namespace wv1 = worker::v1;

ClusterConfig config() {
  auto c = parse_cluster_config(R"(
models: [{name: m, checkpoint: /ckpt}]
groups:
  - {name: gpu, model: m, tp_size: 2, backend: cuda}
  - {name: cpu, model: m, tp_size: 2, backend: cpu, num_kv_blocks: 64}
)", "/");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

wv1::RegisterRequest req(const std::string& group, int rank, const std::string& id, const std::string& nccl = "") {
  wv1::RegisterRequest r;
  r.set_group(group);
  r.set_rank(rank);
  r.set_worker_id(id);
  if (rank == 0) r.set_address("127.0.0.1:1");
  r.set_nccl_unique_id(nccl);
  return r;
}

TEST(Registry, FollowersGetTheNcclIdThatRankZeroRegistered) {
  Registry registry(config(), {}, nullptr);
  // A follower before its rank 0: retry later.
  EXPECT_EQ(registry.register_worker(req("gpu", 1, "f")).status().code(), absl::StatusCode::kUnavailable);
  auto leader = registry.register_worker(req("gpu", 0, "l", "nccl-id-bytes"));
  ASSERT_TRUE(leader.ok()) << leader.status();
  EXPECT_EQ(leader->rank(), 0);
  EXPECT_EQ(leader->tp_size(), 2);
  EXPECT_EQ(leader->local_ranks(), 1);
  EXPECT_EQ(leader->checkpoint(), "/ckpt");
  auto follower = registry.register_worker(req("gpu", 1, "f"));
  ASSERT_TRUE(follower.ok()) << follower.status();
  EXPECT_EQ(follower->rank(), 1);
  EXPECT_EQ(follower->nccl_unique_id(), "nccl-id-bytes");
  // The one replica is taken; a retried call of the same worker gets its assignment again.
  EXPECT_EQ(registry.register_worker(req("gpu", 0, "other")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto again = registry.register_worker(req("gpu", 0, "l", "nccl-id-bytes"));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->replica(), leader->replica());
}

TEST(Registry, CpuGroupsAreOneProcessAndBadRequestsAreRefused) {
  Registry registry(config(), {}, nullptr);
  EXPECT_EQ(registry.register_worker(req("cpu", 1, "x")).status().code(), absl::StatusCode::kFailedPrecondition);
  auto a = registry.register_worker(req("cpu", 0, "c"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->local_ranks(), 2);
  EXPECT_EQ(a->num_kv_blocks(), 64);
  EXPECT_EQ(registry.register_worker(req("nope", 0, "n")).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry.register_worker(req("cpu", 2, "r")).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Registry, NothingIsRoutedBeforeAHealthCheckSaysServing) {
  Registry registry(config(), {}, nullptr);
  ASSERT_TRUE(registry.register_worker(req("cpu", 0, "c")).ok());
  const Registry::ModelState s = registry.model_state("m");
  EXPECT_EQ(s.num_groups, 2);
  EXPECT_EQ(s.num_serving, 0);
  EXPECT_FALSE(registry.all_serving());
  EXPECT_EQ(registry.acquire("m", {}, 10).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace shardserve
