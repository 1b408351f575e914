// The one-shot all-reduce (kernels/all_reduce.cu, worker/runtime/custom_all_reduce.h).
//
// On one GPU the protocol runs as it does on many: several ranks, each its own CudaBackend (its
// own stream) on the same device, sharing their buffers directly; and two processes on the one
// GPU, mapping each other's buffers through CUDA IPC exactly as two workers do. Results are checked
// bit for bit against a host sum in rank order over the rounded inputs (what every rank must get),
// for every dtype and for sizes around the 16-byte units, the CTAs' strides and the capacity, with
// misaligned tensors; also across CUDA graph replays (the epochs and staging halves live on the
// device), and a rank whose peer never comes must return once aborted instead of spinning. With two
// GPUs: the same against NCCL's result, both paths of NcclCommunicator::all_reduce, and a lost peer
// inside a one-shot kernel becoming CollectiveError through the watchdog. Skipped without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include "kernels/kernels.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/engine/process_group.h"
#include "worker/runtime/frame_socket.h"
#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/custom_all_reduce.h"
#include "worker/runtime/dtype.h"
#include "worker/runtime/nccl_communicator.h"

namespace shardserve {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<float> random_values(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// What every rank must hold: the rounded inputs summed in FP32 in rank order, rounded once.
std::vector<float> expected_sum(const std::vector<std::vector<float>>& rounded, DType dtype) {
  std::vector<float> sum(rounded[0].size(), 0.0f);
  for (size_t i = 0; i < sum.size(); ++i) {
    float acc = rounded[0][i];
    for (size_t r = 1; r < rounded.size(); ++r) acc += rounded[r][i];
    sum[i] = acc;
  }
  for (float& v : sum) {
    if (dtype == DType::kBF16) v = bf16_to_f32(f32_to_bf16(v));
    if (dtype == DType::kF16) v = f16_to_f32(f32_to_f16(v));
  }
  return sum;
}

// Ranks as backends of one process (one device, or one device each).
struct LocalGroup {
  std::vector<std::unique_ptr<CudaBackend>> gpus;
  std::vector<std::unique_ptr<CustomAllReduce>> ranks;
};

absl::StatusOr<LocalGroup> make_local_group(const std::vector<int>& devices, size_t capacity) {
  LocalGroup g;
  for (int d : devices) {
    auto gpu = CudaBackend::create(d, DType::kBF16);
    if (!gpu.ok()) return gpu.status();
    g.gpus.push_back(std::move(*gpu));
  }
  std::vector<CudaBackend*> raw;
  for (auto& gpu : g.gpus) raw.push_back(gpu.get());
  std::string unavailable;
  auto ranks = CustomAllReduce::create_local(raw, capacity, &unavailable);
  if (!ranks.ok()) return ranks.status();
  if (ranks->empty()) return absl::UnavailableError(unavailable);
  g.ranks = std::move(*ranks);
  return g;
}

// Rank r's input of n elements at `misalign` elements into a padded allocation; the padding
// (before and after) is filled with a sentinel that the all-reduce must leave alone.
struct RankInput {
  Tensor whole;  // [misalign + n + kPad]
  Tensor x;      // the view all-reduced
  std::vector<float> rounded;
};
constexpr int64_t kPad = 9;
// Exact in BF16 and F16 (1234.5 is not: BF16 rounds it to 1232), far from any sum of the inputs.
constexpr float kSentinel = 1232.0f;

RankInput upload_input(CudaBackend& gpu, int64_t n, int64_t misalign, DType dtype, uint32_t seed) {
  std::vector<float> host(static_cast<size_t>(misalign + n + kPad), kSentinel);
  const std::vector<float> values = random_values(n, seed);
  std::copy(values.begin(), values.end(), host.begin() + misalign);
  gpu.bind_thread();
  RankInput in;
  in.whole = gpu.upload(HostTensor{host.data(), DType::kF32, {static_cast<int64_t>(host.size())}}, dtype);
  in.x = in.whole;
  in.x.shape = {n};
  in.x.data = static_cast<char*>(in.whole.data) + misalign * static_cast<int64_t>(dtype_size(dtype));
  const std::vector<float> all = gpu.download_f32(in.whole);
  in.rounded.assign(all.begin() + misalign, all.begin() + misalign + n);
  return in;
}

void expect_result(CudaBackend& gpu, const RankInput& in, int64_t misalign, const std::vector<float>& want,
                   const std::string& what) {
  gpu.bind_thread();
  const std::vector<float> got = gpu.download_f32(in.whole);
  const auto n = static_cast<int64_t>(want.size());
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (got[static_cast<size_t>(misalign + i)] != want[static_cast<size_t>(i)]) {
      if (first < 0) first = i;
      ++wrong;
    }
  }
  EXPECT_EQ(wrong, 0) << what << ": first wrong element " << first << " got "
                      << (first >= 0 ? got[static_cast<size_t>(misalign + first)] : 0.0f) << " want "
                      << (first >= 0 ? want[static_cast<size_t>(first)] : 0.0f);
  for (int64_t i = 0; i < misalign; ++i) ASSERT_EQ(got[static_cast<size_t>(i)], kSentinel) << what << ": wrote before x";
  for (int64_t i = 0; i < kPad; ++i) {
    ASSERT_EQ(got[static_cast<size_t>(misalign + n + i)], kSentinel) << what << ": wrote past x";
  }
}

TEST(OneShotAllReduceTest, EveryRankGetsTheRankOrderSumForEveryDtypeAndSize) {
  // Four passes of the grid (32 CTAs x 512 threads x 16 bytes = 256 KiB a pass).
  constexpr size_t kCapacity = 1u << 20;
  for (int world : {2, 3, 4, 8}) {
    auto group = make_local_group(std::vector<int>(static_cast<size_t>(world), 0), kCapacity);
    if (!group.ok() && group.status().code() == absl::StatusCode::kNotFound) GTEST_SKIP() << group.status();
    ASSERT_TRUE(group.ok()) << group.status();
    // Eight ranks' CTAs spin side by side on the one GPU; they must all fit at once.
    if (world == 8 && group->gpus[0]->num_sms() < 128) continue;
    for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
      const int64_t per_unit = 16 / static_cast<int64_t>(dtype_size(dtype));
      const int64_t max_n = static_cast<int64_t>(kCapacity / dtype_size(dtype));
      // Empty, single elements, a unit and around it, one pass of the grid (32 x 512 units) and
      // around it, the whole capacity and just below.
      for (int64_t n : {int64_t{0}, int64_t{1}, per_unit - 1, per_unit, per_unit + 1, int64_t{1000}, int64_t{8192},
                        32 * 512 * per_unit - 1, 32 * 512 * per_unit + 3, max_n - 5, max_n}) {
        if (n > max_n || n < 0) continue;
        std::vector<RankInput> inputs;
        std::vector<std::vector<float>> rounded;
        for (int r = 0; r < world; ++r) {
          // Odd ranks misaligned by one element: vector and scalar paths in one call.
          const int64_t misalign = r % 2;
          inputs.push_back(upload_input(*group->gpus[static_cast<size_t>(r)], n, misalign, dtype,
                                        static_cast<uint32_t>(1000 * r + n)));
          rounded.push_back(inputs.back().rounded);
        }
        for (int r = 0; r < world; ++r) {
          ASSERT_TRUE(group->ranks[static_cast<size_t>(r)]->takes(inputs[static_cast<size_t>(r)].x));
          group->gpus[static_cast<size_t>(r)]->bind_thread();
          group->ranks[static_cast<size_t>(r)]->all_reduce(inputs[static_cast<size_t>(r)].x);
        }
        const std::vector<float> want = n > 0 ? expected_sum(rounded, dtype) : std::vector<float>();
        for (int r = 0; r < world; ++r) {
          expect_result(*group->gpus[static_cast<size_t>(r)], inputs[static_cast<size_t>(r)], r % 2, want,
                        std::string(dtype_name(dtype)) + " world " + std::to_string(world) + " n " +
                            std::to_string(n) + " rank " + std::to_string(r));
        }
      }
      // One element past the capacity is not taken (NCCL's job).
      Tensor too_big;
      too_big.dtype = dtype;
      too_big.shape = {max_n + 1};
      EXPECT_FALSE(group->ranks[0]->takes(too_big));
    }
  }
}

