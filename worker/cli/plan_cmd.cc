// `shardserve plan`: the memory planner (worker/model/memory_plan.h) from the command line. Does a
// model fit a GPU layout, and how many tokens of KV cache are left?
//
//   shardserve plan --preset llama-3.1-70b --gpu h100-80gb --quantization awq --max-model-len 4096
//   shardserve plan --model DIR --gpu 47.5 --tp-size 2 --output json
//   shardserve plan                      # no --gpu/--quantization: a table over the usual layouts
//
// The worker prints the same plan at start-up next to what it measured.
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/cli/commands.h"
#include "worker/model/memory_plan.h"
#include "worker/model/presets.h"

namespace shardserve::cli {
namespace {

using json = nlohmann::json;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct PlanArgs {
  std::string model;
  std::string preset = "llama-3.1-70b";
  std::string gpu;
  std::string quantization;
  std::string dtype = "auto";
  std::string output = "table";
  PlanOptions options;
};

std::string fmt_gib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", static_cast<double>(bytes) / kGiB);
  return text;
}

json to_json(const std::string& model, const MemoryPlan& p) {
  return json{{"model", model},
              {"gpu", p.gpu},
              {"gpu_total_bytes", p.gpu_total_bytes},
              {"quantization", p.quantization},
              {"tp_size", p.tp_size},
              {"gpu_memory_utilization", p.gpu_memory_utilization},
              {"max_model_len", p.max_model_len},
              {"block_size", p.block_size},
              {"kv_cache_dtype", p.kv_cache_dtype},
              {"num_kv_heads_per_rank", p.num_kv_heads_per_rank},
              {"budget_bytes", p.budget_bytes},
              {"weights_bytes_per_gpu", p.weights_bytes_per_gpu},
              {"weights",
               {{"linear", p.weights.linear},
                {"linear_meta", p.weights.linear_meta},
                {"embedding", p.weights.embedding},
                {"lm_head", p.weights.lm_head},
                {"norms", p.weights.norms},
                {"rope_table", p.weights.rope_table}}},
              {"activation_bytes", p.activation_bytes},
              {"overhead_bytes", p.overhead_bytes},
              {"kv_bytes_per_token", p.kv_bytes_per_token},
              {"kv_cache_bytes", p.kv_cache_bytes},
              {"kv_capacity_tokens", p.kv_capacity_tokens},
              {"max_concurrent_seqs", p.max_concurrent_seqs},
              {"fits", p.fits},
              {"reason", p.reason}};
}

void print_plan(const std::string& model, const MemoryPlan& p, const PlanOptions& o) {
  const WeightBytes& w = p.weights;
  std::printf("%s on %s (%s GiB), quantization %s, tp_size %d, gpu_memory_utilization %.2f, max_model_len %lld\n",
              model.c_str(), p.gpu.c_str(), fmt_gib(p.gpu_total_bytes).c_str(), p.quantization.c_str(), p.tp_size,
              p.gpu_memory_utilization, static_cast<long long>(p.max_model_len));
  std::printf("  budget (utilization x total) %9s GiB\n", fmt_gib(p.budget_bytes).c_str());
  std::printf("  weights per GPU              %9s GiB  (linear %s, scales/zeros %s, embedding %s, lm_head %s, "
              "norms %s, rope %s)\n",
              fmt_gib(p.weights_bytes_per_gpu).c_str(), fmt_gib(w.linear).c_str(), fmt_gib(w.linear_meta).c_str(),
              fmt_gib(w.embedding).c_str(), fmt_gib(w.lm_head).c_str(), fmt_gib(w.norms).c_str(),
              fmt_gib(w.rope_table).c_str());
  std::printf("  activations (arena)          %9s GiB  (warm-up at %lld batched tokens, %lld sequences)\n",
              fmt_gib(p.activation_bytes).c_str(), static_cast<long long>(o.max_num_batched_tokens),
              static_cast<long long>(o.max_num_seqs));
  std::printf("  overhead (CUDA, estimate)    %9s GiB\n", fmt_gib(p.overhead_bytes).c_str());
  std::printf("  KV cache                     %9s GiB  %lld bytes/token (%s, %lld KV heads per rank)\n",
              fmt_gib(p.kv_cache_bytes).c_str(), static_cast<long long>(p.kv_bytes_per_token),
              p.kv_cache_dtype.c_str(), static_cast<long long>(p.num_kv_heads_per_rank));
  std::printf("  KV capacity                  %9lld tokens, %lld concurrent sequences of %lld\n",
              static_cast<long long>(p.kv_capacity_tokens), static_cast<long long>(p.max_concurrent_seqs),
              static_cast<long long>(p.max_model_len));
  std::printf("  fits                         %9s  %s\n", p.fits ? "yes" : "no", p.reason.c_str());
}

// The usual layouts of a 70B model: 16-bit over 1 and 2 GPUs, 8-bit and 4-bit on one.
struct Layout {
  const char* quantization;
  int tp_size;
};
constexpr Layout kLayouts[] = {{"none", 2}, {"none", 1}, {"int8", 1}, {"fp8", 1}, {"awq", 1}, {"gptq", 1}};

int run_plan(PlanArgs args, bool survey) {
  const std::string source = args.model.empty() ? args.preset : args.model + "/config.json";
  auto config = preset_or_config(source);
  if (!config.ok()) {
    std::cerr << "error: " << config.status().message() << "\n";
    return 1;
  }
  if (args.dtype == "bfloat16") config->dtype = DType::kBF16;
  if (args.dtype == "float16") config->dtype = DType::kF16;
  args.options.activation_dtype = config->dtype;
  const std::string model = args.model.empty() ? args.preset : args.model;

  if (!survey) {
    auto gpu = gpu_spec(args.gpu.empty() ? "h100-80gb" : args.gpu);
    if (!gpu.ok()) {
      std::cerr << "error: " << gpu.status().message() << "\n";
      return 1;
    }
    if (!args.quantization.empty()) args.options.quantization = args.quantization;
    auto plan = plan_memory(*config, *gpu, args.options);
    if (!plan.ok()) {
      std::cerr << "error: " << plan.status().message() << "\n";
      return 1;
    }
    if (args.output == "json") {
      std::cout << to_json(model, *plan).dump(2) << "\n";
    } else {
      print_plan(model, *plan, args.options);
    }
    return 0;
  }

  // The survey: every usual layout on every GPU preset, at one max_model_len (4096 unless given).
  if (args.options.max_model_len <= 0) args.options.max_model_len = 4096;
  json rows = json::array();
  if (args.output != "json") {
    std::printf("%s, gpu_memory_utilization %.2f, max_model_len %lld, kv_cache_dtype %s, max_num_batched_tokens %lld "
                "(sizes in GiB per GPU)\n",
                model.c_str(), args.options.gpu_memory_utilization, static_cast<long long>(args.options.max_model_len),
                args.options.kv_cache_dtype.c_str(), static_cast<long long>(args.options.max_num_batched_tokens));
    std::printf("%-10s %-3s %-10s %8s %8s %8s %8s %9s %10s %7s  %s\n", "quant", "tp", "gpu", "budget", "weights",
                "activ.", "kv", "kv B/tok", "kv tokens", "seqs", "fits");
  }
  for (const Layout& layout : kLayouts) {
    for (const std::string& name : gpu_names()) {
      PlanOptions o = args.options;
      o.quantization = layout.quantization;
      o.tp_size = layout.tp_size;
      auto plan = plan_memory(*config, *gpu_spec(name), o);
      if (!plan.ok()) {
        std::cerr << "error: " << plan.status().message() << "\n";
        return 1;
      }
      const MemoryPlan& p = *plan;
      if (args.output == "json") {
        rows.push_back(to_json(model, p));
        continue;
      }
      std::printf("%-10s %-3d %-10s %8s %8s %8s %8s %9lld %10lld %7lld  %s\n", p.quantization.c_str(), p.tp_size,
                  p.gpu.c_str(), fmt_gib(p.budget_bytes).c_str(), fmt_gib(p.weights_bytes_per_gpu).c_str(),
                  fmt_gib(p.activation_bytes).c_str(), fmt_gib(p.kv_cache_bytes).c_str(),
                  static_cast<long long>(p.kv_bytes_per_token), static_cast<long long>(p.kv_capacity_tokens),
                  static_cast<long long>(p.max_concurrent_seqs), p.fits ? "yes" : "no");
    }
  }
  if (args.output == "json") std::cout << rows.dump(2) << "\n";
  return 0;
}

}  // namespace

