// The group collectives of tensor parallelism timed as a decode step runs them: ranks are
// CudaBackends of this process (one thread each), the collective goes through the same objects
// the engine calls (NcclCommunicator for NCCL, CustomAllReduce for the one-shot kernel), `calls`
// of them captured into one CUDA graph per rank and replayed, timed with events on each rank's
// stream (the slowest rank's time; they wait for each other anyway).
//
// Ranks may share a GPU (devices {0, 0}): then only the one-shot kernel runs (NCCL takes one rank
// per GPU), and what it measures is the kernel's own cost (launch, flag round trip through one
// GPU's L2, the copies), not NVLink.
#pragma once

#include <memory>
#include <vector>

#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/custom_all_reduce.h"
#include "worker/runtime/nccl_communicator.h"

namespace shardserve::bench {

class CollectiveTimer {
 public:
  // Exits with a message when the GPUs or the group cannot be set up. one_shot_capacity: the
  // largest all-reduce the one-shot path takes (bytes).
  CollectiveTimer(const std::vector<int>& devices, size_t one_shot_capacity);
  ~CollectiveTimer();
  int world_size() const { return static_cast<int>(gpus_.size()); }
  bool has_nccl() const { return !comms_.empty(); }
  bool has_one_shot() const { return !one_shot_.empty(); }
  size_t one_shot_capacity() const { return capacity_; }

  // Seconds per BF16 sum all-reduce of `bytes` (a multiple of 2): through NCCL, or the one-shot
  // kernel (bytes <= one_shot_capacity()); or the path the engine takes for that size.
  enum class Path { kNccl, kOneShot, kEngine };
  double all_reduce_seconds(size_t bytes, Path path);
  // Seconds per FP32 all-gather of `bytes` per rank (NCCL).
  double all_gather_seconds(size_t bytes);

 private:
  std::vector<std::unique_ptr<CudaBackend>> gpus_;
  std::vector<std::unique_ptr<NcclCommunicator>> comms_;
  std::vector<std::unique_ptr<CustomAllReduce>> one_shot_;
  size_t capacity_ = 0;
};

}  // namespace shardserve::bench
