// Engine benchmark on one GPU, or N with tensor parallelism (--tp-size): decode tokens/s at
// several batch sizes and prefill tokens/s for a 2,048-token prompt, on a synthetic model (random
// weights made on the device, no files). Each step is what the served engine runs: the forward
// pass (a CUDA graph for decode) and greedy sampling on the device, token ids copied back. With N GPUs the bytes are per GPU (each reads its shard)
// and the step's collectives are also timed alone, through the path the engine takes at each
// size (collective_ms_per_step; tests/bench/collective_timing.h).
// Every figure is set against the device's copy bandwidth measured in the same run:
//   bandwidth_fraction = (weight bytes + KV bytes read per step) / step time / copy bandwidth
// where copy bandwidth = (bytes read + bytes written) / time of a 1 GiB device-to-device copy.
// Writes one JSON record per measurement (keys shared by every benchmark of the project).
//   engine_bench [--model llama-3.1-8b] [--batches 1,8,32,128] [--context 512] [--out FILE]
//                [--quantization none|awq|gptq|int8|fp8] [--quant-micro] [--micro] [--tp-size N]
//                [--profile-step]
// --profile-step brackets the first timed prefill and decode step of each batch size with cudaProfilerStart /
// cudaProfilerStop, for a profiler started with collection off (ncu --profile-from-start off): the
// step's kernels, graph nodes included, without the load, tuning and warm-up around them.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "kernels/kernels.h"
#include "tests/bench/collective_timing.h"
#include "tests/bench/gpu_timing.h"
#include "tests/bench/op_bench.h"
#include "worker/engine/executor.h"
#include "worker/model/presets.h"

