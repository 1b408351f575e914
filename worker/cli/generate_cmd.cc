// `shardserve generate`: load a checkpoint and run requests through one in-process engine, no
// network. One prompt (--prompt-ids) or many at once (--prompts-jsonl); JSON results in input order.
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <filesystem>

#include "absl/strings/numbers.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "worker/cli/commands.h"
#include "worker/engine/engine.h"
#include "worker/engine/executor.h"

namespace shardserve::cli {
namespace {

using nlohmann::json;

struct GenerateArgs {
  std::string model;
  std::string prompt_ids;
  std::string prompt_text;
  std::string chat_json;
  std::string prompts_jsonl;
  std::string tokenizer;  // default: the model directory
  SamplingParams params;
  int64_t seed = -1;
  std::string backend = "cpu";
  std::string synthetic;
  std::string dtype = "auto";
  std::string quantization;  // "": the checkpoint's own
  double gpu_memory_utilization = 0.90;
  int tp_size = 1;
  std::string output = "text";
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 2048;
  int64_t num_kv_blocks = 0;
  int64_t block_size = 16;
  int64_t max_model_len = 0;
  bool enable_prefix_caching = true;
};

absl::StatusOr<std::vector<int32_t>> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", std::string(piece), "' is not an integer"));
    }
    ids.push_back(id);
  }
  return ids;
}

// Turns text or chat messages into prompt ids. Text gets BOS (as add_special_tokens=True does);
// special-token strings inside it stay plain text. Chat renders the model's chat template with
// the assistant header appended.
class PromptEncoder {
 public:
  explicit PromptEncoder(std::string dir) : dir_(std::move(dir)) {}
  bool available() const { return std::filesystem::exists(std::filesystem::path(dir_) / "tokenizer.json"); }

  absl::StatusOr<std::vector<int32_t>> text(const std::string& prompt) {
    if (auto st = load(); !st.ok()) return st;
    return tokenizer_->encode(prompt, {.add_special_tokens = true});
  }
  absl::StatusOr<std::vector<int32_t>> chat(const json& messages) {
    if (auto st = load(); !st.ok()) return st;
    if (!chat_) {
      auto t = ChatTemplate::load(dir_);
      if (!t.ok()) return t.status();
      chat_ = std::make_unique<ChatTemplate>(std::move(*t));
    }
    auto parsed = parse_chat_messages(messages);
    if (!parsed.ok()) return parsed.status();
    return chat_->encode_chat(*tokenizer_, *parsed, {.add_generation_prompt = true});
  }
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) {
    if (auto st = load(); !st.ok()) return st;
    return tokenizer_->decode(ids, /*skip_special_tokens=*/true);
  }

 private:
  absl::Status load() {
    if (tokenizer_) return absl::OkStatus();
    if (!available()) {
      return absl::FailedPreconditionError(absl::StrCat(dir_, " has no tokenizer.json: give prompt ids, or --tokenizer DIR"));
    }
    auto t = Tokenizer::load(dir_);
    if (!t.ok()) return t.status();
    tokenizer_ = std::move(*t);
    return absl::OkStatus();
  }
  std::string dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ChatTemplate> chat_;
};

// One JSON line: {"prompt_ids": [...]}, {"prompt": "..."} or {"messages": [...]}, plus optional
// per-request sampling fields.
absl::StatusOr<Request> parse_request_line(const std::string& line, size_t line_no, const SamplingParams& defaults,
                                           PromptEncoder& encoder) {
  const json j = json::parse(line, nullptr, false);
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("--prompts-jsonl line ", line_no, ": ", what));
  };
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  Request r;
  r.params = defaults;
  if (j.contains("prompt") || j.contains("messages")) {
    auto ids = j.contains("prompt") ? (j["prompt"].is_string() ? encoder.text(j["prompt"].get<std::string>())
                                                               : absl::InvalidArgumentError("prompt must be a string"))
                                    : encoder.chat(j["messages"]);
    if (!ids.ok()) return bad(std::string(ids.status().message()));
    r.prompt_token_ids = std::move(*ids);
  } else {
    if (!j.contains("prompt_ids") || !j["prompt_ids"].is_array()) return bad("needs \"prompt_ids\", \"prompt\" or \"messages\"");
    for (const auto& id : j["prompt_ids"]) {
      if (!id.is_number_integer()) return bad("prompt_ids must be integers");
      r.prompt_token_ids.push_back(id.get<int32_t>());
    }
  }
  try {
    if (j.contains("max_tokens")) r.params.max_tokens = j["max_tokens"].get<int64_t>();
    if (j.contains("temperature")) r.params.temperature = j["temperature"].get<double>();
    if (j.contains("top_k")) r.params.top_k = j["top_k"].get<int64_t>();
    if (j.contains("top_p")) r.params.top_p = j["top_p"].get<double>();
    if (j.contains("min_p")) r.params.min_p = j["min_p"].get<double>();
    if (j.contains("seed")) r.params.seed = j["seed"].get<uint64_t>();
    if (j.contains("ignore_eos")) r.params.ignore_eos = j["ignore_eos"].get<bool>();
    if (j.contains("logprobs")) r.params.logprobs = j["logprobs"].get<int64_t>();
  } catch (const json::exception& e) {
    return bad(std::string("wrong field type: ") + e.what());
  }
  return r;
}

