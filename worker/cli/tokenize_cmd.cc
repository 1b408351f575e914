// `shardserve tokenize` and `shardserve detokenize`: the tokenizer library from the command line.
//
//   shardserve tokenize --tokenizer DIR --text "Hello world"        -> {"ids":[9906,1917]}
//   shardserve tokenize --model DIR --jsonl in.jsonl [--add-bos]    -> one {"ids":[...]} per line
//   shardserve detokenize --tokenizer DIR --ids 9906,1917           -> {"text":"Hello world"}
//
// Special-token strings in the text are plain text unless --parse-special (Hugging Face's
// behaviour) is given; see coordinator/tokenizer/tokenizer.h.
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "worker/cli/commands.h"

namespace shardserve::cli {
namespace {

using json = nlohmann::json;

struct TokenizeArgs {
  std::string tokenizer;  // --tokenizer or --model: a directory with tokenizer.json, or the file
  std::string text;
  std::string jsonl;
  bool add_bos = false;
  bool parse_special = false;
  std::string ids;
  bool skip_special_tokens = false;
};

int fail(absl::string_view message) {
  std::cerr << "error: " << message << "\n";
  return 1;
}

// Decoded text is valid UTF-8 already; `replace` only guards the invariant.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int run_tokenize(const TokenizeArgs& args) {
  auto tokenizer = Tokenizer::load(args.tokenizer);
  if (!tokenizer.ok()) return fail(tokenizer.status().message());
  EncodeOptions options;
  options.add_special_tokens = args.add_bos;
  options.parse_special = args.parse_special;

  if (args.jsonl.empty()) {
    auto ids = (*tokenizer)->encode(args.text, options);
    if (!ids.ok()) return fail(ids.status().message());
    std::cout << dump(json{{"ids", *ids}}) << "\n";
    return 0;
  }
  std::ifstream in(args.jsonl, std::ios::binary);
  if (!in) return fail(absl::StrCat("cannot open ", args.jsonl));
  std::string line;
  for (int line_no = 1; std::getline(in, line); ++line_no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const json record = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded() || !record.is_object() || !record.contains("text") || !record["text"].is_string()) {
      return fail(absl::StrCat(args.jsonl, ":", line_no, ": expected a JSON object {\"text\": \"...\"}"));
    }
    auto ids = (*tokenizer)->encode(record["text"].get_ref<const std::string&>(), options);
    if (!ids.ok()) return fail(absl::StrCat(args.jsonl, ":", line_no, ": ", ids.status().message()));
    std::cout << dump(json{{"ids", *ids}}) << "\n";
  }
  return 0;
}

int run_detokenize(const TokenizeArgs& args) {
  std::vector<int32_t> ids;
  for (absl::string_view piece : absl::StrSplit(args.ids, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) return fail(absl::StrCat("--ids: '", piece, "' is not an integer"));
    ids.push_back(id);
  }
  auto tokenizer = Tokenizer::load(args.tokenizer);
  if (!tokenizer.ok()) return fail(tokenizer.status().message());
  auto text = (*tokenizer)->decode(ids, args.skip_special_tokens);
  if (!text.ok()) return fail(text.status().message());
  std::cout << dump(json{{"text", *text}}) << "\n";
  return 0;
}

void add_tokenizer_option(CLI::App* cmd, TokenizeArgs& args) {
  auto* tok = cmd->add_option("--tokenizer", args.tokenizer, "Directory with tokenizer.json (or the file itself)")
                  ->check(CLI::ExistingPath);
  auto* model = cmd->add_option("--model", args.tokenizer, "Model directory (its tokenizer.json is used)")
                    ->check(CLI::ExistingDirectory);
  tok->excludes(model);
  model->excludes(tok);
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();

  CLI::App* tokenize = app.add_subcommand("tokenize", "Text to token ids, printed as JSON {\"ids\": [...]}");
  add_tokenizer_option(tokenize, *args);
  auto* text = tokenize->add_option("--text", args->text, "Text to encode");
  auto* jsonl = tokenize->add_option("--jsonl", args->jsonl, "File of lines {\"text\": ...}; one output line each")
                    ->check(CLI::ExistingFile);
  text->excludes(jsonl);
  jsonl->excludes(text);
  tokenize->add_flag("--add-bos", args->add_bos, "Add BOS as Hugging Face's add_special_tokens=True does");
  tokenize->add_flag("--parse-special", args->parse_special,
                     "Turn special-token strings such as <|eot_id|> in the text into their ids (HF behaviour)");
  tokenize->final_callback([tokenize, args] {
    if (args->tokenizer.empty()) throw CLI::RequiredError("--tokenizer or --model");
    if (tokenize->count("--text") + tokenize->count("--jsonl") == 0) throw CLI::RequiredError("--text or --jsonl");
    const int rc = run_tokenize(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });

  CLI::App* detokenize = app.add_subcommand("detokenize", "Token ids to text, printed as JSON {\"text\": \"...\"}");
  add_tokenizer_option(detokenize, *args);
  detokenize->add_option("--ids", args->ids, "Token ids, comma-separated")->required();
  detokenize->add_flag("--skip-special-tokens", args->skip_special_tokens, "Leave special tokens out of the text");
  detokenize->final_callback([args] {
    if (args->tokenizer.empty()) throw CLI::RequiredError("--tokenizer or --model");
    const int rc = run_detokenize(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
