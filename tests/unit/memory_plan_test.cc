// The memory planner against hand arithmetic for Llama-3.1-70B, and the deployment guide's layouts
// (see docs/deploy.md). Every expected number is derived in a comment from the model's shape.
#include "worker/model/memory_plan.h"

#include <gtest/gtest.h>

#include <cmath>

#include "worker/model/presets.h"

namespace shardserve {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

ModelConfig llama70b() { return *preset_or_config("llama-3.1-70b"); }

MemoryPlan plan(const std::string& gpu, const std::string& quantization, int tp, int64_t max_model_len,
                int64_t max_num_batched_tokens = 2048, int64_t max_num_seqs = 256) {
  PlanOptions o;
  o.quantization = quantization;
  o.tp_size = tp;
  o.max_model_len = max_model_len;
  o.max_num_batched_tokens = max_num_batched_tokens;
  o.max_num_seqs = max_num_seqs;
  auto p = plan_memory(llama70b(), *gpu_spec(gpu), o);
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

TEST(MemoryPlan, KvBytesPerToken70B) {
  const ModelConfig c = llama70b();
  // 2 (K, V) x 80 layers x 8 KV heads x 128 x 2 B.
  EXPECT_EQ(kv_bytes_per_token(c, 1, DType::kBF16), 327680);
  EXPECT_EQ(kv_bytes_per_token(c, 1, DType::kF8E4M3), 163840);
  EXPECT_EQ(kv_bytes_per_token(c, 2, DType::kBF16), 163840);  // 4 KV heads per rank
  EXPECT_EQ(kv_bytes_per_token(c, 8, DType::kBF16), 40960);   // 1 per rank
  // tp 16 > 8 KV heads: each rank keeps one (replicated), no further saving.
  EXPECT_EQ(kv_bytes_per_token(c, 16, DType::kBF16), 40960);
}

TEST(MemoryPlan, Bf16WeightsAre141GB) {
  const MemoryPlan p = plan("h200", "none", 1, 4096);
  // 70,553,706,496 params x 2 B, + rope table 131072 x 128 x 4 B.
  EXPECT_EQ(p.weights.linear + p.weights.embedding + p.weights.lm_head + p.weights.norms, int64_t{141107412992});
  EXPECT_EQ(p.weights.linear_meta, 0);
  EXPECT_EQ(p.weights.rope_table, 64 * kMiB);
  EXPECT_EQ(p.kv_bytes_per_token, 327680);
}

TEST(MemoryPlan, TensorParallelHalvesShardedParts) {
  const MemoryPlan one = plan("h200", "none", 1, 4096);
  const MemoryPlan two = plan("h200", "none", 2, 4096);
  EXPECT_EQ(two.weights.linear * 2, one.weights.linear);
  EXPECT_EQ(two.weights.embedding * 2, one.weights.embedding);  // vocab-parallel: 64128 rows
  EXPECT_EQ(two.weights.lm_head * 2, one.weights.lm_head);
  EXPECT_EQ(two.weights.norms, one.weights.norms);  // replicated
  EXPECT_EQ(two.num_kv_heads_per_rank, 4);
  EXPECT_EQ(two.overhead_bytes - one.overhead_bytes, 256 * kMiB);  // NCCL
}

TEST(MemoryPlan, QuantizedWeights) {
  // AWQ: 68,451,041,280 linear params / 2 = 34,225,520,640 B; scales (FP16) and zero points (U8,
  // as the worker keeps them) per 128 inputs: 3 B x 68,451,041,280 / 128 = 1,604,321,280 B;
  // embedding + LM head + norms in BF16: 4,205,330,432 B.
  const MemoryPlan awq = plan("a100-80gb", "awq", 1, 4096);
  EXPECT_EQ(awq.weights.linear, int64_t{34225520640});
  EXPECT_EQ(awq.weights.linear_meta, int64_t{1604321280});
  EXPECT_EQ(awq.weights.embedding + awq.weights.lm_head + awq.weights.norms, int64_t{4205330432});
  // GPTQ adds g_idx: one int32 per input feature of each linear, 80 x (3 x 8192 + 28672) x 4 B.
  const MemoryPlan gptq = plan("a100-80gb", "gptq", 1, 4096);
  EXPECT_EQ(gptq.weights.linear_meta - awq.weights.linear_meta, int64_t{80} * (3 * 8192 + 28672) * 4);
  // FP8 / INT8: 1 B per linear param + an FP32 scale per output channel, 80 x (10240 + 8192 +
  // 57344 + 8192) x 4 B.
  const MemoryPlan fp8 = plan("h100-80gb", "fp8", 1, 4096);
  EXPECT_EQ(fp8.weights.linear, int64_t{68451041280});
  EXPECT_EQ(fp8.weights.linear_meta, int64_t{80} * (10240 + 8192 + 57344 + 8192) * 4);
}

TEST(MemoryPlan, ActivationArenaFollowsTheWorkersWarmup) {
  // The worst step: the 2048-token budget over min(max_num_seqs 256, 2048) sequences that all
  // sample, block tables 4096 / 16 = 256 wide. Its scratch, all aligned to 256 B:
  //   inputs 4 x (3 x 2048 + 257 + 256 + 256) = 27,652 -> 27,904, block tables 4 x 256 x 256 = 262,144
  //   embedding out, x, h: 3 x 2048 x 8192 x 2 = 100,663,296
  //   the layers' shared workspace: 2048 x (10240 + 8192 + 57344 + 28672) x 2 = 427,819,008
  //   the 256 sampled rows' hidden states 256 x 8192 x 2 = 4,194,304 and logits 256 x 128256 x 4
  const int64_t mixed = 27904 + 262144 + 100663296 + 427819008 + 4194304 + int64_t{256} * 128256 * 4;
  PlanOptions o;
  o.max_model_len = 4096;
  EXPECT_EQ(activation_arena_bytes(llama70b(), o, 132), mixed + mixed / 16 + 16 * kMiB);
  // The old warm-up's two shapes (the prefill sampling one row, the decode of 256 one-token
  // sequences) each need far less: a step mixing them is what exhausted its arena.
  EXPECT_GT(mixed, 290048 + 100663296 + 427819008 + 16384 + 513024 + 32 * kMiB);

  // Decode only (a 1-token budget): the graph buckets 1, 2, 4, 8, 16 decide. At 16 sequences
  // attention splits in 2 (2 x 132 SMs / (16 x 8 KV heads)); its FP32 partials, 16 x 64 x 2 x 130
  // x 4 B = 1,064,960, are released after each layer's attention, before the sampled rows' hidden
  // states and logits (8,470,528 B) are allocated: the larger of the two counts.
  o.max_num_batched_tokens = 1;
  o.max_num_seqs = 16;
  const WarmupShapes w = warmup_shapes(1, 16, 4096, 16);
  EXPECT_EQ(w.decode_buckets, (std::vector<int64_t>{1, 2, 4, 8, 16}));
  EXPECT_EQ(w.mixed_seqs, 1);
  //   inputs 4 x (3 x 16 + 17 + 16 + 16) = 388 -> 512 aligned, block tables 4 x 16 x 256 = 16,384;
  //   every other term is a multiple of 256.
  const int64_t decode = 512 + 16384 + 3 * 16 * 8192 * 2 + 16 * (10240 + 8192 + 57344 + 28672) * 2 +
                         std::max<int64_t>(16 * 64 * 2 * 130 * 4, 16 * 8192 * 2 + 16 * 128256 * 4);
  EXPECT_EQ(activation_arena_bytes(llama70b(), o, 132), decode + decode / 16 + 16 * kMiB);
}

TEST(MemoryPlan, WarmupShapesCoverTheSchedulersLimits) {
  const WarmupShapes w = warmup_shapes(2048, 300, 8192, 16);
  EXPECT_EQ(w.mixed_tokens, 2048);
  EXPECT_EQ(w.mixed_seqs, 300);  // more sequences than graph buckets: the mixed step has them all
  EXPECT_EQ(w.width, 512);
  ASSERT_FALSE(w.decode_buckets.empty());
  EXPECT_EQ(w.decode_buckets.back(), 256);
  EXPECT_EQ(w.num_blocks, (2048 - 299 + 15) / 16);
  // A budget past max_model_len is cut to it; buckets round the largest batch up.
  const WarmupShapes small = warmup_shapes(4096, 20, 1000, 16);
  EXPECT_EQ(small.mixed_tokens, 1000);
  EXPECT_EQ(small.decode_buckets, (std::vector<int64_t>{1, 2, 4, 8, 16, 32}));
  EXPECT_EQ(decode_graph_bucket(17), 32);
  EXPECT_EQ(decode_graph_bucket(5), 8);
}

// The guide's layouts, as the planner sees them (docs/deploy.md has the full table).
TEST(MemoryPlan, Bf16On80GBDoesNotFit) {
  const MemoryPlan p = plan("h100-80gb", "none", 1, 4096);
  EXPECT_FALSE(p.fits);
  EXPECT_EQ(p.kv_capacity_tokens, 0);
  EXPECT_NE(p.reason.find("exceed"), std::string::npos) << p.reason;
}

TEST(MemoryPlan, AwqOn80GBAt4kFits) {
  // 0.9 x 79.15 GiB - 37.3 GiB weights - 0.54 GiB activations - 0.53 GiB overhead: ~32.9 GiB of
  // KV cache, ~107,000 tokens, 26 sequences of 4096 (the guide: "37 GB", "3,700 tokens").
  const MemoryPlan p = plan("a100-80gb", "awq", 1, 4096);
  EXPECT_TRUE(p.fits) << p.reason;
  EXPECT_GT(p.kv_capacity_tokens, 100000);
  EXPECT_EQ(p.max_concurrent_seqs, p.kv_capacity_tokens / 4096);
  EXPECT_GE(p.max_concurrent_seqs, 25);
  EXPECT_EQ(p.kv_capacity_tokens % 16, 0);  // whole blocks
}

TEST(MemoryPlan, Bf16OverTwoH200Fits8k) {
  const MemoryPlan p = plan("h200", "none", 2, 8192);
  EXPECT_TRUE(p.fits) << p.reason;
  EXPECT_GT(p.max_concurrent_seqs, 30);
}

TEST(MemoryPlan, Fp8On80GBIsTight) {
  // 0.9 x 79.10 GiB leaves 3.4 GiB beside 67.75 GiB of FP8 weights (16-bit embedding and head),
  // ~2.4 GiB after activations and overhead: ~7,700 tokens, not one sequence of 8192.
  const MemoryPlan short_context = plan("h100-80gb", "fp8", 1, 2048);
  EXPECT_TRUE(short_context.fits) << short_context.reason;
  EXPECT_LE(short_context.max_concurrent_seqs, 4);
  EXPECT_FALSE(plan("h100-80gb", "fp8", 1, 8192).fits);
}

TEST(MemoryPlan, RejectsBadLayouts) {
  EXPECT_FALSE(plan_memory(llama70b(), *gpu_spec("h200"), PlanOptions{.quantization = "int3"}).ok());
  EXPECT_FALSE(plan_memory(llama70b(), *gpu_spec("h200"), PlanOptions{.tp_size = 3}).ok());
  EXPECT_FALSE(plan_memory(llama70b(), *gpu_spec("h200"), PlanOptions{.gpu_memory_utilization = 1.5}).ok());
  EXPECT_FALSE(plan_memory(llama70b(), *gpu_spec("h200"), PlanOptions{.kv_cache_dtype = "int4"}).ok());
}

TEST(MemoryPlan, GpuSpecs) {
  EXPECT_EQ(gpu_spec("h200")->total_bytes, std::llround(139.8 * (1 << 30)));
  EXPECT_EQ(gpu_spec("a100-80gb")->num_sms, 108);
  EXPECT_EQ(gpu_spec("24")->total_bytes, int64_t{24} << 30);
  EXPECT_FALSE(gpu_spec("v100").ok());
  EXPECT_FALSE(gpu_spec("-3").ok());
}

}  // namespace
}  // namespace shardserve
