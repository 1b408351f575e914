#include "worker/engine/executor.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/tp_executor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/llama.h"
#include "worker/model/memory_plan.h"
#include "worker/model/presets.h"
#include "worker/model/weight_source.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cpu_backend.h"
#ifdef SHARDSERVE_WITH_CUDA
#include <cuda_runtime.h>

#include "worker/runtime/cuda_backend.h"
#endif

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

absl::StatusOr<DType> activation_dtype(const std::string& name, const ModelConfig& config) {
  if (name == "auto") return config.dtype;
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float16") return DType::kF16;
  if (name == "float32") return DType::kF32;
  return absl::InvalidArgumentError(absl::StrCat("dtype '", name, "' is not one of auto, bfloat16, float16, float32"));
}

absl::Status load_weights(LocalExecutor& exec, const ModelConfig& config, const ExecutorOptions& options) {
  absl::StatusOr<std::unique_ptr<LlamaModel>> model;
  if (!options.synthetic.empty()) {
    SyntheticSource source(/*seed=*/20261121);
    model = LlamaModel::load(config, source, *exec.backend, exec.comm);
  } else {
    auto ckpt = Checkpoint::open(options.model_dir);
    if (!ckpt.ok()) return ckpt.status();
    exec.checkpoint = std::move(*ckpt);
    model = LlamaModel::load(config, *exec.checkpoint, *exec.backend, exec.comm);
  }
  if (!model.ok()) return model.status();
  exec.model = std::move(*model);
  return absl::OkStatus();
}

#ifdef SHARDSERVE_WITH_CUDA
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The memory plan: weights (as loaded) + activation peak (measured by warm-up steps at the
// largest prefill and the largest decode batch) + KV cache = gpu_memory_utilization x total.
absl::Status plan_and_build_cuda(LocalExecutor& exec, CudaBackend& gpu, const ExecutorOptions& o) {
  const ModelConfig& config = exec.model->config();
  const int64_t bs = o.block_size;
  const int64_t max_len = o.max_model_len > 0 ? std::min(o.max_model_len, config.max_position_embeddings)
                                              : config.max_position_embeddings;
  const size_t weight_bytes = gpu.persistent_bytes();
  {
    const int64_t prefill = std::min(o.max_num_batched_tokens, max_len);
    const int64_t seqs = std::max<int64_t>(1, std::min(o.max_num_seqs, ModelRunner::kMaxGraphBatch));
    const int64_t blocks = std::max((prefill + bs - 1) / bs, seqs);
    ModelRunner warmup(*exec.model, gpu, blocks, bs, max_len, /*use_graphs=*/false);
    Batch big;
    SequenceStep step{std::vector<int32_t>(static_cast<size_t>(prefill), 1), 0, {}, true};
    for (int64_t b = 0; b < (prefill + bs - 1) / bs; ++b) step.block_table.push_back(static_cast<int32_t>(b));
    big.seqs.push_back(step);
    warmup.execute(big);
    Batch decode;
    for (int64_t i = 0; i < seqs; ++i) decode.seqs.push_back({{1}, 0, {static_cast<int32_t>(i)}, true});
    warmup.execute(decode);
    gpu.begin_step();
  }
  const size_t arena = gpu.scratch_peak_bytes() + gpu.scratch_peak_bytes() / 16 + (size_t{16} << 20);
  gpu.reserve_scratch(arena);

  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return absl::InternalError("cudaMemGetInfo failed");
  const double budget = o.gpu_memory_utilization * static_cast<double>(total_bytes) -
                        static_cast<double>(total_bytes - free_bytes);
  const int64_t block_bytes = exec.model->kv_bytes_per_token() * bs;
  int64_t blocks = o.num_kv_blocks;
  if (blocks <= 0) blocks = budget > 0 ? static_cast<int64_t>(budget / static_cast<double>(block_bytes)) : 0;
  const int64_t tokens = blocks * bs;
  // The planner's prediction from the shapes alone (what `shardserve plan` prints), beside what was
  // measured: "other" is what the device uses beyond weights and arena (context, workspaces).
  PlanOptions po;
  po.gpu_memory_utilization = o.gpu_memory_utilization;
  po.max_model_len = max_len;
  po.activation_dtype = gpu.activation_dtype();
  po.block_size = bs;
  po.max_num_batched_tokens = o.max_num_batched_tokens;
  po.max_num_seqs = o.max_num_seqs;
  const GpuSpec spec{gpu.device_name(), static_cast<int64_t>(total_bytes), gpu.num_sms()};
  const MemoryPlan plan = plan_memory(config, spec, po).value_or(MemoryPlan{});
  const double other = static_cast<double>(total_bytes - free_bytes) - static_cast<double>(weight_bytes + arena);
  std::fprintf(stderr,
               "memory plan on %s (%.1f GiB, gpu_memory_utilization %.2f):  predicted     measured\n"
               "  weights                %8.2f GiB  %8.2f GiB\n"
               "  activations (arena)    %8.2f GiB  %8.2f GiB  (warm-up at %lld batched tokens, %lld sequences)\n"
               "  other (CUDA context)   %8.2f GiB  %8.2f GiB\n"
               "  KV cache               %8.2f GiB  %8.2f GiB  %lld blocks of %lld tokens, %lld bytes/token\n"
               "  KV tokens              %12lld  %12lld\n"
               "  max_model_len          %8lld      -> %.1f concurrent sequences at full length\n",
               gpu.device_name().c_str(), static_cast<double>(total_bytes) / kGiB, o.gpu_memory_utilization,
               static_cast<double>(plan.weights_bytes_per_gpu) / kGiB, static_cast<double>(weight_bytes) / kGiB,
               static_cast<double>(plan.activation_bytes) / kGiB, static_cast<double>(arena) / kGiB,
               static_cast<long long>(o.max_num_batched_tokens), static_cast<long long>(o.max_num_seqs),
               static_cast<double>(plan.overhead_bytes) / kGiB, other / kGiB,
               static_cast<double>(plan.kv_cache_bytes) / kGiB, static_cast<double>(blocks * block_bytes) / kGiB,
               static_cast<long long>(blocks), static_cast<long long>(bs),
               static_cast<long long>(exec.model->kv_bytes_per_token()), static_cast<long long>(plan.kv_capacity_tokens),
               static_cast<long long>(tokens), static_cast<long long>(max_len),
               static_cast<double>(tokens) / static_cast<double>(max_len));
  if (tokens < max_len) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV cache holds ", tokens, " tokens, less than one sequence of max_model_len ", max_len,
        " (weights ", weight_bytes / (1 << 20), " MiB, activations ", arena / (1 << 20),
        " MiB): lower --max-model-len or --max-num-batched-tokens, or raise --gpu-memory-utilization"));
  }
  exec.runner = std::make_unique<ModelRunner>(*exec.model, gpu, blocks, bs, max_len, o.cuda_graphs);
  return absl::OkStatus();
}
#endif

}  // namespace

