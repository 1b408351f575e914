// NcclCommunicator on two GPUs of this process: the collectives' results, and that a lost or
// stuck peer becomes an error within the configured timeout instead of a hang. Skipped with
// fewer than two GPUs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tests/gpu/gpu_test_util.h"
#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/dtype.h"
#include "worker/runtime/nccl_communicator.h"

namespace shardserve {
namespace {

using Clock = std::chrono::steady_clock;

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const int devices = testing_util::cuda_device_count(); devices < 2) GTEST_SKIP() << "needs 2 GPUs, found " << devices;
    for (int d = 0; d < 2; ++d) {
      auto gpu = CudaBackend::create(d, DType::kBF16);
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      gpus_.push_back(std::move(*gpu));
    }
  }
  void make_group(std::chrono::milliseconds timeout) {
    auto comms = NcclCommunicator::create_local_group({gpus_[0].get(), gpus_[1].get()}, timeout);
    ASSERT_TRUE(comms.ok()) << comms.status();
    comms_ = std::move(*comms);
  }
  Tensor upload(int rank, const std::vector<float>& values, DType dtype) {
    gpus_[rank]->bind_thread();
    HostTensor h{values.data(), DType::kF32, {static_cast<int64_t>(values.size())}};
    return gpus_[rank]->upload(h, dtype);
  }
  std::vector<std::unique_ptr<CudaBackend>> gpus_;
  std::vector<std::unique_ptr<NcclCommunicator>> comms_;
};

TEST_F(NcclTest, AllReduceSumsAndAllGatherOrdersByRank) {
  make_group(std::chrono::seconds(60));
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    // Small integers: exact in BF16 too, so the sums are exact.
    std::vector<Tensor> x = {upload(0, {1, 2, 3, -4, 5}, dtype), upload(1, {10, 20, 30, 40, -50}, dtype)};
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        gpus_[r]->bind_thread();
        comms_[r]->all_reduce(x[r]);
        gpus_[r]->synchronize();
      });
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < 2; ++r) {
      gpus_[r]->bind_thread();
      EXPECT_EQ(gpus_[r]->download_f32(x[r]), (std::vector<float>{11, 22, 33, 36, -45})) << dtype_name(dtype);
    }
  }
  std::vector<Tensor> x = {upload(0, {1, 2, 3}, DType::kF32), upload(1, {4, 5, 6}, DType::kF32)};
  std::vector<Tensor> out;
  for (int r = 0; r < 2; ++r) {
    gpus_[r]->bind_thread();
    out.push_back(gpus_[r]->empty({6}, DType::kF32));
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      gpus_[r]->bind_thread();
      comms_[r]->all_gather(x[r], out[r]);
      gpus_[r]->synchronize();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    gpus_[r]->bind_thread();
    EXPECT_EQ(gpus_[r]->download_f32(out[r]), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  }
}

// Both ranks run one all-reduce together, as a group's warm-up steps do: NCCL connects its peers
// lazily, inside the first collective's host call, which a missing peer would block.
void warm_up(std::vector<std::unique_ptr<CudaBackend>>& gpus, std::vector<std::unique_ptr<NcclCommunicator>>& comms) {
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      gpus[r]->bind_thread();
      Tensor x = gpus[r]->empty({4}, DType::kBF16);
      comms[r]->all_reduce(x);
      gpus[r]->synchronize();
    });
  }
  for (auto& t : threads) t.join();
}

// Rank 1 stops taking part (a stuck or dead peer) after the warm-up: rank 0's wait fails with the
// cause after the timeout, not never.
TEST_F(NcclTest, StuckPeerFailsTheWaitAfterTheTimeout) {
  make_group(std::chrono::milliseconds(2000));
  warm_up(gpus_, comms_);
  Tensor x = upload(0, {1, 2, 3}, DType::kBF16);
  gpus_[0]->bind_thread();
  const auto t0 = Clock::now();
  try {
    comms_[0]->all_reduce(x);
    gpus_[0]->synchronize();
    FAIL() << "the all-reduce finished without its peer";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("collective timeout"), std::string::npos) << e.what();
  }
  const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(waited, 1.9);
  EXPECT_LT(waited, 15.0);
  // The group is broken for good: the next collective says why at once.
  EXPECT_THROW(comms_[0]->all_reduce(x), CollectiveError);
  comms_[1]->abort("the test is over");  // its peer is gone: no collective teardown
}