TEST(OneShotAllReduceTest, GraphReplaysAndDirectCallsStayInStep) {
  constexpr int kWorld = 2;
  auto group = make_local_group({0, 0}, 64u << 10);
  if (!group.ok() && group.status().code() == absl::StatusCode::kNotFound) GTEST_SKIP() << group.status();
  ASSERT_TRUE(group.ok()) << group.status();
  // Per rank a graph of three all-reduces (an odd number: consecutive replays start on alternate
  // staging halves), each on a copy of a fixed source so every replay has the same answer.
  const std::vector<int64_t> sizes = {8192, 37, 20000};
  std::vector<std::vector<Tensor>> sources(kWorld), xs(kWorld);
  std::vector<std::vector<std::vector<float>>> rounded(sizes.size());
  for (int r = 0; r < kWorld; ++r) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      RankInput in = upload_input(*group->gpus[r], sizes[i], 0, DType::kBF16, static_cast<uint32_t>(77 * r + i));
      sources[r].push_back(in.whole);
      rounded[i].push_back(in.rounded);
      xs[r].push_back(group->gpus[r]->empty({sizes[i]}, DType::kBF16));
    }
  }
  std::vector<std::vector<float>> want;
  for (size_t i = 0; i < sizes.size(); ++i) want.push_back(expected_sum(rounded[i], DType::kBF16));
  auto step = [&](int r) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      ASSERT_EQ(cudaMemcpyAsync(xs[r][i].data, sources[r][i].data, xs[r][i].nbytes(), cudaMemcpyDeviceToDevice,
                                group->gpus[r]->stream()),
                cudaSuccess);
      group->ranks[r]->all_reduce(xs[r][i]);
    }
  };
  std::vector<std::shared_ptr<void>> graphs;
  for (int r = 0; r < kWorld; ++r) {
    group->gpus[r]->bind_thread();
    graphs.push_back(group->gpus[r]->capture([&] { step(r); }));
  }
  auto check = [&](const std::string& what) {
    for (int r = 0; r < kWorld; ++r) {
      group->gpus[r]->bind_thread();
      for (size_t i = 0; i < sizes.size(); ++i) {
        ASSERT_EQ(group->gpus[r]->download_f32(xs[r][i]), want[i]) << what << " rank " << r << " tensor " << i;
      }
    }
  };
  for (int round = 0; round < 40; ++round) {
    // Replays and direct launches interleaved (the engine mixes graphs with eager steps).
    for (int r = 0; r < kWorld; ++r) {
      group->gpus[r]->bind_thread();
      if (round % 5 == 4) {
        step(r);
      } else {
        group->gpus[r]->replay(graphs[static_cast<size_t>(r)]);
      }
    }
    check("round " + std::to_string(round));
  }
}