absl::StatusOr<LoadedModel> load_model(const ExecutorOptions& options) {
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
  const ModelConfig& config = loaded.config;
  if (options.backend != "cpu" && options.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("backend '", options.backend, "' is not one of cpu, cuda"));
  }
  if (options.tp_size < 1) return absl::InvalidArgumentError(absl::StrCat("tp_size must be at least 1, got ", options.tp_size));
  if (options.block_size <= 0) return absl::InvalidArgumentError("block_size must be positive");
  if (!(options.gpu_memory_utilization > 0.0 && options.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError("gpu_memory_utilization must be in (0, 1]");
  }
  auto dtype = activation_dtype(options.dtype, config);
  if (!dtype.ok()) return dtype.status();

  if (options.tp_size > 1) {
    if (options.backend != "cpu") {
      return absl::UnimplementedError("tensor parallelism on the cuda backend is not implemented yet (use --tp-size 1)");
    }
    auto exec = TpExecutor::create(config, options);
    if (!exec.ok()) return exec.status();
    loaded.executor = std::move(*exec);
    return loaded;
  }

  auto exec = std::make_unique<LocalExecutor>();
  if (options.backend == "cuda") {
#ifdef SHARDSERVE_WITH_CUDA
    auto gpu = CudaBackend::create(options.device, *dtype);
    if (!gpu.ok()) return gpu.status();
    CudaBackend* raw = gpu->get();
    exec->backend = std::move(*gpu);
    if (auto st = load_weights(*exec, config, options); !st.ok()) return st;
    if (auto st = plan_and_build_cuda(*exec, *raw, options); !st.ok()) return st;
#else
    return absl::FailedPreconditionError("this build has no CUDA backend (configure with -DSHARDSERVE_CUDA=ON where nvcc is)");
#endif
  } else {
    exec->backend = std::make_unique<CpuBackend>();
    if (auto st = load_weights(*exec, config, options); !st.ok()) return st;
    auto blocks = kv_cache_blocks(options, exec->model->kv_bytes_per_token());
    if (!blocks.ok()) return blocks.status();
    exec->runner = std::make_unique<ModelRunner>(*exec->model, *exec->backend, *blocks, options.block_size,
                                                 options.max_model_len);
  }
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
