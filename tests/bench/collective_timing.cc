#include "tests/bench/collective_timing.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <set>
#include <thread>

#include "tests/bench/gpu_timing.h"

namespace shardserve::bench {
namespace {

void die(const std::string& what) {
  std::cerr << "error: " << what << "\n";
  std::exit(1);
}

// Captures `calls` x op(rank) per rank into a graph, replays it `warm` then `reps` times; the
// seconds per call of the slowest rank.
double time_graphs(std::vector<std::unique_ptr<CudaBackend>>& gpus, int calls,
                   const std::function<void(int rank)>& op) {
  const int n = static_cast<int>(gpus.size());
  constexpr int kWarm = 3, kReps = 20;
  std::vector<double> seconds(static_cast<size_t>(n), 0.0);
  std::barrier sync(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      CudaBackend& gpu = *gpus[static_cast<size_t>(r)];
      gpu.bind_thread();
      auto graph = gpu.capture([&] {
        for (int i = 0; i < calls; ++i) op(r);
      });
      cudaEvent_t start, stop;
      CK(cudaEventCreate(&start));
      CK(cudaEventCreate(&stop));
      sync.arrive_and_wait();
      for (int i = 0; i < kWarm; ++i) gpu.replay(graph);
      gpu.synchronize();
      sync.arrive_and_wait();
      CK(cudaEventRecord(start, gpu.stream()));
      for (int i = 0; i < kReps; ++i) gpu.replay(graph);
      CK(cudaEventRecord(stop, gpu.stream()));
      gpu.synchronize();
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, start, stop));
      seconds[static_cast<size_t>(r)] = ms * 1e-3 / (kReps * calls);
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
    });
  }
  for (auto& t : threads) t.join();
  return *std::max_element(seconds.begin(), seconds.end());
}

}  // namespace

CollectiveTimer::CollectiveTimer(const std::vector<int>& devices, size_t one_shot_capacity)
    : capacity_(one_shot_capacity) {
  for (int d : devices) {
    auto gpu = CudaBackend::create(d, DType::kBF16);
    if (!gpu.ok()) die(std::string(gpu.status().message()));
    gpus_.push_back(std::move(*gpu));
  }
  std::vector<CudaBackend*> raw;
  for (auto& g : gpus_) raw.push_back(g.get());
  const bool distinct = std::set<int>(devices.begin(), devices.end()).size() == devices.size();
  if (distinct) {
    auto comms = NcclCommunicator::create_local_group(raw);
    if (!comms.ok()) die(std::string(comms.status().message()));
    comms_ = std::move(*comms);
  }
  if (capacity_ > 0) {
    std::string unavailable;
    auto one_shot = CustomAllReduce::create_local(raw, capacity_, &unavailable);
    if (!one_shot.ok()) die(std::string(one_shot.status().message()));
    if (one_shot->empty()) std::cerr << "one-shot all-reduce unavailable: " << unavailable << "\n";
    one_shot_ = std::move(*one_shot);
  }
}

CollectiveTimer::~CollectiveTimer() {
  // Healthy NCCL groups are finalized by every rank at once.
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms_.size(); ++r) {
    threads.emplace_back([this, r] {
      gpus_[r]->bind_thread();
      comms_[r].reset();
    });
  }
  for (auto& t : threads) t.join();
}

double CollectiveTimer::all_reduce_seconds(size_t bytes, Path path) {
  if (path == Path::kEngine) {
    path = has_one_shot() && bytes <= capacity_ ? Path::kOneShot : Path::kNccl;
  }
  if (path == Path::kNccl && !has_nccl()) die("NCCL needs one rank per GPU");
  if (path == Path::kOneShot && (!has_one_shot() || bytes > capacity_)) die("the one-shot all-reduce does not take this size");
  const auto elements = static_cast<int64_t>(bytes / 2);
  std::vector<Tensor> x;
  for (auto& g : gpus_) {
    g->bind_thread();
    x.push_back(g->empty({std::max<int64_t>(elements, 1)}, DType::kBF16));
    CK(cudaMemset(x.back().data, 0, x.back().nbytes()));
    x.back().shape = {elements};
  }
  // Decode runs ~160 all-reduces a token: a graph of 50 hides the replay's own launch.
  return time_graphs(gpus_, 50, [&](int r) {
    if (path == Path::kNccl) {
      comms_[static_cast<size_t>(r)]->all_reduce(x[static_cast<size_t>(r)]);
    } else {
      one_shot_[static_cast<size_t>(r)]->all_reduce(x[static_cast<size_t>(r)]);
    }
  });
}

double CollectiveTimer::all_gather_seconds(size_t bytes) {
  if (!has_nccl()) die("NCCL needs one rank per GPU");
  const auto elements = static_cast<int64_t>(bytes / 4);
  const int n = world_size();
  std::vector<Tensor> x, out;
  for (auto& g : gpus_) {
    g->bind_thread();
    x.push_back(g->empty({elements}, DType::kF32));
    out.push_back(g->empty({elements * n}, DType::kF32));
    CK(cudaMemset(x.back().data, 0, x.back().nbytes()));
  }
  return time_graphs(gpus_, 10, [&](int r) {
    comms_[static_cast<size_t>(r)]->all_gather(x[static_cast<size_t>(r)], out[static_cast<size_t>(r)]);
  });
}

}  // namespace shardserve::bench
