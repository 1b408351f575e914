#include "worker/model/memory_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/runtime/attention_splits.h"

namespace shardserve {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// What cudaMemGetInfo counts as used before any of our allocations, plus the allocations the
// worker makes outside its weights and arena: a CUDA 12 context with lazy module loading takes
// ~500 MiB (context, module images, cuBLASLt handle); cuBLASLt's workspace is 32 MiB, with the
// decode attention's 256 KiB of split counters (worker/runtime/cuda_backend.cc). NCCL's buffers
// for a TP group add ~256 MiB per rank (default NCCL_BUFFSIZE 4 MiB x channels x peers, plus its
// own context use; the one-shot all-reduce's 1 MiB of staging, worker/runtime/custom_all_reduce.h,
// is inside that estimate). An estimate: the worker prints the real figure next to it.
constexpr int64_t kCudaContextBytes = 512 * kMiB;
constexpr int64_t kGemmWorkspaceBytes = 32 * kMiB + 256 * 1024;
constexpr int64_t kNcclBytes = 256 * kMiB;

// The CUDA backend's scratch arena aligns every allocation to 256 bytes (cuda_backend.cc kAlign).
constexpr int64_t kScratchAlign = 256;
int64_t aligned(int64_t n) { return (std::max<int64_t>(n, 1) + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One rank's share of the model's dimensions (worker/model/llama.cc shards them this way).
struct RankShape {
  int64_t hidden, head_dim, layers, vocab, vocab_local;
  int64_t q_heads, kv_heads;  // per rank
  int64_t qkv_rows;           // q_heads x head_dim + 2 x kv_heads x head_dim
  int64_t ffn;                // intermediate_size / tp
  int tp;
};

RankShape rank_shape(const ModelConfig& c, int tp) {
  RankShape s{};
  s.hidden = c.hidden_size;
  s.head_dim = c.head_dim;
  s.layers = c.num_hidden_layers;
  s.vocab = c.vocab_size;
  s.vocab_local = c.vocab_size / tp;  // the worker's vocab shard: vocab_size / world
  s.q_heads = c.num_attention_heads / tp;
  // tp <= KV heads: split them; tp > KV heads: each rank keeps the one its query heads read.
  s.kv_heads = tp <= c.num_key_value_heads ? c.num_key_value_heads / tp : 1;
  s.qkv_rows = (s.q_heads + 2 * s.kv_heads) * s.head_dim;
  s.ffn = c.intermediate_size / tp;
  s.tp = tp;
  return s;
}

// Bytes of one linear layer holding N output rows x K input features on this rank, as the worker
// stores it (LinearWeight, worker/runtime/backend.h):
//   none: N K x 2 B (16-bit, the activation dtype).
//   fp8 (W8A8) and int8 (weight-only): N K x 1 B + one FP32 scale per output channel (N x 4 B);
//     a per-tensor scale is expanded to every channel. FP8's static input_scale is one float,
//     not counted.
//   awq / gptq (INT4): weight N K / 2 B (I32 words of 8); per group of `g` input features and
//     output channel an FP16 scale (2 B) and a U8 zero point (1 B): ceil(K / g) x N x 3 B.
//   gptq adds g_idx, one int32 per input feature, which act-order checkpoints keep (counted
//     always: the planner does not know whether the checkpoint uses act-order).
// Returns {weight bytes, metadata bytes}.
std::pair<int64_t, int64_t> linear_bytes(const std::string& q, int64_t n, int64_t k, int64_t act_bytes, int64_t g) {
  if (q == "none") return {n * k * act_bytes, 0};
  if (q == "fp8" || q == "int8") return {n * k, n * 4};
  const int64_t groups = ceil_div(k, g);
  const int64_t meta = groups * n * (2 + 1) + (q == "gptq" ? k * 4 : 0);
  return {n * k / 2, meta};
}

// Weights on one rank, the way worker/model/llama.cc loads them. Llama-3.1-70B, tp 1, BF16:
//   per layer: qkv 10240 x 8192 = 83,886,080; o 8192 x 8192 = 67,108,864;
//              gate/up 57344 x 8192 = 469,762,048; down 8192 x 28672 = 234,881,024
//              -> 855,638,016 params; x 80 layers = 68,451,041,280 linear params
//   embedding and LM head: 128256 x 8192 = 1,050,673,152 params each
//   norms: (2 x 80 + 1) x 8192 = 1,318,912 params
//   -> 70,553,706,496 params x 2 B = 141,107,412,992 B (131.4 GiB), + the rope table
//      131072 x 128 x 4 B = 64 MiB.
// AWQ: 68,451,041,280 / 2 = 34,225,520,640 B + meta 3 B per 128 params = 1,604,321,280 B,
//   + 16-bit embedding/head/norms 4,205,330,432 B -> 40,035,172,352 B (37.29 GiB) + rope.
WeightBytes weight_bytes(const ModelConfig& c, const RankShape& s, const PlanOptions& o) {
  const auto act = static_cast<int64_t>(dtype_size(o.activation_dtype));
  WeightBytes w;
  auto add = [&](int64_t n, int64_t k) {
    const auto [bytes, meta] = linear_bytes(o.quantization, n, k, act, o.group_size);
    w.linear += bytes * s.layers;
    w.linear_meta += meta * s.layers;
  };
  add(s.qkv_rows, s.hidden);                          // column-parallel: q, k, v rows of this rank
  add(s.hidden, s.q_heads * s.head_dim);              // o_proj, row-parallel: its columns
  add(2 * s.ffn, s.hidden);                           // gate/up, column-parallel
  add(s.hidden, s.ffn);                               // down, row-parallel
  w.embedding = s.vocab_local * s.hidden * act;       // vocab-parallel rows
  w.lm_head = s.vocab_local * s.hidden * act;         // column-parallel over the vocab
  w.norms = (2 * s.layers + 1) * s.hidden * act;      // input/post-attention per layer + final
  w.rope_table = c.max_position_embeddings * c.head_dim * 4;
  return w;
}

// The scratch one step allocates from the arena, which is rewound only between steps
// (llama.cc forward, model_runner.cc execute, cuda_backend.cc attention), in order:
//   inputs: one int32 buffer (ids, positions, slots: 3 T; query_start_loc rows + 1; seq_lens rows;
//           logits_indices S), then the block tables rows x width
//   embedding output, x, h: 3 x T x hidden
//   the layers' shared workspace, once: qkv T x qkv_rows, attention out T x q_heads x head_dim,
//           gate/up T x 2 ffn, silu-mul T x ffn
//   decode only: split-attention partials (released after each layer's attention, before what
//           follows is allocated: the peak holds them or the sampled rows, whichever is larger)
//   logits: last hidden rows S x hidden, LM head S x vocab_local x FP32, and for tp > 1 the
//           gathered tp x S x vocab_local and joined S x vocab FP32 logits.
// Llama-3.1-70B, tp 1, BF16, T = 2048 prefill tokens: the workspace is 2048 x (10240 + 8192 +
//   57344 + 28672) x 2 B = 427,819,008 B; embedding/x/h 100,663,296 B; with inputs and logits
//   529,037,056 B; the arena 578,879,088 B (0.54 GiB).
int64_t step_scratch_bytes(const RankShape& s, int64_t act, int64_t tokens, int64_t rows, int64_t sampled,
                           int64_t width, bool decode, int num_sms) {
  int64_t b = aligned(4 * (3 * tokens + (rows + 1) + rows + sampled)) + aligned(4 * rows * width);
  b += 3 * aligned(tokens * s.hidden * act);
  b += aligned(tokens * s.qkv_rows * act) + aligned(tokens * s.q_heads * s.head_dim * act) +
       aligned(tokens * 2 * s.ffn * act) + aligned(tokens * s.ffn * act);
  // The sampled rows: hidden states, logits (and for tp > 1 the gathered and joined logits).
  int64_t tail = aligned(sampled * s.hidden * act) + aligned(sampled * s.vocab_local * 4);
  if (s.tp > 1) tail += aligned(s.tp * sampled * s.vocab_local * 4) + aligned(sampled * s.vocab * 4);
  // Decode only: split-attention partials, FP32 tokens x q_heads x splits x (head_dim + 2)
  // (kernels/attention.cu attention_workspace_bytes; splits: worker/runtime/attention_splits.h).
  // Released after each layer's attention, before the sampled rows are allocated: the peak is
  // whichever of the two is larger.
  int64_t partials = 0;
  if (decode) {
    const int64_t splits = decode_attention_splits(tokens, s.kv_heads, num_sms);
    if (splits > 1) partials = aligned(4 * tokens * s.q_heads * splits * (s.head_dim + 2));
  }
  return b + std::max(partials, tail);
}

absl::StatusOr<DType> resolve_kv_dtype(const std::string& name, DType activation) {
  if (name == "auto") return activation;
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float16") return DType::kF16;
  if (name == "float32") return DType::kF32;
  if (name == "fp8") return DType::kF8E4M3;
  return absl::InvalidArgumentError(
      absl::StrCat("kv_cache_dtype '", name, "' is not one of auto, bfloat16, float16, float32, fp8"));
}

std::string dtype_word(DType d) {
  switch (d) {
    case DType::kBF16: return "bfloat16";
    case DType::kF16: return "float16";
    case DType::kF32: return "float32";
    case DType::kF8E4M3: return "fp8";
    default: return std::string(dtype_name(d));
  }
}

std::string gib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f GiB", static_cast<double>(bytes) / kGiB);
  return text;
}

}  // namespace

std::vector<std::string> gpu_names() { return {"a100-80gb", "h100-80gb", "h200"}; }

absl::StatusOr<GpuSpec> gpu_spec(const std::string& name_or_gib) {
  auto of_gib = [](double g) { return static_cast<int64_t>(std::llround(g * kGiB)); };
  // cudaMemGetInfo totals: A100-SXM4-80GB 79.15 GiB and H100-SXM5-80GB (HBM3) 79.10 GiB, the
  // "total capacity" their out-of-memory messages print; H200 139.8 GiB as measured on our H200
  // machine (141 GB nominal). SM counts: 108, 132, 132.
  if (name_or_gib == "a100-80gb") return GpuSpec{"a100-80gb", of_gib(79.15), 108};
  if (name_or_gib == "h100-80gb") return GpuSpec{"h100-80gb", of_gib(79.10), 132};
  if (name_or_gib == "h200") return GpuSpec{"h200", of_gib(139.8), 132};
  double g = 0;
  if (absl::SimpleAtod(name_or_gib, &g) && g > 0 && g < 1e6) {
    return GpuSpec{absl::StrCat(name_or_gib, "GiB"), of_gib(g), 132};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("gpu '", name_or_gib, "' is not one of a100-80gb, h100-80gb, h200 or a size in GiB"));
}

int64_t kv_bytes_per_token(const ModelConfig& config, int tp_size, DType kv_dtype) {
  // Llama-3.1-70B, BF16, tp 1: 2 x 80 x 8 x 128 x 2 B = 327,680 B (0.3125 MiB); tp 2: 163,840 B.
  const RankShape s = rank_shape(config, tp_size);
  return 2 * s.layers * s.kv_heads * s.head_dim * static_cast<int64_t>(dtype_size(kv_dtype));
}

int64_t decode_graph_bucket(int64_t n) {
  if (n <= 8) {
    int64_t b = 1;
    while (b < n) b *= 2;
    return b;
  }
  return (n + 15) / 16 * 16;
}

WarmupShapes warmup_shapes(int64_t max_num_batched_tokens, int64_t max_num_seqs, int64_t max_model_len,
                           int64_t block_size) {
  WarmupShapes w;
  w.mixed_tokens = std::max<int64_t>(1, std::min(max_num_batched_tokens, max_model_len));
  w.mixed_seqs = std::max<int64_t>(1, std::min(max_num_seqs, w.mixed_tokens));
  w.width = ceil_div(max_model_len, block_size);
  const int64_t largest = decode_graph_bucket(std::max<int64_t>(1, std::min(max_num_seqs, kMaxGraphBatch)));
  for (int64_t b = 1; b <= largest; b = decode_graph_bucket(b + 1)) w.decode_buckets.push_back(b);
  w.num_blocks = std::max<int64_t>(1, ceil_div(w.mixed_tokens - (w.mixed_seqs - 1), block_size));
  return w;
}

int64_t activation_arena_bytes(const ModelConfig& config, const PlanOptions& o, int num_sms) {
  const RankShape s = rank_shape(config, o.tp_size);
  const auto act = static_cast<int64_t>(dtype_size(o.activation_dtype));
  const int64_t max_len =
      o.max_model_len > 0 ? std::min(o.max_model_len, config.max_position_embeddings) : config.max_position_embeddings;
  // The worker's warm-up (worker/engine/rank.cc): the whole token budget over the most sequences,
  // all sampling, at the widest block tables; and every decode graph bucket. No graphs, so no
  // padding beyond the buckets themselves.
  const WarmupShapes w = warmup_shapes(o.max_num_batched_tokens, o.max_num_seqs, max_len, o.block_size);
  int64_t peak = step_scratch_bytes(s, act, w.mixed_tokens, w.mixed_seqs, w.mixed_seqs, w.width,
                                    w.mixed_tokens == w.mixed_seqs, num_sms);
  for (int64_t b : w.decode_buckets) peak = std::max(peak, step_scratch_bytes(s, act, b, b, b, w.width, true, num_sms));
  // The arena reserved: the measured peak + 1/16 + 16 MiB of slack.
  return peak + peak / 16 + 16 * kMiB;
}

absl::StatusOr<MemoryPlan> plan_memory(const ModelConfig& config, const GpuSpec& gpu, const PlanOptions& o) {
  static const char* const kQuant[] = {"none", "fp8", "int8", "awq", "gptq"};
  if (std::find(std::begin(kQuant), std::end(kQuant), o.quantization) == std::end(kQuant)) {
    return absl::InvalidArgumentError(
        absl::StrCat("quantization '", o.quantization, "' is not one of none, fp8, int8, awq, gptq"));
  }
  const int64_t kv_heads = config.num_key_value_heads;
  if (o.tp_size < 1 || config.num_attention_heads % o.tp_size != 0 || config.intermediate_size % o.tp_size != 0 ||
      (o.tp_size <= kv_heads ? kv_heads % o.tp_size != 0 : o.tp_size % kv_heads != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("tp_size ", o.tp_size, " does not divide the model's ",
                                                   config.num_attention_heads, " heads, ", kv_heads,
                                                   " KV heads and FFN of ", config.intermediate_size));
  }
  if (!(o.gpu_memory_utilization > 0.0 && o.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError("gpu_memory_utilization must be in (0, 1]");
  }
  if (o.block_size < 1 || o.max_num_batched_tokens < 1 || o.max_num_seqs < 1 || o.group_size < 1) {
    return absl::InvalidArgumentError("block_size, max_num_batched_tokens, max_num_seqs and group_size must be positive");
  }
  auto kv_dtype = resolve_kv_dtype(o.kv_cache_dtype, o.activation_dtype);
  if (!kv_dtype.ok()) return kv_dtype.status();

  const RankShape s = rank_shape(config, o.tp_size);
  MemoryPlan p;
  p.gpu = gpu.name;
  p.gpu_total_bytes = gpu.total_bytes;
  p.quantization = o.quantization;
  p.tp_size = o.tp_size;
  p.gpu_memory_utilization = o.gpu_memory_utilization;
  p.max_model_len =
      o.max_model_len > 0 ? std::min(o.max_model_len, config.max_position_embeddings) : config.max_position_embeddings;
  p.block_size = o.block_size;
  p.num_kv_heads_per_rank = s.kv_heads;
  p.kv_cache_dtype = dtype_word(*kv_dtype);

  p.budget_bytes = static_cast<int64_t>(o.gpu_memory_utilization * static_cast<double>(gpu.total_bytes));
  p.weights = weight_bytes(config, s, o);
  p.weights_bytes_per_gpu = p.weights.total();
  p.activation_bytes = activation_arena_bytes(config, o, gpu.num_sms);
  p.overhead_bytes = kCudaContextBytes + kGemmWorkspaceBytes + (o.tp_size > 1 ? kNcclBytes : 0);
  p.kv_bytes_per_token = kv_bytes_per_token(config, o.tp_size, *kv_dtype);

  // KV capacity: what the budget leaves, in whole blocks (the worker allocates blocks).
  const int64_t left = p.budget_bytes - p.weights_bytes_per_gpu - p.activation_bytes - p.overhead_bytes;
  const int64_t block_bytes = p.kv_bytes_per_token * o.block_size;
  const int64_t blocks = left > 0 ? left / block_bytes : 0;
  p.kv_cache_bytes = blocks * block_bytes;
  p.kv_capacity_tokens = blocks * o.block_size;
  p.max_concurrent_seqs = p.kv_capacity_tokens / p.max_model_len;

  if (left <= 0) {
    p.reason = absl::StrCat("weights ", gib(p.weights_bytes_per_gpu), " + activations ", gib(p.activation_bytes),
                            " + overhead ", gib(p.overhead_bytes), " exceed ", o.gpu_memory_utilization, " x ",
                            gib(gpu.total_bytes), " = ", gib(p.budget_bytes));
  } else if (p.kv_capacity_tokens < p.max_model_len) {
    p.reason = absl::StrCat("the KV cache (", gib(p.kv_cache_bytes), ") holds ", p.kv_capacity_tokens,
                            " tokens, less than one sequence of max_model_len ", p.max_model_len);
  } else {
    p.fits = true;
    p.reason = absl::StrCat("KV cache ", gib(p.kv_cache_bytes), ": ", p.kv_capacity_tokens, " tokens, ",
                            p.max_concurrent_seqs, " sequences of ", p.max_model_len);
  }
  return p;
}

}  // namespace shardserve
