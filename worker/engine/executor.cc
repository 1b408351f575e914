#include "worker/engine/executor.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "worker/engine/rank.h"
#include "worker/engine/tp_executor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/presets.h"
#include "worker/runtime/communicator.h"

namespace shardserve {
namespace {

// One rank in this process.
class LocalExecutor final : public StepExecutor {
 public:
  std::vector<float> execute(const Batch& batch) override {
    rank.backend->bind_thread();  // the engine may step on another thread than the one that loaded
    return rank.runner->execute(batch);
  }
  std::vector<SampleResult> execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) override {
    rank.backend->bind_thread();
    return rank.runner->execute_and_sample(batch, sampled);
  }
  const ModelConfig& config() const override { return rank.model->config(); }
  int64_t num_blocks() const override { return rank.runner->num_blocks(); }
  int64_t block_size() const override { return rank.runner->block_size(); }

  SingleRankCommunicator comm;
  std::unique_ptr<Checkpoint> checkpoint;
  Rank rank;
};

}  // namespace

std::vector<SampleResult> StepExecutor::execute_and_sample(const Batch& batch,
                                                           const std::vector<const Sequence*>& sampled) {
  const std::vector<float> logits = execute(batch);
  const int64_t vocab = vocab_size();
  std::vector<SampleResult> results;
  results.reserve(sampled.size());
  for (size_t i = 0; i < sampled.size(); ++i) {
    results.push_back(sample(*sampled[i], logits.data() + static_cast<int64_t>(i) * vocab, vocab));
  }
  return results;
}

absl::StatusOr<LoadedModel> describe_model(const ExecutorOptions& options) {
  LoadedModel loaded;
  if (!options.synthetic.empty()) {
    auto config = preset_or_config(options.synthetic);
    if (!config.ok()) return config.status();
    loaded.config = *config;
    loaded.generation.bos_token_id = config->bos_token_id;
    loaded.generation.eos_token_ids = config->eos_token_ids;
  } else {
    auto config = load_model_config(options.model_dir);
    if (!config.ok()) return config.status();
    loaded.config = *config;
    auto generation = load_generation_config(options.model_dir, *config);
    if (!generation.ok()) return generation.status();
    loaded.generation = *generation;
  }
  // What the linear layers load as: the checkpoint's format, or fp8 / int8 made at load; synthetic
  // weights take the requested format, else the one their config.json names.
  auto quantization = !options.synthetic.empty() && options.quantization.empty()
                          ? absl::StatusOr<QuantizationConfig>(loaded.config.quantization)
                      : !options.synthetic.empty() ? synthetic_quantization(options.quantization)
                                                   : resolve_quantization(loaded.config.quantization, options.quantization);
  if (!quantization.ok()) return quantization.status();
  loaded.config.quantization = *quantization;
  const ModelConfig& config = loaded.config;
  if (options.backend != "cpu" && options.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("backend '", options.backend, "' is not one of cpu, cuda"));
  }
  if (options.tp_size < 1) return absl::InvalidArgumentError(absl::StrCat("tp_size must be at least 1, got ", options.tp_size));
  if (options.block_size <= 0) return absl::InvalidArgumentError("block_size must be positive");
  if (!(options.gpu_memory_utilization > 0.0 && options.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError("gpu_memory_utilization must be in (0, 1]");
  }
  auto dtype = resolve_activation_dtype(options.dtype, config);
  if (!dtype.ok()) return dtype.status();
  return loaded;
}

absl::StatusOr<LoadedModel> load_model(const ExecutorOptions& options) {
  auto described = describe_model(options);
  if (!described.ok()) return described.status();
  LoadedModel loaded = std::move(*described);
  const ModelConfig& config = loaded.config;
  if (options.tp_size > 1) {
    auto exec = TpExecutor::create(config, options);
    if (!exec.ok()) return exec.status();
    loaded.executor = std::move(*exec);
    return loaded;
  }

  auto exec = std::make_unique<LocalExecutor>();
  if (options.synthetic.empty()) {
    auto ckpt = Checkpoint::open(options.model_dir);
    if (!ckpt.ok()) return ckpt.status();
    exec->checkpoint = std::move(*ckpt);
  }
  auto backend = make_backend(options, config, /*local_index=*/0);
  if (!backend.ok()) return backend.status();
  exec->rank.backend = std::move(*backend);
  exec->rank.comm = &exec->comm;
  auto alone = [](int64_t blocks) { return blocks; };
  if (auto st = build_rank(exec->rank, config, options, exec->checkpoint.get(), alone); !st.ok()) return st;
  loaded.executor = std::move(exec);
  return loaded;
}

absl::StatusOr<int64_t> kv_cache_blocks(const ExecutorOptions& options, int64_t kv_bytes_per_token) {
  if (options.num_kv_blocks > 0) return options.num_kv_blocks;
  const int64_t blocks = options.kv_cache_bytes / (kv_bytes_per_token * options.block_size);
  if (blocks <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat("a KV cache of ", options.kv_cache_bytes,
                                                     " bytes holds no block of ", options.block_size, " tokens"));
  }
  return blocks;
}

}  // namespace shardserve
