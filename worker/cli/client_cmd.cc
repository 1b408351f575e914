// `shardserve client`: one request to a running server (shardserve serve, or a coordinator), text
// or token ids in, the completion out. The reference client of proto/shardserve/v1.
#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "shardserve/v1/generation.grpc.pb.h"
#include "worker/cli/commands.h"

namespace shardserve::cli {
namespace {

namespace v1 = shardserve::v1;

struct ClientArgs {
  std::string address = "127.0.0.1:50051";
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::string chat;
  int64_t max_tokens = 64;
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double min_p = 0.0;
  int64_t seed = -1;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  int logprobs = -1;
  bool stream = false;
  bool list_models = false;
  std::string output = "text";
  double timeout = 120;
  bool tls = false;             // speak TLS, trusting the system's CAs
  std::string tls_ca;           // PEM: speak TLS, trusting this CA
  std::string tls_client_cert;  // PEM: a client certificate, for servers that require one
  std::string tls_client_key;
  std::string api_key;
};

bool read_file(const std::string& path, const char* flag, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "error: " << flag << ": cannot read " << path << "\n";
    return false;
  }
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

int fail(const grpc::Status& s) {
  static const char* const kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                       "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int code = static_cast<int>(s.error_code());
  std::cerr << "error: " << (code >= 0 && code <= 16 ? kNames[code] : "?") << ": " << s.error_message() << "\n";
  return 1;
}

nlohmann::json to_json(const v1::GenerateResponse& r) {
  nlohmann::json j;
  j["request_id"] = r.request_id();
  j["token_ids"] = std::vector<int32_t>(r.token_ids().begin(), r.token_ids().end());
  j["text"] = r.text();
  j["finish_reason"] = r.finish_reason() == v1::FINISH_REASON_LENGTH ? "length"
                       : r.finish_reason() == v1::FINISH_REASON_STOP ? "stop"
                                                                     : "";
  j["usage"] = {{"prompt_tokens", r.usage().prompt_tokens()},
                {"completion_tokens", r.usage().completion_tokens()},
                {"cached_prompt_tokens", r.usage().cached_prompt_tokens()}};
  if (r.logprobs_size() > 0) {
    nlohmann::json lps = nlohmann::json::array();
    for (const auto& lp : r.logprobs()) lps.push_back({{"token_id", lp.token_id()}, {"logprob", lp.logprob()}});
    j["logprobs"] = lps;
  }
  if (!r.stop().empty()) j["stop"] = r.stop();
  return j;
}

int run_client(const ClientArgs& a) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (a.tls || !a.tls_ca.empty() || !a.tls_client_cert.empty()) {
    grpc::SslCredentialsOptions ssl;  // an empty root bundle: the system's CAs
    if (!a.tls_ca.empty() && !read_file(a.tls_ca, "--tls-ca", ssl.pem_root_certs)) return 1;
    if (a.tls_client_cert.empty() != a.tls_client_key.empty()) {
      std::cerr << "error: --tls-client-cert and --tls-client-key go together\n";
      return 1;
    }
    if (!a.tls_client_cert.empty() && (!read_file(a.tls_client_cert, "--tls-client-cert", ssl.pem_cert_chain) ||
                                       !read_file(a.tls_client_key, "--tls-client-key", ssl.pem_private_key))) {
      return 1;
    }
    credentials = grpc::SslCredentials(ssl);
  }
  auto channel = grpc::CreateChannel(a.address, credentials);
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(a.timeout * 1000)));
  const char* env_key = std::getenv("SHARDSERVE_API_KEY");
  const std::string api_key = !a.api_key.empty() ? a.api_key : env_key ? env_key : "";
  if (!api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + api_key);

  if (a.list_models) {
    v1::ListModelsResponse resp;
    if (auto s = stub->ListModels(&ctx, {}, &resp); !s.ok()) return fail(s);
    for (const auto& m : resp.models()) {
      std::cout << m.name() << "  healthy groups " << m.num_healthy_groups() << "/" << m.num_groups()
                << "  tokenizer " << (m.has_tokenizer() ? "yes" : "no") << "  max_model_len " << m.max_model_len()
                << "\n";
    }
    return 0;
  }

  v1::GenerateRequest req;
  req.set_model(a.model);
  if (static_cast<int>(!a.prompt.empty()) + static_cast<int>(!a.prompt_ids.empty()) + static_cast<int>(!a.chat.empty()) != 1) {
    std::cerr << "error: give exactly one of --prompt, --prompt-ids and --chat\n";
    return 1;
  }
  if (!a.prompt.empty()) req.set_text(a.prompt);
  if (!a.chat.empty()) {
    auto* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(a.chat);
  }
  if (!a.prompt_ids.empty()) {
    for (absl::string_view piece : absl::StrSplit(a.prompt_ids, ',', absl::SkipWhitespace())) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(piece, &id)) {
        std::cerr << "error: --prompt-ids: '" << piece << "' is not an integer\n";
        return 1;
      }
      req.mutable_prompt_token_ids()->add_ids(id);
    }
  }
  req.set_max_tokens(a.max_tokens);
  req.set_temperature(a.temperature);
  req.set_top_k(a.top_k);
  req.set_top_p(a.top_p);
  req.set_min_p(a.min_p);
  if (a.seed >= 0) req.set_seed(static_cast<uint64_t>(a.seed));
  for (const std::string& s : a.stop) req.add_stop(s);
  req.set_ignore_eos(a.ignore_eos);
  if (a.logprobs >= 0) req.set_logprobs(a.logprobs);

  v1::GenerateResponse all;
  if (a.stream) {
    auto reader = stub->GenerateStream(&ctx, req);
    v1::GenerateResponse delta;
    while (reader->Read(&delta)) {
      if (a.output == "text") {
        std::cout << delta.text() << std::flush;
      }
      all.set_request_id(delta.request_id());
      all.mutable_token_ids()->MergeFrom(delta.token_ids());
      all.mutable_text()->append(delta.text());
      all.mutable_logprobs()->MergeFrom(delta.logprobs());
      if (delta.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        all.set_finish_reason(delta.finish_reason());
        *all.mutable_usage() = delta.usage();
        all.set_stop(delta.stop());
      }
    }
    if (auto s = reader->Finish(); !s.ok()) {
      if (a.output == "text") std::cout << "\n";
      return fail(s);
    }
  } else if (auto s = stub->Generate(&ctx, req, &all); !s.ok()) {
    return fail(s);
  }
  if (a.output == "json") {
    std::cout << to_json(all).dump() << "\n";
  } else if (a.stream) {
    std::cout << "\n";
  } else if (!all.text().empty() || all.token_ids_size() == 0) {
    std::cout << all.text() << "\n";
  } else {  // a model served without a tokenizer: ids are all there is
    for (int i = 0; i < all.token_ids_size(); ++i) std::cout << (i ? "," : "") << all.token_ids(i);
    std::cout << "\n";
  }
  return 0;
}

}  // namespace