namespace {

using shardserve::Batch;
using shardserve::ModelConfig;
using Clock = std::chrono::steady_clock;

// Bytes of weights one decode step reads: every projection (in its stored format: INT4 words plus
// an F16 scale and a U8 zero point per group of `group_size`, INT8/FP8 bytes plus an F32 scale per
// row), the 16-bit norms and LM head (the embedding only for the B looked-up rows, negligible).
double weight_bytes_per_step(const ModelConfig& c, const std::string& quantization, int64_t group_size) {
  const double h = c.hidden_size, d = c.head_dim;
  const double attn = h * (c.num_attention_heads * d) * 2 + h * (c.num_key_value_heads * d) * 2;
  const double ffn = 3.0 * h * c.intermediate_size;
  const double rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * d + h + 2.0 * c.intermediate_size + h;
  double linear = (attn + ffn) * 2.0;
  if (quantization == "awq" || quantization == "gptq") {
    linear = (attn + ffn) * (0.5 + 3.0 / static_cast<double>(group_size));
  } else if (quantization == "int8" || quantization == "fp8") {
    linear = (attn + ffn) + rows * 4.0;
  }
  return c.num_hidden_layers * (linear + 2 * h * 2.0) + (h + c.vocab_size * h) * 2.0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardserve engine benchmark (one GPU, synthetic weights)"};
  std::string model = "llama-3.1-8b";
  std::vector<int> batches = {1, 8, 32, 128};
  int context = 512;
  int prefill_len = 2048;
  int steps = 50;
  std::string out_path;
  bool micro = false;
  app.add_option("--model", model, "synthetic preset");
  app.add_option("--batches", batches, "decode batch sizes")->delimiter(',');
  app.add_option("--context", context, "tokens already in each sequence's cache when decoding");
  app.add_option("--prefill", prefill_len, "prompt length for the prefill measurement");
  app.add_option("--steps", steps, "decode steps timed per batch size");
  app.add_option("--out", out_path, "append JSON records here");
  app.add_flag("--micro", micro, "also time single ops at the model's decode shapes");
  int tp_size = 1;
  app.add_option("--tp-size", tp_size, "tensor-parallel GPUs (0 .. N-1 of this machine)");
  std::string quantization = "none";
  app.add_option("--quantization", quantization, "synthetic weights stored as none, awq, gptq (INT4, group 128), int8 or fp8")
      ->check(CLI::IsMember({"none", "awq", "gptq", "int8", "fp8"}));
  bool quant_micro = false;
  app.add_flag("--quant-micro", quant_micro, "time the INT4/INT8/FP8 linear layers against BF16 cuBLASLt per batch");
  bool profile_step = false;
  app.add_flag("--profile-step", profile_step, "bracket the first timed prefill and decode step of each batch for a profiler");
  CLI11_PARSE(app, argc, argv);

  const double bw = shardserve::harness::copy_bandwidth();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device %s, copy bandwidth %.0f GB/s\n", prop.name, bw / 1e9);

  std::vector<nlohmann::json> op_records;
  if (micro) {
    auto preset = shardserve::preset_or_config(model);
    if (!preset.ok()) {
      std::cerr << "error: " << preset.status() << "\n";
      return 1;
    }
    std::printf("ops at %s decode shapes:\n", model.c_str());
    op_records = shardserve::run_op_benchmarks(*preset, bw, context, prop.name);
  }
  if (quant_micro) {
    auto preset = shardserve::preset_or_config(model);
    if (!preset.ok()) {
      std::cerr << "error: " << preset.status() << "\n";
      return 1;
    }
    auto quant = shardserve::run_quant_op_benchmarks(*preset, bw, {1, 2, 4, 8, 16, 32, 64, 128}, prop.name);
    op_records.insert(op_records.end(), quant.begin(), quant.end());
  }
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  shardserve::ExecutorOptions options;
  options.backend = "cuda";
  options.synthetic = model;
  options.max_num_batched_tokens = std::max(prefill_len, max_batch);
  options.max_num_seqs = max_batch;
  options.max_model_len = std::max(context + steps + 8, prefill_len) + 16;
  options.gpu_memory_utilization = 0.90;
  options.tp_size = tp_size;
  options.quantization = quantization == "none" ? "" : quantization;
  // The collectives a decode step of B sequences makes, timed alone: one all-reduce of [B, hidden]
  // BF16 after the embedding and after each layer's o_proj and down_proj, one all-gather of the
  // [B, vocab / N] FP32 logits.
  std::map<int, double> collective_ms;
  if (tp_size > 1) {
    auto preset = shardserve::preset_or_config(model);
    if (!preset.ok()) {
      std::cerr << "error: " << preset.status() << "\n";
      return 1;
    }
    // Through the path the engine takes at each size (the one-shot kernel up to its capacity).
    auto capacity = shardserve::CustomAllReduce::configured_capacity();
    if (!capacity.ok()) {
      std::cerr << "error: " << capacity.status() << "\n";
      return 1;
    }
    std::vector<int> devices(static_cast<size_t>(tp_size));
    std::iota(devices.begin(), devices.end(), 0);
    shardserve::bench::CollectiveTimer timer(devices, *capacity);
    using Path = shardserve::bench::CollectiveTimer::Path;
    for (int batch : batches) {
      const size_t reduce_bytes = static_cast<size_t>(batch) * preset->hidden_size * 2;
      const size_t gather_bytes = static_cast<size_t>(batch) * preset->vocab_size / tp_size * 4;
      const double ar = timer.all_reduce_seconds(reduce_bytes, Path::kEngine);
      const double ag = timer.all_gather_seconds(gather_bytes);
      collective_ms[batch] = ((2 * preset->num_hidden_layers + 1) * ar + ag) * 1e3;
      const bool one_shot = timer.has_one_shot() && reduce_bytes <= timer.one_shot_capacity();
      std::printf("batch %3d: all-reduce of %zu bytes %.1f us (%s), all-gather of %zu bytes %.1f us, %.3f ms per step\n",
                  batch, reduce_bytes, ar * 1e6, one_shot ? "one-shot" : "NCCL", gather_bytes, ag * 1e6,
                  collective_ms[batch]);
    }
  }
  auto loaded = shardserve::load_model(options);
  if (!loaded.ok()) {
    std::cerr << "error: " << loaded.status() << "\n";
    return 1;
  }
  shardserve::StepExecutor& exec = *loaded->executor;
  const ModelConfig& cfg = loaded->config;
  const int64_t bs = exec.block_size();
  // Per GPU: each rank reads its shard of the weights and of the KV heads (heads replicated when
  // tp_size exceeds them).
  const int64_t kv_heads_per_gpu = std::max<int64_t>(1, cfg.num_key_value_heads / tp_size);
  const double kv_per_token = 2.0 * cfg.num_hidden_layers * kv_heads_per_gpu * cfg.head_dim * 2;
  const int64_t group_size = cfg.quantization.group_size > 0 ? cfg.quantization.group_size : cfg.hidden_size;
  const double weights = weight_bytes_per_step(cfg, quantization, group_size) / tp_size;
  std::vector<nlohmann::json> records;
  const std::string prefill_attention = shardserve::kernels::prefill_attention_kernel(
      shardserve::DType::kBF16, cfg.head_dim, cfg.num_attention_heads / cfg.num_key_value_heads);
  auto record = [&](const std::string& bench, int batch, double tokens_per_s, double fraction, double step_ms) {
    nlohmann::json r = {{"bench", bench}, {"device", prop.name}, {"model", model}, {"quantization", quantization},
                        {"dtype", "bfloat16"}, {"tp_size", tp_size}, {"batch", batch}, {"tokens_per_s", tokens_per_s},
                        {"bandwidth_fraction", fraction}, {"step_ms", step_ms}, {"context_len", context},
                        {"copy_bandwidth_gbps", bw / 1e9}, {"date", shardserve::harness::record_date()},
                        {"prefill_attention", prefill_attention}};
    if (tp_size > 1 && bench == "decode") {
      r["collective_ms_per_step"] = collective_ms[batch];
      r["collective_share"] = collective_ms[batch] / step_ms;
    }
    records.push_back(r);
  };

  // Sequence i owns blocks [i * per_seq, (i + 1) * per_seq).
  const int64_t per_seq = (options.max_model_len + bs - 1) / bs;
  auto table = [&](int i) {
    std::vector<int32_t> t(per_seq);
    std::iota(t.begin(), t.end(), static_cast<int32_t>(i * per_seq));
    return t;
  };
  if (max_batch * per_seq > exec.num_blocks()) {
    std::cerr << "error: the KV cache holds " << exec.num_blocks() << " blocks; the benchmark needs " << max_batch * per_seq << "\n";
    return 1;
  }

  // Every step samples on the device, greedy, as the served engine does (only token ids come back).
  std::vector<shardserve::Sequence> greedy(static_cast<size_t>(std::max(max_batch, 1)));
  std::vector<const shardserve::Sequence*> greedy_ptrs;
  for (auto& s : greedy) {
    s.tokens = {1};
    s.num_prompt_tokens = 1;
    s.params.temperature = 0.0;
    greedy_ptrs.push_back(&s);
  }
  auto sampled = [&](int n) { return std::vector<const shardserve::Sequence*>(greedy_ptrs.begin(), greedy_ptrs.begin() + n); };

  // Prefill: one 2,048-token prompt.
  {
    Batch b;
    b.seqs.push_back({std::vector<int32_t>(prefill_len, 1000), 0, table(0), true});
    exec.execute_and_sample(b, sampled(1));
    const auto t0 = Clock::now();
    const int reps = 5;
    for (int r = 0; r < reps; ++r) {
      if (profile_step && r == 0) cudaProfilerStart();
      exec.execute_and_sample(b, sampled(1));
      if (profile_step && r == 0) cudaProfilerStop();
    }
    const double s = std::chrono::duration<double>(Clock::now() - t0).count() / reps;
    std::printf("prefill %d tokens: %.1f ms, %.0f tokens/s\n", prefill_len, s * 1e3, prefill_len / s);
    record("prefill", 1, prefill_len / s, weights / s / bw, s * 1e3);
    records.back()["prompt_len"] = prefill_len;
    records.back()["context_len"] = 0;
  }

  for (int batch : batches) {
    // Fill each sequence's cache to `context` tokens in steps of at most max_num_batched_tokens
    // (the largest step the worker is sized for; longer contexts as chunked prefills), then time
    // decode steps.
    {
      const int64_t budget = options.max_num_batched_tokens;
      Batch chunk;
      int64_t used = 0;
      auto flush = [&] {
        if (chunk.seqs.empty()) return;
        chunk.seqs.back().sample = true;
        exec.execute_and_sample(chunk, sampled(1));
        chunk.seqs.clear();
        used = 0;
      };
      for (int i = 0; i < batch; ++i) {
        for (int offset = 0; offset < context;) {
          if (used == budget) flush();
          const int len = static_cast<int>(std::min<int64_t>(context - offset, budget - used));
          chunk.seqs.push_back({std::vector<int32_t>(static_cast<size_t>(len), 100 + i), offset, table(i), false});
          used += len;
          offset += len;
        }
      }
      flush();
    }
    auto decode_batch = [&](int step) {
      Batch b;
      for (int i = 0; i < batch; ++i) b.seqs.push_back({{7}, context + step, table(i), true});
      return b;
    };
    const auto batch_seqs = sampled(batch);
    for (int w = 0; w < 3; ++w) exec.execute_and_sample(decode_batch(w), batch_seqs);  // warm-up (captures the graph)
    std::vector<double> times;
    for (int s = 0; s < steps; ++s) {
      const Batch b = decode_batch(3 + s);
      if (profile_step && s == 0) cudaProfilerStart();
      const auto t0 = Clock::now();
      exec.execute_and_sample(b, batch_seqs);
      if (profile_step && s == 0) cudaProfilerStop();
      times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    const double step = times[times.size() / 2];
    const double kv = batch * (context + 3 + steps / 2.0) * kv_per_token;
    const double fraction = (weights + kv) / step / bw;
    std::printf("decode batch %3d: %.3f ms/step, %8.1f tokens/s, bandwidth fraction %.3f\n", batch, step * 1e3,
                batch / step, fraction);
    record("decode", batch, batch / step, fraction, step * 1e3);
  }
  if (!out_path.empty()) {
    std::ofstream out(out_path, std::ios::app);
    for (auto& r : op_records) {
      r["model"] = model;
      r["date"] = shardserve::harness::record_date();
      out << r.dump() << "\n";
    }
    for (const auto& r : records) out << r.dump() << "\n";
  }
  std::printf("\n%s, tp_size %d\n%-8s %6s %12s %10s %9s %14s\n", model.c_str(), tp_size, "bench", "batch",
              "tokens/s", "step ms", "bw frac", "collective ms");
  for (const auto& r : records) {
    std::printf("%-8s %6d %12.1f %10.3f %9.3f %14.3f\n", r["bench"].get<std::string>().c_str(), r["batch"].get<int>(),
                r["tokens_per_s"].get<double>(), r["step_ms"].get<double>(), r["bandwidth_fraction"].get<double>(),
                r.value("collective_ms_per_step", 0.0));
  }
  return 0;
}