void register_plan(CLI::App& app) {
  auto args = std::make_shared<PlanArgs>();
  CLI::App* cmd = app.add_subcommand("plan", "Memory plan per GPU: weights, activations, KV cache; does it fit?");
  auto* model = cmd->add_option("--model", args->model, "Hugging Face checkpoint directory (its config.json)")
                    ->check(CLI::ExistingDirectory);
  auto* preset = cmd->add_option("--preset", args->preset, "A model preset: " + [] {
                       std::string names;
                       for (const std::string& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
                       return names;
                     }())
                     ->capture_default_str();
  model->excludes(preset);
  preset->excludes(model);
  cmd->add_option("--gpu", args->gpu, "a100-80gb, h100-80gb, h200, or a size in GiB (default h100-80gb)");
  cmd->add_option("--tp-size", args->options.tp_size, "Tensor-parallel ranks (GPUs) of the group")->capture_default_str();
  cmd->add_option("--quantization", args->quantization, "none, fp8, int8, awq or gptq (default none)")
      ->check(CLI::IsMember({"none", "fp8", "int8", "awq", "gptq"}));
  cmd->add_option("--max-model-len", args->options.max_model_len,
                  "Longest prompt + output (default: the model's; 4096 in the layout table)");
  cmd->add_option("--gpu-memory-utilization", args->options.gpu_memory_utilization,
                  "Fraction of the GPU the worker may use")->capture_default_str();
  cmd->add_option("--kv-cache-dtype", args->options.kv_cache_dtype, "auto, bfloat16, float16 or fp8")
      ->check(CLI::IsMember({"auto", "bfloat16", "float16", "float32", "fp8"}))->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Activation dtype: auto (the checkpoint's), bfloat16 or float16")
      ->check(CLI::IsMember({"auto", "bfloat16", "float16"}))->capture_default_str();
  cmd->add_option("--max-num-batched-tokens", args->options.max_num_batched_tokens,
                  "Token budget per step (sizes the activation arena)")->capture_default_str();
  cmd->add_option("--max-num-seqs", args->options.max_num_seqs, "Most sequences per step")->capture_default_str();
  cmd->add_option("--block-size", args->options.block_size, "KV-cache block size in tokens")->capture_default_str();
  cmd->add_option("--output", args->output, "table or json")->check(CLI::IsMember({"table", "json"}))
      ->capture_default_str();
  cmd->callback([cmd, args] {
    const bool survey = cmd->count("--gpu") == 0 && cmd->count("--quantization") == 0;
    const int rc = run_plan(*args, survey);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
