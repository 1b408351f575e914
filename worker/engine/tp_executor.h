// TpExecutor: a tensor-parallel group of N ranks as threads of this process, seen by the Engine as
// one StepExecutor: CPU ranks (CpuBackend each, talking through an InProcessGroup) or GPU ranks
// (a CudaBackend on GPUs device .. device + N - 1 each, talking through NCCL).
//
// Rank r has its own backend, LlamaModel shard and ModelRunner, whose KV cache holds the rank's
// KV heads. Every rank has the same number of blocks (the minimum the ranks' memory plans allow),
// so the engine's one BlockManager (and the block tables in each Batch) describe all of them.
// The ranks are built in parallel, each on its own thread (see rank.h: GPU warm-up steps run
// collectives, so they must run together).
//
// Rank 0 runs on the caller's thread. execute(batch) packs the batch into a step message (the
// same bytes a GPU group leader sends its follower processes), publishes it on a one-slot
// broadcast channel, runs its own shard and returns the full logits (the model gathers them over
// the group). Each follower thread loops: take the next message, unpack it, run the same step,
// drop the logits. Rank 0 publishes step k + 1 only after every follower took step k.
//
// Failure: any exception on any rank breaks the group, so ranks blocked in a collective stop at
// once; the failing call on rank 0 rethrows, and every later execute() throws CollectiveError
// naming the first failure. Failures here are programming errors or a lost rank, never bad
// requests (the engine validates those), so there is no recovery: the caller ends.
// Destruction: channel closed -> group broken (wakes a follower stuck in a collective) ->
// followers joined.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/executor.h"
#include "worker/engine/rank.h"
#include "worker/model/checkpoint.h"
#include "worker/runtime/inproc_communicator.h"

namespace shardserve {

class TpExecutor final : public StepExecutor {
 public:
  // Loads every rank's shard (options.tp_size ranks) and starts the followers. INVALID_ARGUMENT
  // when tp_size does not divide the model (see LlamaModel).
  static absl::StatusOr<std::unique_ptr<TpExecutor>> create(const ModelConfig& config,
                                                            const ExecutorOptions& options);
  ~TpExecutor() override;

  std::vector<float> execute(const Batch& batch) override;
  std::vector<SampleResult> execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) override;
  const ModelConfig& config() const override { return ranks_[0]->model->config(); }
  int64_t num_blocks() const override { return ranks_[0]->runner->num_blocks(); }
  int64_t block_size() const override { return ranks_[0]->runner->block_size(); }
  int tp_size() const { return static_cast<int>(ranks_.size()); }

 private:
  explicit TpExecutor(int tp_size);
  // Builds rank r (on its own thread); followers then loop in follow().
  void run_rank(int r, const ModelConfig& config, const ExecutorOptions& options);
  void publish(std::string message);
  // Publishes the batch and runs rank 0's share of it through fn(runner).
  template <typename Fn>
  auto lead(const Batch& batch, Fn&& fn);
  void follow(int rank);
  // ok -> broken: every rank blocked in a collective, a setup barrier or publish() stops.
  void abort(const std::string& reason);
  bool broken() const;

  std::unique_ptr<InProcessGroup> cpu_group_;  // CPU ranks
  std::unique_ptr<Checkpoint> checkpoint_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<std::thread> threads_;  // [r]: rank r's builder; followers then follow

  // Set-up: every rank's status and KV capacity, the agreed block count.
  std::vector<absl::Status> setup_status_;
  std::vector<int64_t> setup_blocks_;
  int setup_posted_ = 0;
  int setup_done_ = 0;
  bool broken_ = false;  // guarded by mu_

  // The broadcast channel, guarded by mu_.
  std::mutex mu_;
  std::condition_variable cv_;
  std::string message_;    // the current step
  uint64_t step_ = 0;      // steps published
  int num_taken_ = 0;      // followers that took the current step
  bool closed_ = false;
};

}  // namespace shardserve