TEST(OneShotAllReduceTest, AbortEndsTheWaitForAPeerThatNeverCame) {
  auto group = make_local_group({0, 0}, 64u << 10);
  if (!group.ok() && group.status().code() == absl::StatusCode::kNotFound) GTEST_SKIP() << group.status();
  ASSERT_TRUE(group.ok()) << group.status();
  RankInput in = upload_input(*group->gpus[0], 4096, 0, DType::kBF16, 5);
  group->gpus[0]->bind_thread();
  group->ranks[0]->all_reduce(in.x);  // rank 1 never calls
  cudaStream_t stream = group->gpus[0]->stream();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady) << "rank 0 finished without its peer";
  const auto start = Clock::now();
  group->ranks[0]->abort();
  auto done = std::async(std::launch::async, [&] {
    cudaSetDevice(0);
    return cudaStreamSynchronize(stream);
  });
  if (done.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    // Release the kernel the way a peer would, so the process can end, and fail.
    RankInput other = upload_input(*group->gpus[1], 4096, 0, DType::kBF16, 6);
    group->ranks[1]->all_reduce(other.x);
    done.wait();
    FAIL() << "an aborted one-shot all-reduce kept waiting for its peer";
  }
  EXPECT_EQ(done.get(), cudaSuccess);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

// --- Two processes on one GPU, through CUDA IPC ---------------------------------------------

constexpr int kIpcCalls = 12;

