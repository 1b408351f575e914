#include "worker/engine/executor.h"

#include "absl/strings/str_cat.h"
#include "worker/engine/model_runner.h"
#include "worker/model/checkpoint.h"
#include "worker/model/llama.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cpu_backend.h"

namespace shardserve {
namespace {

// One rank in this process: it owns its backend, checkpoint mapping, weights and runner.
class LocalExecutor final : public StepExecutor {
 public:
  std::vector<float> execute(const Batch& batch) override { return runner->execute(batch); }
  const ModelConfig& config() const override { return model->config(); }
  int64_t num_blocks() const override { return runner->num_blocks(); }
  int64_t block_size() const override { return runner->block_size(); }

  std::unique_ptr<Backend> backend;
  SingleRankCommunicator comm;
  std::unique_ptr<Checkpoint> checkpoint;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<ModelRunner> runner;
};

}  // namespace

absl::StatusOr<LoadedModel> load_model(const ExecutorOptions& options) {
  LoadedModel loaded;
  auto config = load_model_config(options.model_dir);
  if (!config.ok()) return config.status();
  loaded.config = *config;
  auto generation = load_generation_config(options.model_dir, *config);
  if (!generation.ok()) return generation.status();
  loaded.generation = *generation;
  if (options.backend != "cpu") {
    return absl::InvalidArgumentError(absl::StrCat("backend '", options.backend, "' is not available in this build (cpu)"));
  }
  if (options.tp_size != 1) {
    return absl::UnimplementedError("tensor parallelism (--tp-size > 1) is not implemented yet");
  }
  if (options.block_size <= 0) return absl::InvalidArgumentError("block_size must be positive");

  auto exec = std::make_unique<LocalExecutor>();
  exec->backend = std::make_unique<CpuBackend>();
  auto ckpt = Checkpoint::open(options.model_dir);
  if (!ckpt.ok()) return ckpt.status();
  exec->checkpoint = std::move(*ckpt);
  auto model = LlamaModel::load(*config, *exec->checkpoint, *exec->backend, exec->comm);
  if (!model.ok()) return model.status();
  exec->model = std::move(*model);
  int64_t blocks = options.num_kv_blocks;
  if (blocks <= 0) blocks = options.kv_cache_bytes / (exec->model->kv_bytes_per_token() * options.block_size);
  if (blocks <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat("a KV cache of ", options.kv_cache_bytes,
                                                     " bytes holds no block of ", options.block_size, " tokens"));
  }
  exec->runner = std::make_unique<ModelRunner>(*exec->model, *exec->backend, blocks, options.block_size);
  loaded.executor = std::move(exec);
  return loaded;
}

}  // namespace shardserve
