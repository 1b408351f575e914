// A tensor-parallel group of two processes on two GPUs, run as workers run it
// (worker/engine/process_group.h): rank 0 in this process on GPU 0, rank 1 a child process (this
// binary again) on GPU 1, joined through rank 0's socket, NCCL between them and the one-shot
// all-reduce over CUDA IPC. In FP32 the group gives transformers' golden tokens. Then the CPU
// groups' fault cases on GPUs: a follower killed (SIGKILL) fails rank 0's next step at once, one
// stopped (SIGSTOP) within the collective timeout, as CollectiveError, never a hang. Skipped with
// fewer than two GPUs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/escaping.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/engine/greedy.h"
#include "worker/engine/process_group.h"
#include "worker/runtime/communicator.h"

namespace shardserve {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kCollectiveTimeout{3000};
constexpr char kModel[] = "llama3-gqa-bf16";

std::string data_dir() {
  const char* env = std::getenv("SHARDSERVE_TEST_DATA_DIR");
  return env != nullptr ? env : SHARDSERVE_TEST_DATA_DIR;
}

ExecutorOptions rank_options(int device) {
  ExecutorOptions o;
  o.model_dir = data_dir() + "/tiny/" + kModel;
  o.backend = "cuda";
  o.dtype = "float32";
  o.tp_size = 2;
  o.device = device;
  o.num_kv_blocks = 256;
  o.max_num_batched_tokens = 256;
  o.max_num_seqs = 16;
  return o;
}

GroupOptions group_options(int rank, const std::string& leader, const std::string& nccl_id) {
  GroupOptions g;
  g.rank = rank;
  g.tp_size = 2;
  g.leader_address = leader;
  g.nccl_unique_id = nccl_id;
  g.join_timeout = std::chrono::seconds(60);
  g.collective_timeout = kCollectiveTimeout;
  return g;
}

// Rank 1, in the child process.
TEST(ProcessGroupCudaChild, Follower) {
  const char* leader = std::getenv("SHARDSERVE_TEST_PG_LEADER");
  const char* id = std::getenv("SHARDSERVE_TEST_PG_NCCL_ID");
  if (leader == nullptr || id == nullptr) GTEST_SKIP() << "run by ProcessGroupCudaTest";
  const std::string nccl_id = absl::HexStringToBytes(id);
  const absl::Status st = run_group_follower(rank_options(1), group_options(1, leader, nccl_id));
  // A follower ends OK when rank 0 closes the group, with an error when it loses it; both are
  // fine here (the leader side asserts what matters).
  std::printf("[ follower ] ended: %s\n", st.ToString().c_str());
}

enum class Fault { kKill, kStop };

class ProcessGroupCudaTest : public ::testing::TestWithParam<Fault> {
 protected:
  void SetUp() override {
    if (const int devices = testing_util::cuda_device_count(); devices < 2) GTEST_SKIP() << "needs 2 GPUs, found " << devices;
  }
  void TearDown() override {
    if (child_ > 0) {
      ::kill(child_, SIGCONT);
      testing_util::wait_or_kill(child_, Clock::now() + std::chrono::seconds(20));
    }
  }
  void spawn_follower(int port, const std::string& nccl_id) {
    child_ = testing_util::spawn_self("ProcessGroupCudaChild.Follower",
                                      {"SHARDSERVE_TEST_PG_LEADER=127.0.0.1:" + std::to_string(port),
                                       "SHARDSERVE_TEST_PG_NCCL_ID=" + absl::BytesToHexString(nccl_id)});
    ASSERT_GT(child_, 0);
  }
  pid_t child_ = 0;
};

TEST_P(ProcessGroupCudaTest, GoldenTokensThenALostFollowerFailsTheGroupLoudly) {
  const auto golden = nlohmann::json::parse(std::ifstream(data_dir() + "/tiny/" + kModel + "/golden.json"));
  const auto prompt = golden["prompts"][0]["prompt_ids"].get<std::vector<int32_t>>();
  const auto tokens = golden["prompts"][0]["token_ids"].get<std::vector<int32_t>>();

  auto listener = FrameListener::listen("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok()) << listener.status();
  const std::string nccl_id = make_nccl_unique_id();
  ASSERT_FALSE(nccl_id.empty());
  spawn_follower((*listener)->port(), nccl_id);
  auto loaded = start_group_leader(rank_options(0), group_options(0, "", nccl_id), **listener);
  ASSERT_TRUE(loaded.ok()) << loaded.status();

  GreedyOptions greedy;
  greedy.max_tokens = static_cast<int64_t>(tokens.size());
  greedy.ignore_eos = true;
  auto out = generate_greedy(*loaded->executor, prompt, greedy);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->token_ids, tokens);

  const Fault fault = GetParam();
  ASSERT_EQ(::kill(child_, fault == Fault::kKill ? SIGKILL : SIGSTOP), 0);
  if (fault == Fault::kKill) std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the process is gone
  const auto start = Clock::now();
  std::string error;
  try {
    auto again = generate_greedy(*loaded->executor, prompt, greedy);
    error = again.ok() ? "" : std::string(again.status().message());
  } catch (const CollectiveError& e) {
    error = e.what();
  }
  const double waited = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_FALSE(error.empty()) << "the group kept working without its follower";
  // Killed: the lost connection names rank 1; stopped: the watchdog's collective timeout.
  EXPECT_TRUE(error.find("rank 1") != std::string::npos || error.find("stuck or gone") != std::string::npos) << error;
  EXPECT_LT(waited, std::chrono::duration<double>(kCollectiveTimeout).count() + 10) << error;
  std::printf("[ process group ] %s follower: failed after %.2f s: %s\n", fault == Fault::kKill ? "killed" : "stopped",
              waited, error.c_str());
  // The broken group stays broken: the next step fails at once.
  const auto t1 = Clock::now();
  EXPECT_ANY_THROW({
    auto third = generate_greedy(*loaded->executor, prompt, greedy);
    if (!third.ok()) throw std::runtime_error(std::string(third.status().message()));
  });
  EXPECT_LT(Clock::now() - t1, std::chrono::seconds(5));
}

INSTANTIATE_TEST_SUITE_P(Faults, ProcessGroupCudaTest, ::testing::Values(Fault::kKill, Fault::kStop),
                         [](const auto& info) { return info.param == Fault::kKill ? "Killed" : "Stopped"; });

}  // namespace
}  // namespace shardserve