// The child's side: rank `rank` of two, the peer at the other end of socket `fd`, which carries
// the handle exchange exactly as a process group's connection does (exchange_through_leader).
void run_ipc_rank(int rank, int fd) {
  auto gpu = CudaBackend::create(0, DType::kBF16);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  FrameSocket channel(fd, "rank " + std::to_string(1 - rank));
  GroupOptions group;
  group.rank = rank;
  group.tp_size = 2;
  group.collective_timeout = std::chrono::seconds(60);
  CustomAllReduce::Exchange exchange = [&](const std::string& mine) {
    return exchange_through_leader(group, {&channel}, mine);
  };
  std::string unavailable;
  auto custom = CustomAllReduce::create(**gpu, rank, 2, exchange, 64u << 10, &unavailable);
  ASSERT_TRUE(custom.ok()) << custom.status();
  ASSERT_NE(*custom, nullptr) << "the one-shot all-reduce is unavailable between two processes: " << unavailable;
  // A watchdog: a hung protocol fails the child instead of the test run.
  std::atomic<bool> finished{false};
  std::thread watchdog([&] {
    const auto deadline = Clock::now() + std::chrono::seconds(90);
    while (!finished && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (!finished) {
      (*custom)->abort();
      ADD_FAILURE() << "rank " << rank << ": the all-reduces did not finish within 90 s";
    }
  });
  for (int call = 0; call < kIpcCalls; ++call) {
    const int64_t n = call % 3 == 0 ? 9 : 4096 + call;
    // Both ranks know both inputs (same seeds), so each checks the sum alone.
    std::vector<std::vector<float>> rounded(2);
    RankInput mine;
    for (int r = 0; r < 2; ++r) {
      RankInput in = upload_input(**gpu, n, r, DType::kBF16, static_cast<uint32_t>(31 * call + r));
      rounded[static_cast<size_t>(r)] = in.rounded;
      if (r == rank) mine = in;
    }
    (*custom)->all_reduce(mine.x);
    expect_result(**gpu, mine, rank, expected_sum(rounded, DType::kBF16),
                  "process rank " + std::to_string(rank) + " call " + std::to_string(call));
  }
  finished = true;
  watchdog.join();
  // Neither side unmaps before both are done.
  ASSERT_TRUE(channel.send("done").ok());
  ASSERT_TRUE(channel.receive(std::chrono::seconds(60)).ok());
}

TEST(OneShotAllReduceIpc, ChildRank) {
  const char* rank = std::getenv("SHARDSERVE_TEST_AR_RANK");
  const char* fd = std::getenv("SHARDSERVE_TEST_AR_FD");
  if (rank == nullptr || fd == nullptr) GTEST_SKIP() << "run by TwoProcessesOnOneGpu";
  run_ipc_rank(std::atoi(rank), std::atoi(fd));
}

TEST(OneShotAllReduceIpc, TwoProcessesOnOneGpu) {
  if (testing_util::cuda_device_count() < 1) GTEST_SKIP() << "no CUDA device";
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  std::vector<pid_t> children;
  for (int r = 0; r < 2; ++r) {
    const pid_t pid = testing_util::spawn_self(
        "OneShotAllReduceIpc.ChildRank",
        {"SHARDSERVE_TEST_AR_RANK=" + std::to_string(r), "SHARDSERVE_TEST_AR_FD=" + std::to_string(fds[r])});
    ASSERT_GT(pid, 0);
    children.push_back(pid);
  }
  ::close(fds[0]);
  ::close(fds[1]);
  const auto deadline = Clock::now() + std::chrono::seconds(150);
  for (pid_t pid : children) {
    EXPECT_EQ(testing_util::wait_or_kill(pid, deadline), 0)
        << "a rank process failed or did not finish within 150 s (its output is above)";
  }
}

// --- Two GPUs: against NCCL, and under a lost peer ---------------------------------------------

class TwoGpuAllReduceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const int devices = testing_util::cuda_device_count(); devices < 2) GTEST_SKIP() << "needs 2 GPUs, found " << devices;
  }
};

