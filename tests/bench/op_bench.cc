#include "tests/bench/op_bench.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <numeric>

#include "worker/runtime/cuda_backend.h"

namespace shardserve {
namespace {

// The median over 9 rounds of the mean time of 20 back-to-back calls: with one call between two
// events the GPU would wait for each launch, and a 10-20 us op would be timed with its host cost
// (the op records up to docs/benchmarks/engine-h200-2026-12-04-tc.jsonl were timed that way).
double median_ms(CudaBackend& gpu, const std::function<void()>& fn) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < 5; ++i) fn();
  constexpr int kCalls = 20;
  std::vector<float> ms;
  for (int i = 0; i < 9; ++i) {
    cudaEventRecord(start, gpu.stream());
    for (int j = 0; j < kCalls; ++j) fn();
    cudaEventRecord(stop, gpu.stream());
    cudaEventSynchronize(stop);
    float t = 0;
    cudaEventElapsedTime(&t, start, stop);
    ms.push_back(t / kCalls);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

std::vector<nlohmann::json> run_op_benchmarks(const ModelConfig& c, double bw, int context, const std::string& device) {
  auto made = CudaBackend::create(0, DType::kBF16);
  if (!made.ok()) return {};
  CudaBackend& gpu = **made;
  gpu.reserve_scratch(size_t{512} << 20);
  std::vector<nlohmann::json> records;
  // bytes: the fewest the op must move; flops: its multiply-adds x 2 (0 for pure data movement).
  auto report = [&](const std::string& op, int64_t tokens, double ms, double bytes, double flops = 0) {
    const double fraction = bytes / (ms * 1e-3) / bw;
    const double tflops = flops / (ms * 1e-3) / 1e12;
    std::printf("  %-30s T=%-4lld %9.1f us  %8.1f MB  bw fraction %.3f  %7.1f TFLOP/s\n", op.c_str(),
                static_cast<long long>(tokens), ms * 1e3, bytes / 1e6, fraction, tflops);
    records.push_back({{"bench", "op"}, {"op", op}, {"device", device}, {"quantization", "none"}, {"tp_size", 1},
                       {"batch", tokens}, {"context_len", context}, {"time_us", ms * 1e3}, {"bytes", bytes},
                       {"bandwidth_fraction", fraction}, {"tflops", tflops}});
  };
  const int64_t h = c.hidden_size, d = c.head_dim, hq = c.num_attention_heads, hkv = c.num_key_value_heads;
  const std::vector<int64_t> batches = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  struct Shape { const char* name; int64_t n, k; };
  const Shape shapes[] = {{"qkv_proj", (hq + 2 * hkv) * d, h}, {"o_proj", h, hq * d}, {"gate_up_proj", 2 * c.intermediate_size, h},
                          {"down_proj", h, c.intermediate_size}, {"lm_head (f32 out)", c.vocab_size, h}};
  for (const Shape& s : shapes) {
    Tensor w = gpu.empty({s.n, s.k}, DType::kBF16);
    gpu.fill_uniform(w, 1, 0.02f);
    for (int64_t t : batches) {
      Tensor x = gpu.empty({t, s.k}, DType::kBF16);
      gpu.fill_uniform(x, 2, 1.0f);
      const DType out_dtype = s.n == c.vocab_size ? DType::kF32 : DType::kBF16;
      Tensor y = gpu.empty({t, s.n}, out_dtype);
      const double bytes = double(s.n) * s.k * 2 + double(t) * (s.k * 2 + s.n * dtype_size(out_dtype));
      const double flops = 2.0 * double(s.n) * s.k * t;
      for (int64_t gemv_max : {int64_t{0}, int64_t{8}}) {
        if (gemv_max > 0 && t > gemv_max) continue;
        gpu.set_gemv_max_tokens(gemv_max);
        const double ms = median_ms(gpu, [&] { gpu.linear(x, LinearWeight{w}, y); });
        report(std::string(s.name) + (gemv_max ? " gemv" : " cublaslt"), t, ms, bytes, flops);
      }
    }
  }
  gpu.set_gemv_max_tokens(2);
  // Decode attention over `context` cached tokens per sequence.
  for (int64_t t : {int64_t{1}, int64_t{8}, int64_t{32}, int64_t{128}}) {
    const int64_t bs = 16, blocks_per_seq = (context + bs) / bs + 1;
    Tensor kc = gpu.empty({t * blocks_per_seq, bs, hkv, d}, DType::kBF16);
    Tensor vc = gpu.empty({t * blocks_per_seq, bs, hkv, d}, DType::kBF16);
    gpu.fill_uniform(kc, 3, 1.0f);
    gpu.fill_uniform(vc, 4, 1.0f);
    Tensor qkv = gpu.empty({t, (hq + 2 * hkv) * d}, DType::kBF16);
    gpu.fill_uniform(qkv, 5, 1.0f);
    std::vector<int32_t> host(static_cast<size_t>(t + 1 + t + t * blocks_per_seq));
    for (int64_t i = 0; i <= t; ++i) host[i] = static_cast<int32_t>(i);
    for (int64_t i = 0; i < t; ++i) host[t + 1 + i] = context + 1;
    std::iota(host.begin() + 2 * t + 1, host.end(), 0);
    Tensor meta_t = gpu.empty({static_cast<int64_t>(host.size())}, DType::kI32);
    gpu.copy_from_host(host.data(), meta_t);
    AttentionMetadata meta;
    meta.num_seqs = static_cast<int>(t);
    meta.max_query_len = 1;
    meta.query_start_loc = meta_t.rows(0, t + 1);
    meta.seq_lens = meta_t.rows(t + 1, 2 * t + 1);
    meta.block_tables = meta_t.rows(2 * t + 1, static_cast<int64_t>(host.size())).reshaped({t, blocks_per_seq});
    Tensor out = gpu.empty({t, hq * d}, DType::kBF16);
    KvLayer kv{kc, vc};
    const double ms = median_ms(gpu, [&] {
      gpu.begin_step();
      gpu.attention(qkv, hq, kv, meta, 0.088f, out);
    });
    report("attention decode ctx " + std::to_string(context), t, ms, double(t) * (context + 1) * hkv * d * 2 * 2,
           4.0 * double(t) * (context + 1) * hq * d);
  }
  // The small per-layer ops.
  for (int64_t t : {int64_t{1}, int64_t{128}}) {
    Tensor x = gpu.empty({t, h}, DType::kBF16), res = gpu.empty({t, h}, DType::kBF16), wn = gpu.empty({h}, DType::kBF16);
    Tensor y = gpu.empty({t, h}, DType::kBF16);
    gpu.fill_uniform(x, 6, 1.0f);
    gpu.fill_uniform(res, 7, 1.0f);
    gpu.fill_uniform(wn, 8, 1.0f);
    report("add_rmsnorm", t, median_ms(gpu, [&] { gpu.add_rmsnorm(x, res, wn, 1e-5f, y); }), 4.0 * t * h * 2);
    Tensor gu = gpu.empty({t, 2 * c.intermediate_size}, DType::kBF16), act = gpu.empty({t, c.intermediate_size}, DType::kBF16);
    gpu.fill_uniform(gu, 9, 1.0f);
    report("silu_mul", t, median_ms(gpu, [&] { gpu.silu_mul(gu, act); }), 3.0 * t * c.intermediate_size * 2);
  }
  // The sampler on [rows, vocab] FP32 logits: greedy, and temperature 1 with top-p 0.9.
  for (int64_t rows : {int64_t{1}, int64_t{32}, int64_t{128}}) {
    Tensor logits = gpu.empty({rows, c.vocab_size}, DType::kF32);
    gpu.fill_uniform(logits, 10, 8.0f);
    for (const double temperature : {0.0, 1.0}) {
      std::vector<SamplingRow> params(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) {
        params[r].temperature = temperature;
        params[r].top_p = temperature > 0 ? 0.9 : 1.0;
        params[r].seed = static_cast<uint64_t>(r);
      }
      SampledRows out;
      const double ms = median_ms(gpu, [&] { gpu.sample(logits, params, {}, out); });
      report(temperature > 0 ? "sample t=1 top_p=0.9" : "sample greedy", rows, ms, double(rows) * c.vocab_size * 4);
    }
  }
  return records;
}

std::vector<nlohmann::json> run_quant_op_benchmarks(const ModelConfig& c, double bw, const std::vector<int>& batches,
                                                    const std::string& device) {
  auto made = CudaBackend::create(0, DType::kBF16);
  if (!made.ok()) return {};
  CudaBackend& gpu = **made;
  gpu.reserve_scratch(size_t{256} << 20);
  std::vector<nlohmann::json> records;
  const int64_t h = c.hidden_size, d = c.head_dim, hq = c.num_attention_heads, hkv = c.num_key_value_heads;
  struct Shape { const char* name; int64_t n, k; };
  const Shape shapes[] = {{"qkv_proj", (hq + 2 * hkv) * d, h}, {"o_proj", h, hq * d},
                          {"gate_up_proj", 2 * c.intermediate_size, h}, {"down_proj", h, c.intermediate_size}};
  constexpr int64_t kGroup = 128;
  std::printf("quantized linear layers vs BF16 cuBLASLt:\n");
  for (const Shape& s : shapes) {
    Tensor dense = gpu.empty({s.n, s.k}, DType::kBF16);
    gpu.fill_uniform(dense, 1, 0.02f);
    for (const char* format : {"int4", "int8", "fp8"}) {
      LinearWeight w;
      const std::string f = format;
      if (f == "int4") {
        w.format = WeightFormat::kInt4;
        w.weight = gpu.empty({s.n, s.k / 8}, DType::kI32);
        const int64_t groups = s.k / kGroup;
        w.scales = gpu.empty({s.n, groups}, DType::kF16);
        w.zeros = gpu.empty({s.n, groups}, DType::kU8);
        gpu.fill_random_bits(w.scales, 3);
        gpu.fill_random_bits(w.zeros, 4);
        w.group_size = kGroup;
      } else {
        w.format = f == "int8" ? WeightFormat::kInt8 : WeightFormat::kFp8;
        w.weight = gpu.empty({s.n, s.k}, f == "int8" ? DType::kI8 : DType::kF8E4M3);
        w.scales = gpu.empty({s.n}, DType::kF32);
        gpu.fill_uniform(w.scales, 5, 0.01f);
      }
      gpu.fill_random_bits(w.weight, 2);
      gpu.prepare_linear(w);  // as a loaded model's layers are
      const double bytes = static_cast<double>(w.weight.nbytes() + w.scales.nbytes() + w.zeros.nbytes());
      for (int t : batches) {
        Tensor x = gpu.empty({t, s.k}, DType::kBF16);
        gpu.fill_uniform(x, 6, 1.0f);
        Tensor y = gpu.empty({t, s.n}, DType::kBF16);
        gpu.set_gemv_max_tokens(0);
        const double dense_ms = median_ms(gpu, [&] { gpu.linear(x, LinearWeight{dense}, y); });
        const double ms = median_ms(gpu, [&] {
          gpu.begin_step();
          gpu.linear(x, w, y);
        });
        const double fraction = bytes / (ms * 1e-3) / bw;
        std::printf("  %-5s %-13s T=%-4d %9.1f us (bf16 cublaslt %9.1f us, x%.2f)  %7.1f MB  bw fraction %.3f\n",
                    format, s.name, t, ms * 1e3, dense_ms * 1e3, dense_ms / ms, bytes / 1e6, fraction);
        records.push_back({{"bench", "quant_op"}, {"op", s.name}, {"device", device}, {"format", format},
                           {"quantization", format}, {"tp_size", 1}, {"batch", t}, {"time_us", ms * 1e3}, {"bf16_cublaslt_us", dense_ms * 1e3},
                           {"speedup_vs_bf16", dense_ms / ms}, {"bytes", bytes}, {"bandwidth_fraction", fraction}});
      }
    }
  }
  gpu.set_gemv_max_tokens(2);
  return records;
}

}  // namespace shardserve
