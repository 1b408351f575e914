#include "worker/engine/rank.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "worker/model/memory_plan.h"
#include "worker/model/weight_source.h"
#include "worker/runtime/cpu_backend.h"
#ifdef SHARDSERVE_WITH_CUDA
#include <cuda_runtime.h>

#include "worker/runtime/cuda_backend.h"
#endif

namespace shardserve {
namespace {

absl::Status load_weights(Rank& rank, const ModelConfig& config, const Checkpoint* checkpoint) {
  absl::StatusOr<std::unique_ptr<LlamaModel>> model;
  if (checkpoint == nullptr) {
    SyntheticSource source(/*seed=*/20261121, config.quantization);
    model = LlamaModel::load(config, source, *rank.backend, *rank.comm);
  } else {
    model = LlamaModel::load(config, *checkpoint, *rank.backend, *rank.comm);
  }
  if (!model.ok()) return model.status();
  rank.model = std::move(*model);
  return absl::OkStatus();
}

int64_t model_len(const ExecutorOptions& o, const ModelConfig& config) {
  return o.max_model_len > 0 ? std::min(o.max_model_len, config.max_position_embeddings)
                             : config.max_position_embeddings;
}

}  // namespace

void warm_up_worst_steps(LlamaModel& model, Backend& backend, const ExecutorOptions& o) {
  const int64_t bs = o.block_size;
  const int64_t max_len = model_len(o, model.config());
  // The worst steps the scheduler can emit (measure mode: every scratch allocation is counted):
  // the token budget spent by max_num_seqs sequences that all sample (one prefill chunk and
  // single decode tokens), block tables at their widest; and every decode bucket the CUDA
  // graphs replay (padded rows, the full block-table width, split attention). Every term of a
  // step's scratch grows with its tokens, rows and table width, except the split-attention
  // partials of small decode steps, which the buckets cover (worker/model/memory_plan.cc).
  const WarmupShapes shapes = warmup_shapes(o.max_num_batched_tokens, o.max_num_seqs, max_len, bs);
  ModelRunner warmup(model, backend, shapes.num_blocks, bs, max_len, /*use_graphs=*/false);
  std::vector<Sequence> seqs(static_cast<size_t>(shapes.mixed_seqs));
  std::vector<const Sequence*> sampled;
  Batch mixed;
  for (int64_t i = 0; i < shapes.mixed_seqs; ++i) {
    const int64_t len = i == 0 ? shapes.mixed_tokens - (shapes.mixed_seqs - 1) : 1;
    SequenceStep step{std::vector<int32_t>(static_cast<size_t>(len), 1), 0, {}, true};
    for (int64_t b = 0; b < shapes.width; ++b) step.block_table.push_back(static_cast<int32_t>(b % shapes.num_blocks));
    mixed.seqs.push_back(std::move(step));
    Sequence& seq = seqs[static_cast<size_t>(i)];
    seq.tokens = {1};
    seq.num_prompt_tokens = 1;
    seq.params.temperature = 0.0;
    sampled.push_back(&seq);
  }
  warmup.execute_and_sample(mixed, sampled);
  for (int64_t rows : shapes.decode_buckets) {
    Batch decode;
    for (int64_t i = 0; i < rows; ++i) {
      decode.seqs.push_back({{1}, 0, std::vector<int32_t>(static_cast<size_t>(shapes.width), 0), true});
    }
    warmup.execute_only(decode);
  }
  backend.begin_step();
}

namespace {

#ifdef SHARDSERVE_WITH_CUDA
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The memory plan: weights (as loaded) + activation peak (measured by warm-up steps at the
// largest steps the scheduler can emit) + KV cache = gpu_memory_utilization x total.
// Returns the KV blocks this GPU can hold; prints the plan beside the planner's prediction.
absl::StatusOr<int64_t> plan_cuda_memory(Rank& rank, CudaBackend& gpu, const ExecutorOptions& o) {
  const ModelConfig& config = rank.model->config();
  const int64_t bs = o.block_size;
  const int64_t max_len = model_len(o, config);
  const size_t weight_bytes = gpu.persistent_bytes();
  warm_up_worst_steps(*rank.model, gpu, o);
  const size_t arena = gpu.scratch_peak_bytes() + gpu.scratch_peak_bytes() / 16 + (size_t{16} << 20);
  gpu.reserve_scratch(arena);

  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return absl::InternalError("cudaMemGetInfo failed");
  const double budget = o.gpu_memory_utilization * static_cast<double>(total_bytes) -
                        static_cast<double>(total_bytes - free_bytes);
  const int64_t block_bytes = rank.model->kv_bytes_per_token() * bs;
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
  po.tp_size = rank.comm->world_size();
  if (config.quantization.quantized()) {
    po.quantization = config.quantization.name();
    po.group_size = config.quantization.group_size > 0 ? config.quantization.group_size : config.hidden_size;
  }
  const GpuSpec spec{gpu.device_name(), static_cast<int64_t>(total_bytes), gpu.num_sms()};
  const MemoryPlan plan = plan_memory(config, spec, po).value_or(MemoryPlan{});
  const double other = static_cast<double>(total_bytes - free_bytes) - static_cast<double>(weight_bytes + arena);
  std::fprintf(stderr,
               "memory plan of rank %d/%d on %s (%.1f GiB, gpu_memory_utilization %.2f):  predicted     measured\n"
               "  weights                %8.2f GiB  %8.2f GiB\n"
               "  activations (arena)    %8.2f GiB  %8.2f GiB  (worst step: %lld batched tokens, %lld sequences)\n"
               "  other (CUDA context)   %8.2f GiB  %8.2f GiB\n"
               "  KV cache               %8.2f GiB  %8.2f GiB  %lld blocks of %lld tokens, %lld bytes/token\n"
               "  KV tokens              %12lld  %12lld\n"
               "  max_model_len          %8lld      -> %.1f concurrent sequences at full length\n",
               rank.comm->rank(), rank.comm->world_size(), gpu.device_name().c_str(),
               static_cast<double>(total_bytes) / kGiB, o.gpu_memory_utilization,
               static_cast<double>(plan.weights_bytes_per_gpu) / kGiB, static_cast<double>(weight_bytes) / kGiB,
               static_cast<double>(plan.activation_bytes) / kGiB, static_cast<double>(arena) / kGiB,
               static_cast<long long>(o.max_num_batched_tokens), static_cast<long long>(o.max_num_seqs),
               static_cast<double>(plan.overhead_bytes) / kGiB, other / kGiB,
               static_cast<double>(plan.kv_cache_bytes) / kGiB, static_cast<double>(blocks * block_bytes) / kGiB,
               static_cast<long long>(blocks), static_cast<long long>(bs),
               static_cast<long long>(rank.model->kv_bytes_per_token()), static_cast<long long>(plan.kv_capacity_tokens),
               static_cast<long long>(tokens), static_cast<long long>(max_len),
               static_cast<double>(tokens) / static_cast<double>(max_len));
  return blocks;
}
#endif

}  // namespace

absl::StatusOr<DType> resolve_activation_dtype(const std::string& name, const ModelConfig& config) {
  if (name == "auto") return config.dtype;
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float16") return DType::kF16;
  if (name == "float32") return DType::kF32;
  return absl::InvalidArgumentError(absl::StrCat("dtype '", name, "' is not one of auto, bfloat16, float16, float32"));
}

absl::StatusOr<std::unique_ptr<Backend>> make_backend(const ExecutorOptions& options, const ModelConfig& config,
                                                      int local_index, int cpu_threads) {
  if (options.backend == "cpu") {
    auto cpu = std::make_unique<CpuBackend>(cpu_threads);
    cpu->emulate_w8a8(options.cpu_w8a8);
    return std::unique_ptr<Backend>(std::move(cpu));
  }
  if (options.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("backend '", options.backend, "' is not one of cpu, cuda"));
  }
#ifdef SHARDSERVE_WITH_CUDA
  auto dtype = resolve_activation_dtype(options.dtype, config);
  if (!dtype.ok()) return dtype.status();
  auto gpu = CudaBackend::create(options.device + local_index, *dtype);
  if (!gpu.ok()) return gpu.status();
  return std::unique_ptr<Backend>(std::move(*gpu));
#else
  (void)config;
  (void)local_index;
  return absl::FailedPreconditionError("this build has no CUDA backend (configure with -DSHARDSERVE_CUDA=ON where nvcc is)");
#endif
}

absl::Status build_rank(Rank& rank, const ModelConfig& config, const ExecutorOptions& options,
                        const Checkpoint* checkpoint, const AgreeBlocks& agree) {
  rank.backend->bind_thread();
  if (auto st = load_weights(rank, config, checkpoint); !st.ok()) return st;
  const int64_t max_len = model_len(options, config);
  int64_t blocks = 0;
  bool graphs = false;
#ifdef SHARDSERVE_WITH_CUDA
  if (auto* gpu = dynamic_cast<CudaBackend*>(rank.backend.get())) {
    auto planned = plan_cuda_memory(rank, *gpu, options);
    if (!planned.ok()) return planned.status();
    blocks = *planned;
    graphs = options.cuda_graphs;
  }
#endif
  if (rank.backend->name() == "cpu") {
    auto cpu_blocks = kv_cache_blocks(options, rank.model->kv_bytes_per_token());
    if (!cpu_blocks.ok()) return cpu_blocks.status();
    blocks = *cpu_blocks;
  }
  blocks = agree(blocks);
  if (rank.backend->name() != "cpu" && blocks * options.block_size < max_len) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV cache holds ", blocks * options.block_size, " tokens, less than one sequence of max_model_len ",
        max_len, ": lower --max-model-len or --max-num-batched-tokens, or raise --gpu-memory-utilization"));
  }
  rank.runner = std::make_unique<ModelRunner>(*rank.model, *rank.backend, blocks, options.block_size,
                                              options.max_model_len, graphs);
  return absl::OkStatus();
}

}  // namespace shardserve
