// NcclCommunicator: the collectives of one GPU rank of a tensor-parallel group, through NCCL, on
// its CudaBackend's stream (so they order with the rank's kernels and are captured into its CUDA
// graphs like any kernel).
//
// Bootstrap: one rank makes a unique id (new_unique_id()), every rank receives it by some channel
// (a thread of the same process, the leader's socket) and calls create() with it; create() blocks
// until all world_size ranks have joined and every connection is made, or fails once `timeout`
// has passed without (a rank lost before the group formed).
//
// Small all-reduces (decode) can go through a CustomAllReduce instead (use_custom_all_reduce):
// one kernel that reads the peers' copies over NVLink, a few microseconds where NCCL's protocols
// take 15-20; every rank picks the path from the tensor's size and dtype alone, so all pick alike.
//
// Failure: NCCL collectives never fail on the host; a lost or stuck peer shows as a stream that
// never finishes. create() therefore installs a watchdog on the backend: while the host waits for
// the stream, it polls ncclCommGetAsyncError and a deadline (`timeout`); on either it aborts the
// communicator (ncclCommAbort ends the in-flight kernels) and the wait throws CollectiveError
// naming the cause. abort() may also be called from another thread (a rank whose peer process is
// gone, say). After an abort every later call throws: the group's KV caches are out of step, the
// only way on is to restart it.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/custom_all_reduce.h"

namespace shardserve {

class NcclCommunicator final : public Communicator {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{120'000};

  // The bytes of a fresh ncclUniqueId (made by one rank, given to all).
  static absl::StatusOr<std::string> new_unique_id();
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> create(CudaBackend& gpu, const std::string& unique_id,
                                                                   int rank, int world_size,
                                                                   std::chrono::milliseconds timeout = kDefaultTimeout);
  // The communicators of ranks 0..N-1 on these GPUs of this process, made at once
  // (ncclCommInitAll: no rendezvous that a failing rank could leave hanging).
  static absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> create_local_group(
      const std::vector<CudaBackend*>& gpus, std::chrono::milliseconds timeout = kDefaultTimeout);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  void all_reduce(Tensor& x) override;
  void all_gather(const Tensor& x, Tensor& out) override;

  // From now on, the all-reduces `custom` takes run there (every rank of the group installs its
  // own, made collectively, before the first collective; null: NCCL for all).
  void use_custom_all_reduce(std::unique_ptr<CustomAllReduce> custom) {
    std::lock_guard lock(mu_);
    custom_ = std::move(custom);
  }
  // Whether all_reduce(x) takes the one-shot kernel.
  bool takes_custom(const Tensor& x) const { return custom_ != nullptr && custom_->takes(x); }

  // ok -> aborted (keeps the first reason): this rank's in-flight collectives end, later ones
  // and waits throw. Peers in other processes see the loss through their own watchdogs.
  void abort(const std::string& reason) override;
  bool aborted() const { return aborted_.load(); }

 private:
  NcclCommunicator() = default;
  // Takes ownership of `comm` and installs the watchdog on gpu.
  static std::unique_ptr<NcclCommunicator> wrap(CudaBackend& gpu, void* comm, int rank, int world_size,
                                                std::chrono::milliseconds timeout);
  void check_usable() const;
  // Throws CollectiveError (and aborts) unless the NCCL call that returned `result` was enqueued.
  void check_enqueued(int result, const char* call);

  CudaBackend* gpu_ = nullptr;
  void* comm_ = nullptr;  // ncclComm_t
  int rank_ = 0;
  int world_size_ = 1;
  std::chrono::milliseconds timeout_{kDefaultTimeout};
  bool non_blocking_ = false;  // made by create(): calls may return ncclInProgress
  std::unique_ptr<CustomAllReduce> custom_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mu_;
  std::string reason_;
};

}  // namespace shardserve