// abort() from another thread (what a rank does when it learns its peer process is gone) ends a
// wait long before the timeout.
TEST_F(NcclTest, AbortFromAnotherThreadEndsTheWait) {
  make_group(std::chrono::seconds(600));
  warm_up(gpus_, comms_);
  Tensor x = upload(0, {1, 2, 3}, DType::kBF16);
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    comms_[0]->abort("rank 1's process exited");
  });
  gpus_[0]->bind_thread();
  const auto t0 = Clock::now();
  try {
    comms_[0]->all_reduce(x);
    gpus_[0]->synchronize();
    ADD_FAILURE() << "the all-reduce finished without its peer";
  } catch (const CollectiveError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1's process exited"), std::string::npos) << e.what();
  }
  aborter.join();
  comms_[1]->abort("the test is over");
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 30.0);
}

// A rank lost before the group forms (here: rank 1 never comes) fails create() once its timeout
// has passed, with a message naming the cause, instead of blocking start-up. One GPU is enough.
TEST(NcclCreateTest, AGroupMissingARankFailsToFormWithinTheTimeout) {
  auto gpu = CudaBackend::create(0, DType::kBF16);
  if (!gpu.ok()) GTEST_SKIP() << gpu.status();
  auto id = NcclCommunicator::new_unique_id();
  ASSERT_TRUE(id.ok()) << id.status();
  const auto t0 = Clock::now();
  auto comm = NcclCommunicator::create(**gpu, *id, 0, 2, std::chrono::seconds(3));
  const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSERT_FALSE(comm.ok()) << "a group of two formed with one rank";
  EXPECT_NE(std::string(comm.status().message()).find("not every rank joined"), std::string::npos) << comm.status();
  EXPECT_GE(waited, 2.9);
  EXPECT_LT(waited, 20.0);
  // The device is still usable (the half-made communicator was aborted, not left running).
  Tensor x = (*gpu)->upload(HostTensor{std::vector<float>{1, 2}.data(), DType::kF32, {2}}, DType::kF32);
  EXPECT_EQ((*gpu)->download_f32(x), (std::vector<float>{1, 2}));
}

// Ranks that join through create() (the process groups' way: a unique id, one rank per thread or
// process; non-blocking communicators) form a group whose collectives work, in and out of graphs.
TEST_F(NcclTest, RanksJoiningThroughCreateReduceEagerlyAndInGraphs) {
  auto id = NcclCommunicator::new_unique_id();
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<absl::StatusOr<std::unique_ptr<NcclCommunicator>>> made(2);
  {
    std::vector<std::thread> joins;
    for (int r = 0; r < 2; ++r) {
      joins.emplace_back([&, r] { made[r] = NcclCommunicator::create(*gpus_[r], *id, r, 2, std::chrono::seconds(60)); });
    }
    for (auto& t : joins) t.join();
  }
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(made[r].ok()) << made[r].status();
    comms_.push_back(std::move(*made[r]));
  }
  std::vector<Tensor> x = {upload(0, {1, 2, 3}, DType::kBF16), upload(1, {10, 20, 30}, DType::kBF16)};
  std::vector<std::shared_ptr<void>> graphs(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      gpus_[r]->bind_thread();
      comms_[r]->all_reduce(x[r]);  // eager: 11 22 33
      graphs[r] = gpus_[r]->capture([&] { comms_[r]->all_reduce(x[r]); });
      gpus_[r]->replay(graphs[r]);  // 22 44 66
      gpus_[r]->synchronize();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    gpus_[r]->bind_thread();
    EXPECT_EQ(gpus_[r]->download_f32(x[r]), (std::vector<float>{22, 44, 66})) << "rank " << r;
  }
  graphs.clear();
  // Healthy communicators are finalized by both ranks at once.
  threads.clear();
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      gpus_[r]->bind_thread();
      comms_[r].reset();
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace
}  // namespace shardserve
