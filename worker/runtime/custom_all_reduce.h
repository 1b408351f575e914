// CustomAllReduce: kernels/all_reduce.cu's one-shot all-reduce for one rank of a GPU group, with
// the memory it needs: this rank's signal block and staging buffer (one device allocation), every
// peer's mapped into this process, and a host-mapped abort word.
//
// Setup is collective, like NCCL's: every rank of the group calls create() at the same point.
// - Ranks in different processes (one worker per GPU, the deployment's layout) export their
//   allocation as a CUDA IPC handle and open their peers'; the handles travel over the group's own
//   control channel (`exchange`: this rank's bytes in, every rank's bytes out, index = rank).
// - Ranks that are threads of one process (TpExecutor) map their peers' memory by peer access,
//   or share it outright when they are on the same GPU (several ranks on one device: tests).
// When any rank cannot map its peers (no peer access between the GPUs, IPC not allowed between
// the processes' containers), every rank learns it in a second exchange and create() returns
// nullptr on all of them: the group keeps NCCL alone, all ranks alike (a group whose ranks chose
// different collectives would hang).
//
// Use: NcclCommunicator takes the all-reduces that fit (one_shot_all_reduce_supported, at most
// `max_bytes`) here, the rest through NCCL; both on the backend's stream. abort() ends any wait
// of a launched kernel (its result is garbage; the caller aborts the group), so a lost peer can
// never leave a kernel spinning.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "worker/runtime/tensor.h"

namespace shardserve {

class CudaBackend;

class CustomAllReduce {
 public:
  // The largest all-reduce taken, in bytes (each rank stages twice this): 32 tokens of a 70B
  // model's hidden state (32 x 8192 x 2 B). Larger ones go through NCCL. all_reduce_bench measures
  // the crossover; SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES overrides it (0: NCCL only), alike on
  // every rank.
  static constexpr size_t kDefaultCapacity = 512u << 10;
  // kDefaultCapacity or the environment's override, rounded up to 16 bytes; an error for a value
  // that is not a byte count.
  static absl::StatusOr<size_t> configured_capacity();
  using Exchange = std::function<absl::StatusOr<std::vector<std::string>>(const std::string& mine)>;

  // One rank of a group spread over processes; capacity 0: this rank opts out (so the group
  // does). nullptr: some rank could not map its peers or opted out
  // (*unavailable says which and why, the same on every rank); an error: the exchange itself
  // failed (the group is broken).
  static absl::StatusOr<std::unique_ptr<CustomAllReduce>> create(CudaBackend& gpu, int rank, int world_size,
                                                                 const Exchange& exchange,
                                                                 size_t capacity = kDefaultCapacity,
                                                                 std::string* unavailable = nullptr);
  // Every rank of a group whose ranks are this process's backends (rank r = gpus[r]); empty when
  // the GPUs cannot map each other's memory (*unavailable says why).
  static absl::StatusOr<std::vector<std::unique_ptr<CustomAllReduce>>> create_local(
      const std::vector<CudaBackend*>& gpus, size_t capacity = kDefaultCapacity, std::string* unavailable = nullptr);
  ~CustomAllReduce();
  CustomAllReduce(const CustomAllReduce&) = delete;
  CustomAllReduce& operator=(const CustomAllReduce&) = delete;

  int rank() const { return peers_.rank; }
  int world_size() const { return peers_.world_size; }
  size_t capacity() const { return peers_.capacity; }
  // Whether all_reduce takes x (dtype and size; the same answer on every rank for the same call).
  bool takes(const Tensor& x) const;
  // In place on the backend's stream; throws std::runtime_error on a launch error.
  void all_reduce(Tensor& x);
  // Ends every wait of this rank's launched and future kernels, for good. Thread-safe.
  void abort();

 private:
  explicit CustomAllReduce(CudaBackend& gpu) : gpu_(&gpu) {}
  // This rank's allocation (zeroed signal block) and abort word.
  absl::Status allocate(size_t capacity);

  CudaBackend* gpu_;
  kernels::AllReducePeers peers_;
  void* own_ = nullptr;                // this rank's device allocation
  int32_t* abort_host_ = nullptr;      // cudaHostAlloc'd, mapped
  std::vector<void*> opened_;          // peers' allocations opened through CUDA IPC
};

}  // namespace shardserve
