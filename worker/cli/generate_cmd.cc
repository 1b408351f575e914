// `shardserve generate`: load a checkpoint and generate in this process, no network.
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "worker/cli/commands.h"
#include "worker/engine/greedy.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/llama.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cpu_backend.h"

namespace shardserve::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt_ids;
  int64_t max_tokens = 16;
  double temperature = 0.0;
  bool ignore_eos = false;
  std::string backend = "cpu";
  std::string output = "text";
  int64_t block_size = 16;
};

int fail(const std::string& message) {
  std::cerr << "error: " << message << "\n";
  return 1;
}

absl::StatusOr<std::vector<int32_t>> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", piece, "' is not an integer"));
    }
    ids.push_back(id);
  }
  return ids;
}

int run_generate(const GenerateArgs& args) {
  if (args.temperature != 0.0) return fail("only --temperature 0 (greedy) is supported by generate for now");
  if (args.backend != "cpu") return fail("--backend " + args.backend + " is not available (supported: cpu)");
  auto prompt = parse_ids(args.prompt_ids);
  if (!prompt.ok()) return fail(std::string(prompt.status().message()));

  auto config = load_model_config(args.model);
  if (!config.ok()) return fail(std::string(config.status().message()));
  auto gen_config = load_generation_config(args.model, *config);
  if (!gen_config.ok()) return fail(std::string(gen_config.status().message()));
  auto ckpt = Checkpoint::open(args.model);
  if (!ckpt.ok()) return fail(std::string(ckpt.status().message()));

  CpuBackend backend;
  SingleRankCommunicator comm;
  auto model = LlamaModel::load(*config, **ckpt, backend, comm);
  if (!model.ok()) return fail(std::string(model.status().message()));

  const int64_t max_len = std::min<int64_t>(config->max_position_embeddings,
                                            static_cast<int64_t>(prompt->size()) + args.max_tokens);
  const int64_t num_blocks = (max_len + args.block_size - 1) / args.block_size;
  ModelRunner runner(**model, backend, num_blocks, args.block_size);

  GreedyOptions options;
  options.max_tokens = args.max_tokens;
  options.ignore_eos = args.ignore_eos;
  options.stop_token_ids = stop_token_ids(*config, *gen_config);
  auto out = generate_greedy(runner, *prompt, options);
  if (!out.ok()) return fail(std::string(out.status().message()));

  if (args.output == "json") {
    nlohmann::json j;
    j["token_ids"] = out->token_ids;
    j["finish_reason"] = out->finish_reason;
    j["prompt_tokens"] = prompt->size();
    std::cout << j.dump() << "\n";
  } else {
    for (size_t i = 0; i < out->token_ids.size(); ++i) std::cout << (i ? "," : "") << out->token_ids[i];
    std::cout << "\nfinish_reason: " << out->finish_reason << "\n";
  }
  return 0;
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate from a checkpoint in this process (no server)");
  cmd->add_option("--model", args->model, "Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma-separated, used verbatim (no BOS added)")->required();
  cmd->add_option("--max-tokens", args->max_tokens, "Most tokens to generate")->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", args->temperature, "0 = greedy");
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Keep generating past the config's EOS ids");
  cmd->add_option("--backend", args->backend, "cpu");
  cmd->add_option("--output", args->output, "text or json")->check(CLI::IsMember({"text", "json"}));
  cmd->callback([args] {
    const int rc = run_generate(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
