// Rank: one rank's share of a model on its own device — backend, communicator, weights, KV cache
// and ModelRunner — and the one way it is built. Every executor is made of ranks: a single rank
// in this process, a tensor-parallel group of ranks as threads (TpExecutor), or one rank per
// process of a GPU group (worker/service).
//
// build_rank() order, the same on every rank of a group (the warm-up steps run collectives, so
// all ranks must be in it together):
//   weights (checkpoint slices or synthetic) -> on the GPU: warm-up at the largest step,
//   activation arena fixed, KV capacity from the memory plan -> agree(capacity): the group's
//   block count (the minimum over ranks: the engine's one BlockManager describes all caches)
//   -> ModelRunner.
#pragma once

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "worker/engine/executor.h"
#include "worker/engine/model_runner.h"
#include "worker/model/checkpoint.h"
#include "worker/model/llama.h"
#include "worker/runtime/backend.h"
#include "worker/runtime/communicator.h"

namespace shardserve {

struct Rank {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> owned_comm;  // NCCL ranks own theirs; CPU ranks use their group's
  Communicator* comm = nullptr;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<ModelRunner> runner;
};

// This rank's KV capacity in blocks -> the group's (identity for a rank alone).
using AgreeBlocks = std::function<int64_t(int64_t)>;

// Activation dtype of options.dtype for this model.
absl::StatusOr<DType> resolve_activation_dtype(const std::string& name, const ModelConfig& config);

// Creates the backend of this rank: CpuBackend (threads: its share of the cores), or a
// CudaBackend on GPU options.device + local_index.
absl::StatusOr<std::unique_ptr<Backend>> make_backend(const ExecutorOptions& options, const ModelConfig& config,
                                                      int local_index, int cpu_threads = 0);

// Loads the rank's weights and builds its runner (see the order above). `rank.backend` and
// `rank.comm` are set by the caller. `checkpoint` is null for synthetic weights.
absl::Status build_rank(Rank& rank, const ModelConfig& config, const ExecutorOptions& options,
                        const Checkpoint* checkpoint, const AgreeBlocks& agree);

// Runs the largest steps the scheduler can emit under options' limits (max_num_batched_tokens,
// max_num_seqs, max_model_len) on a throw-away runner: a CUDA backend in measure mode then knows
// the activation arena that no step can exhaust (worker/model/memory_plan.h WarmupShapes).
void warm_up_worst_steps(LlamaModel& model, Backend& backend, const ExecutorOptions& options);

}  // namespace shardserve