json result_json(const RequestOutput& o) {
  json j;
  j["token_ids"] = o.new_token_ids;
  j["finish_reason"] = o.finish_reason;
  j["prompt_tokens"] = o.num_prompt_tokens;
  j["cached_prompt_tokens"] = o.num_cached_prompt_tokens;
  if (!o.new_logprobs.empty()) {
    json lps = json::array();
    for (const TokenLogprobs& lp : o.new_logprobs) {
      json top = json::array();
      for (const auto& [id, v] : lp.top) top.push_back({{"token_id", id}, {"logprob", v}});
      lps.push_back({{"token_id", lp.token_id}, {"logprob", lp.logprob}, {"top_logprobs", top}});
    }
    j["logprobs"] = lps;
  }
  return j;
}

absl::Status run_generate(GenerateArgs args) {
  if (args.model.empty() == args.synthetic.empty()) return absl::InvalidArgumentError("give one of --model and --synthetic");
  const int sources = !args.prompt_ids.empty() + !args.prompt_text.empty() + !args.chat_json.empty() + !args.prompts_jsonl.empty();
  if (sources != 1) {
    return absl::InvalidArgumentError("give exactly one of --prompt-ids, --prompt, --chat and --prompts-jsonl");
  }
  if (args.seed >= 0) args.params.seed = static_cast<uint64_t>(args.seed);
  PromptEncoder encoder(args.tokenizer.empty() ? args.model : args.tokenizer);

  std::vector<Request> requests;
  if (args.prompts_jsonl.empty()) {
    absl::StatusOr<std::vector<int32_t>> ids;
    if (!args.prompt_ids.empty()) {
      ids = parse_ids(args.prompt_ids);
    } else if (!args.prompt_text.empty()) {
      ids = encoder.text(args.prompt_text);
    } else {
      const json messages = json::parse(args.chat_json, nullptr, false);
      ids = messages.is_discarded() ? absl::InvalidArgumentError("--chat is not valid JSON") : encoder.chat(messages);
    }
    if (!ids.ok()) return ids.status();
    requests.push_back({"0", *ids, args.params});
  } else {
    std::ifstream in(args.prompts_jsonl);
    if (!in) return absl::NotFoundError("cannot read " + args.prompts_jsonl);
    std::string line;
    for (size_t n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto r = parse_request_line(line, n, args.params, encoder);
      if (!r.ok()) return r.status();
      r->request_id = std::to_string(requests.size());
      requests.push_back(std::move(*r));
    }
  }

  ExecutorOptions options;
  options.model_dir = args.model;
  options.synthetic = args.synthetic;
  options.dtype = args.dtype;
  options.quantization = args.quantization;
  options.gpu_memory_utilization = args.gpu_memory_utilization;
  options.max_model_len = args.max_model_len;
  options.max_num_seqs = args.max_num_seqs;
  options.max_num_batched_tokens = args.max_num_batched_tokens;
  options.backend = args.backend;
  options.tp_size = args.tp_size;
  options.block_size = args.block_size;
  options.num_kv_blocks = args.num_kv_blocks;
  if (options.num_kv_blocks <= 0 && args.backend == "cpu") {  // room for every request at once; a GPU plans its own
    for (const Request& r : requests) {
      options.num_kv_blocks += (static_cast<int64_t>(r.prompt_token_ids.size()) + r.params.max_tokens +
                                args.block_size - 1) / args.block_size;
    }
  }
  auto loaded = load_model(options);
  if (!loaded.ok()) return loaded.status();
  EngineConfig engine_config;
  engine_config.scheduler = {args.max_num_seqs, args.max_num_batched_tokens};
  engine_config.max_model_len = args.max_model_len;
  engine_config.enable_prefix_caching = args.enable_prefix_caching;
  engine_config.eos_token_ids = stop_token_ids(loaded->config, loaded->generation);
  Engine engine(*loaded->executor, engine_config);
  auto results = run_to_completion(engine, std::move(requests));
  if (!results.ok()) return results.status();

  for (const RequestOutput& o : *results) {
    json j = result_json(o);
    if (encoder.available()) {
      auto text = encoder.decode(o.new_token_ids);
      if (!text.ok()) return text.status();
      j["text"] = *text;
    }
    if (args.output == "json") {
      std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      if (j.contains("text")) std::cout << j["text"].get<std::string>() << "\n";
      for (size_t i = 0; i < o.new_token_ids.size(); ++i) std::cout << (i ? "," : "") << o.new_token_ids[i];
      std::cout << "\nfinish_reason: " << o.finish_reason << "\n";
    }
  }
  return absl::OkStatus();
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  args->params.temperature = 0.0;  // a checking tool: greedy unless asked
  SamplingParams& p = args->params;
  CLI::App* cmd = app.add_subcommand("generate", "Generate from a checkpoint in this process (no server)");
  auto* model = cmd->add_option("--model", args->model, "Hugging Face checkpoint directory")->check(CLI::ExistingDirectory);
  cmd->add_option("--synthetic", args->synthetic,
                  "Random weights of a preset shape (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b) or config.json, made on the device")
      ->excludes(model);
  cmd->add_option("--dtype", args->dtype, "auto (the checkpoint's), bfloat16, float16 or float32 (GPU checking)")
      ->capture_default_str();
  cmd->add_option("--quantization", args->quantization,
                  "none, awq, gptq, fp8 or int8. Default: the checkpoint's own format (config.json quantization_config); "
                  "fp8 or int8 quantize a 16-bit checkpoint at load; with --synthetic, random weights in that format")
      ->check(CLI::IsMember({"none", "awq", "gptq", "fp8", "int8"}));
  cmd->add_option("--gpu-memory-utilization", args->gpu_memory_utilization,
                  "Share of GPU memory for weights + activations + KV cache")->capture_default_str();
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma-separated, used verbatim (no BOS added)");
  cmd->add_option("--prompt", args->prompt_text, "Prompt text (tokenized with BOS; needs the tokenizer)");
  cmd->add_option("--chat", args->chat_json,
                  "Chat messages as JSON, e.g. '[{\"role\":\"user\",\"content\":\"Hello\"}]', rendered with the model's chat template");
  cmd->add_option("--tokenizer", args->tokenizer, "Directory with tokenizer.json (default: the model directory)");
  cmd->add_option("--prompts-jsonl", args->prompts_jsonl,
                  "File of requests, one JSON object per line: {\"prompt_ids\":[...]}, {\"prompt\":\"...\"} or {\"messages\":[...]} with optional max_tokens, "
                  "temperature, top_k, top_p, min_p, seed, ignore_eos, logprobs; all run at once in one engine");
  cmd->add_option("--max-tokens", p.max_tokens, "Most tokens to generate per request")->capture_default_str();
  cmd->add_option("--temperature", p.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", p.top_k, "0 or -1 = off");
  cmd->add_option("--top-p", p.top_p, "1 = off");
  cmd->add_option("--min-p", p.min_p, "0 = off");
  cmd->add_option("--seed", args->seed, "Sampling seed (same tokens whatever the batch)");
  cmd->add_option("--logprobs", p.logprobs, "Return the chosen token's logprob and the top N (0-20)");
  cmd->add_flag("--ignore-eos", p.ignore_eos, "Keep generating past the model's EOS ids");
  cmd->add_option("--backend", args->backend, "cpu or cuda")->capture_default_str();
  cmd->add_option("--tp-size", args->tp_size, "Tensor-parallel ranks")->capture_default_str();
  cmd->add_option("--output", args->output, "text or json")->check(CLI::IsMember({"text", "json"}))->capture_default_str();
  cmd->add_option("--max-num-seqs", args->max_num_seqs, "Most sequences per step")->capture_default_str();
  cmd->add_option("--max-num-batched-tokens", args->max_num_batched_tokens, "Token budget per step")->capture_default_str();
  cmd->add_option("--num-kv-blocks", args->num_kv_blocks, "KV-cache blocks (default: room for every request at once)");
  cmd->add_option("--block-size", args->block_size, "Tokens per KV-cache block")->capture_default_str();
  cmd->add_option("--max-model-len", args->max_model_len, "Longest prompt + output (default: the model's)");
  cmd->add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", args->enable_prefix_caching,
                "Reuse cached KV blocks of shared prompt prefixes")->capture_default_str();
  cmd->callback([args] {
    const absl::Status st = run_generate(*args);
    if (!st.ok()) {
      std::cerr << "error: " << st.message() << "\n";
      throw CLI::RuntimeError(1);
    }
  });
}

}  // namespace shardserve::cli
