// All-reduce latency per message size: NCCL against the one-shot kernel, both as the engine runs
// them (tests/bench/collective_timing.h: CUDA graphs of back-to-back calls, BF16 sums). The
// crossover (the smallest size at which NCCL is faster) is what SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES
// should be set below; CustomAllReduce::kDefaultCapacity is chosen from it.
//   all_reduce_bench [--ranks 2] [--one-gpu] [--max-bytes 8388608] [--out FILE]
// Ranks on GPUs 0..N-1 of this machine; --one-gpu puts them all on GPU 0 (the one-shot kernel
// alone: its launch, flag round trip and copies, without NVLink).
// One JSON record per size: {"bench":"all_reduce","device","tp_size","ranks_on","bytes",
// "nccl_us","one_shot_us","date"} (a path that did not run is null).
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "tests/bench/collective_timing.h"
#include "tests/bench/gpu_timing.h"

int main(int argc, char** argv) {
  CLI::App app{"shardserve all-reduce benchmark: NCCL against the one-shot kernel"};
  int ranks = 2;
  bool one_gpu = false;
  size_t max_bytes = 8u << 20;
  std::string out_path;
  app.add_option("--ranks", ranks, "ranks (GPUs 0 .. N-1, or all on GPU 0 with --one-gpu)")->check(CLI::Range(2, 8));
  app.add_flag("--one-gpu", one_gpu, "all ranks on GPU 0: the one-shot kernel's own cost, no NVLink, no NCCL");
  app.add_option("--max-bytes", max_bytes, "largest message (sizes double from 2 KiB)");
  app.add_option("--out", out_path, "append JSON records here");
  CLI11_PARSE(app, argc, argv);

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
    std::cerr << "error: no CUDA device\n";
    return 1;
  }
  if (!one_gpu && devices < ranks) {
    std::cerr << "error: " << ranks << " ranks need " << ranks << " GPUs, found " << devices
              << " (--one-gpu times the one-shot kernel with every rank on GPU 0)\n";
    return 1;
  }
  std::vector<int> placement;
  for (int r = 0; r < ranks; ++r) placement.push_back(one_gpu ? 0 : r);
  const size_t capacity = (max_bytes + 15) / 16 * 16;
  shardserve::bench::CollectiveTimer timer(placement, capacity);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const std::string device = std::string(prop.name) + (ranks > 1 && !one_gpu ? " x" + std::to_string(ranks) : "");

  using Path = shardserve::bench::CollectiveTimer::Path;
  std::vector<nlohmann::json> records;
  size_t crossover = 0;
  std::printf("%10s %10s %12s %8s\n", "bytes", "nccl us", "one-shot us", "ratio");
  for (size_t bytes = 2048; bytes <= max_bytes; bytes *= 2) {
    nlohmann::json r = {{"bench", "all_reduce"}, {"device", device}, {"tp_size", ranks},
                        {"ranks_on", one_gpu ? "one GPU" : "one GPU each"}, {"bytes", bytes},
                        {"dtype", "bfloat16"}, {"nccl_us", nullptr}, {"one_shot_us", nullptr}, {"date", shardserve::harness::record_date()}};
    double nccl = -1, one_shot = -1;
    if (timer.has_nccl()) {
      nccl = timer.all_reduce_seconds(bytes, Path::kNccl) * 1e6;
      r["nccl_us"] = nccl;
    }
    if (timer.has_one_shot()) {
      one_shot = timer.all_reduce_seconds(bytes, Path::kOneShot) * 1e6;
      r["one_shot_us"] = one_shot;
    }
    if (nccl > 0 && one_shot > 0 && nccl < one_shot && crossover == 0) crossover = bytes;
    std::printf("%10zu %10.2f %12.2f %8.2f\n", bytes, nccl, one_shot, nccl > 0 && one_shot > 0 ? nccl / one_shot : 0.0);
    records.push_back(r);
  }
  if (timer.has_nccl() && timer.has_one_shot()) {
    if (crossover > 0) {
      std::printf("NCCL is faster from %zu bytes\n", crossover);
    } else {
      std::printf("the one-shot kernel is faster at every size up to %zu bytes\n", max_bytes);
    }
  }
  if (!out_path.empty()) {
    std::ofstream out(out_path, std::ios::app);
    for (const auto& r : records) out << r.dump() << "\n";
  }
  return 0;
}