TEST_F(TwoGpuAllReduceTest, OneShotMatchesNcclAndTheCommunicatorTakesBothPaths) {
  constexpr size_t kCapacity = 128u << 10;
  auto group = make_local_group({0, 1}, kCapacity);
  ASSERT_TRUE(group.ok()) << group.status();
  std::vector<CudaBackend*> gpus = {group->gpus[0].get(), group->gpus[1].get()};
  auto comms = NcclCommunicator::create_local_group(gpus);
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto both = [&](const std::function<void(int)>& fn) {
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        group->gpus[r]->bind_thread();
        fn(r);
        group->gpus[r]->synchronize();
      });
    }
    for (auto& t : threads) t.join();
  };
  // The one-shot kernel (group->ranks) against NCCL (the communicators, none installed yet).
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    const int64_t max_n = static_cast<int64_t>(kCapacity / dtype_size(dtype));
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8192}, int64_t{8192 * 3 + 1}, max_n}) {
      std::vector<RankInput> a, b;
      for (int r = 0; r < 2; ++r) {
        a.push_back(upload_input(*group->gpus[r], n, 0, dtype, static_cast<uint32_t>(r + 10 * n)));
        b.push_back(upload_input(*group->gpus[r], n, 0, dtype, static_cast<uint32_t>(r + 10 * n)));
      }
      ASSERT_FALSE((*comms)[0]->takes_custom(b[0].x));
      both([&](int r) { group->ranks[static_cast<size_t>(r)]->all_reduce(a[static_cast<size_t>(r)].x); });
      both([&](int r) { (*comms)[static_cast<size_t>(r)]->all_reduce(b[static_cast<size_t>(r)].x); });
      for (int r = 0; r < 2; ++r) {
        group->gpus[r]->bind_thread();
        // Two ranks: NCCL adds a + b once and rounds once, as the one-shot kernel does.
        EXPECT_EQ(group->gpus[r]->download_f32(a[r].x), group->gpus[r]->download_f32(b[r].x))
            << dtype_name(dtype) << " n " << n << " rank " << r;
      }
    }
  }
  // Installed: up to the capacity through the kernel, above through NCCL; both right.
  auto custom = CustomAllReduce::create_local(gpus, kCapacity);
  ASSERT_TRUE(custom.ok() && custom->size() == 2) << custom.status();
  for (int r = 0; r < 2; ++r) (*comms)[static_cast<size_t>(r)]->use_custom_all_reduce(std::move((*custom)[static_cast<size_t>(r)]));
  const int64_t max_n = static_cast<int64_t>(kCapacity / 2);
  for (int64_t n : {max_n, max_n + 1}) {
    std::vector<RankInput> in;
    for (int r = 0; r < 2; ++r) in.push_back(upload_input(*group->gpus[r], n, 0, DType::kBF16, static_cast<uint32_t>(r)));
    EXPECT_EQ((*comms)[0]->takes_custom(in[0].x), n == max_n);
    const std::vector<float> want = expected_sum({in[0].rounded, in[1].rounded}, DType::kBF16);
    both([&](int r) { (*comms)[static_cast<size_t>(r)]->all_reduce(in[static_cast<size_t>(r)].x); });
    for (int r = 0; r < 2; ++r) expect_result(*group->gpus[r], in[static_cast<size_t>(r)], 0, want, "n " + std::to_string(n));
  }
}

TEST_F(TwoGpuAllReduceTest, APeerLostInsideTheKernelIsACollectiveErrorNotAHang) {
  std::vector<std::unique_ptr<CudaBackend>> gpus;
  for (int d = 0; d < 2; ++d) {
    auto gpu = CudaBackend::create(d, DType::kBF16);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpus.push_back(std::move(*gpu));
  }
  auto comms = NcclCommunicator::create_local_group({gpus[0].get(), gpus[1].get()}, std::chrono::seconds(3));
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto custom = CustomAllReduce::create_local({gpus[0].get(), gpus[1].get()}, 64u << 10);
  ASSERT_TRUE(custom.ok() && custom->size() == 2) << custom.status();
  for (int r = 0; r < 2; ++r) (*comms)[static_cast<size_t>(r)]->use_custom_all_reduce(std::move((*custom)[static_cast<size_t>(r)]));
  RankInput in = upload_input(*gpus[0], 8192, 0, DType::kBF16, 3);
  ASSERT_TRUE((*comms)[0]->takes_custom(in.x));
  gpus[0]->bind_thread();
  (*comms)[0]->all_reduce(in.x);  // rank 1 is "gone": it never calls
  const auto start = Clock::now();
  EXPECT_THROW(gpus[0]->synchronize(), CollectiveError);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(20));
  EXPECT_TRUE((*comms)[0]->aborted());
  EXPECT_THROW((*comms)[0]->all_reduce(in.x), CollectiveError);
  (*comms)[1]->abort("test: the group is torn down");
}

}  // namespace
}  // namespace shardserve