void register_client(CLI::App& app) {
  auto a = std::make_shared<ClientArgs>();
  CLI::App* cmd = app.add_subcommand("client", "Send one request to a running server");
  cmd->add_option("--address", a->address, "The server, host:port")->capture_default_str();
  cmd->add_option("--model", a->model, "Model name (default: the server's only model)");
  cmd->add_option("--prompt", a->prompt, "Prompt text (BOS added)");
  cmd->add_option("--prompt-ids", a->prompt_ids, "Prompt token ids, comma-separated, used verbatim");
  cmd->add_option("--chat", a->chat, "One user message, rendered with the model's chat template");
  cmd->add_option("--max-tokens", a->max_tokens, "Most tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", a->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a->top_k, "0 or -1 = off");
  cmd->add_option("--top-p", a->top_p, "1 = off");
  cmd->add_option("--min-p", a->min_p, "0 = off");
  cmd->add_option("--seed", a->seed, "Sampling seed");
  cmd->add_option("--stop", a->stop, "Stop string (repeatable)");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Keep generating past EOS");
  cmd->add_option("--logprobs", a->logprobs, "Return logprobs with the top N (0-20)");
  cmd->add_flag("--stream", a->stream, "Print the text as it is generated");
  cmd->add_flag("--list-models", a->list_models, "List the served models and their health");
  cmd->add_option("--output", a->output, "text or json")->check(CLI::IsMember({"text", "json"}))->capture_default_str();
  cmd->add_option("--timeout", a->timeout, "Deadline of the call in seconds")->capture_default_str();
  cmd->add_flag("--tls", a->tls, "Connect over TLS, trusting the system's CAs");
  cmd->add_option("--tls-ca", a->tls_ca, "Connect over TLS, trusting this PEM CA bundle")->check(CLI::ExistingFile);
  cmd->add_option("--tls-client-cert", a->tls_client_cert,
                  "PEM client certificate (TLS), for a server that requires one")
      ->check(CLI::ExistingFile);
  cmd->add_option("--tls-client-key", a->tls_client_key, "PEM private key of --tls-client-cert")
      ->check(CLI::ExistingFile);
  cmd->add_option("--api-key", a->api_key, "Send 'authorization: Bearer KEY' (default: $SHARDSERVE_API_KEY)");
  cmd->callback([a] {
    const int rc = run_client(*a);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
