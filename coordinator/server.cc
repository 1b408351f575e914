#include "coordinator/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/server_interceptor.h>
#include <prometheus/exposer.h>
#include <spdlog/spdlog.h>

#include <signal.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "coordinator/api_key.h"
#include "coordinator/frontend.h"
#include "coordinator/http_server.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"
#include "coordinator/text_stream.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "shardserve/v1/generation.grpc.pb.h"
#include "shardserve/worker/v1/worker.grpc.pb.h"
#include "worker/engine/sampling_params.h"

namespace shardserve {
namespace {

namespace v1 = shardserve::v1;
namespace wv1 = shardserve::worker::v1;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Longer than any model: requests claiming more tokens are rejected before any lookup.
constexpr int64_t kMaxTokensBound = int64_t{1} << 40;
constexpr int kMaxStopStrings = 64;

grpc::Status to_grpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct ServedModel {
  const ModelSpec* spec = nullptr;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string no_tokenizer_reason;
  std::optional<ChatTemplate> chat;
  std::string no_chat_reason;
};

// A request after validation: what goes to the worker and what the text stream needs.
struct Prepared {
  ServedModel* model = nullptr;
  std::vector<int32_t> prompt;
  SamplingParams params;
  std::vector<std::string> stop;
  bool skip_special_tokens = true;
};

absl::Status check_ids(std::span<const int32_t> ids, int64_t vocab_size, const char* what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i, "] is ", ids[i], ", outside the vocabulary [0, ",
                                                     vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

// gRPC answers a request it cannot parse with INTERNAL and no message; for proto3 that almost
// always means invalid UTF-8 in a string field (text, chat content, stop, model), which protobuf
// rejects before our handlers run. Our handlers never send INTERNAL without a message, so on the
// public API that status is turned into the INVALID_ARGUMENT a client can act on.
class ParseErrorInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit ParseErrorInterceptor(grpc::experimental::ServerRpcInfo* info)
      : public_api_(std::string_view(info->method()).starts_with("/shardserve.v1.")) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (public_api_ &&
        methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::INTERNAL && status.error_message().empty()) {
        methods->ModifySendStatus(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            "the request could not be parsed: a string field (model, text, chat content, stop) is not valid UTF-8, "
            "or the bytes are not a shardserve.v1 message"));
      }
    }
    methods->Proceed();
  }

 private:
  bool public_api_;
};

class ParseErrorInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new ParseErrorInterceptor(info);
  }
};

absl::StatusOr<std::string> read_pem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return text;
}

}  // namespace

// Cancels GenerateStream calls whose client stopped taking messages. A synchronous write blocks
// while the client's HTTP/2 window is full and has no timeout of its own; one thread looks at
// every open stream's pending write each second and cancels the call (TryCancel: the write
// returns false, the request ends and frees its worker-side blocks) once it has waited longer
// than the limit.
class StallGuard {
 public:
  struct Call {
    grpc::ServerContext* ctx = nullptr;
    std::atomic<int64_t> write_since_ns{0};  // steady clock; 0: no write pending
    std::atomic<bool> cancelled{false};
  };

  explicit StallGuard(std::chrono::milliseconds limit) : limit_(limit) {
    if (limit_.count() > 0) thread_ = std::thread([this] { run(); });
  }
  ~StallGuard() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  bool enabled() const { return limit_.count() > 0; }
  void add(Call* c) {
    std::lock_guard lock(mu_);
    calls_.push_back(c);
  }
  void remove(Call* c) {
    std::lock_guard lock(mu_);
    std::erase(calls_, c);
  }
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

 private:
  void run() {
    const auto period = std::min<std::chrono::milliseconds>(std::chrono::seconds(1), limit_ / 4 + std::chrono::milliseconds(1));
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, period, [this] { return stop_; })) {
      const int64_t now = now_ns();
      for (Call* c : calls_) {
        const int64_t since = c->write_since_ns.load();
        if (since == 0 || now - since < std::chrono::nanoseconds(limit_).count() || c->cancelled.exchange(true)) continue;
        spdlog::warn("a stream's client has taken no message for {} ms: cancelling it (--stream-stall-timeout-ms)",
                     limit_.count());
        c->ctx->TryCancel();
      }
    }
  }

  const std::chrono::milliseconds limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call*> calls_;
  bool stop_ = false;
  std::thread thread_;
};

struct Coordinator::Impl final : v1::Generation::Service, wv1::Registry::Service, Frontend {
  CoordinatorOptions options;
  ClusterConfig config;
  std::map<std::string, ServedModel> models;
  CoordinatorMetrics metrics;
  std::unique_ptr<Registry> registry;
  // Before the servers: destroyed after them, so no handler outlives it.
  std::unique_ptr<StallGuard> stall_guard;
  std::unique_ptr<prometheus::Exposer> exposer;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::Server> worker_server;  // the Registry alone, when worker_port is set
  std::unique_ptr<HttpServer> http;
  int port = 0;
  int worker_port = 0;
  int metrics_port = -1;
  int http_port = -1;

  std::atomic<bool> draining{false};
  std::atomic<int64_t> request_counter{0};
  std::mutex in_flight_mu;
  std::condition_variable in_flight_cv;
  int64_t in_flight = 0;

  std::mutex ready_mu;
  std::condition_variable ready_cv;
  bool ready_stop = false;
  std::thread ready_thread;

  // ---- the request path ----

  absl::StatusOr<ServedModel*> find_model(const std::string& name) {
    if (name.empty() && models.size() == 1) return &models.begin()->second;
    const auto it = models.find(name);
    if (it != models.end()) return &it->second;
    std::vector<std::string> names;
    for (const auto& [n, m] : models) names.push_back(n);
    if (name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model is empty; this server serves several: ", absl::StrJoin(names, ", ")));
    }
    return absl::NotFoundError(absl::StrCat("unknown model '", name, "'; this server serves: ", absl::StrJoin(names, ", ")));
  }

  absl::Status need_tokenizer(const ServedModel& m, const char* what) {
    if (m.tokenizer) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("model '", m.spec->name, "' is served without a tokenizer (",
                                                      m.no_tokenizer_reason, "), so ", what,
                                                      " cannot be used; send prompt_token_ids"));
  }

  absl::StatusOr<std::vector<int32_t>> chat_ids(const ServedModel& m, const v1::ChatMessages& chat) {
    if (auto st = need_tokenizer(m, "chat messages"); !st.ok()) return st;
    if (!m.chat) {
      return absl::FailedPreconditionError(absl::StrCat("model '", m.spec->name, "' has no usable chat template (",
                                                        m.no_chat_reason, "); send text or prompt_token_ids"));
    }
    if (chat.messages_size() == 0) return absl::InvalidArgumentError("chat: no messages");
    std::vector<ChatMessage> messages;
    for (const v1::ChatMessage& msg : chat.messages()) messages.push_back({msg.role(), msg.content()});
    ChatOptions options;
    options.add_generation_prompt = true;
    auto ids = m.chat->encode_chat(*m.tokenizer, messages, options);
    if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("chat: ", ids.status().message()));
    return ids;
  }

  absl::StatusOr<Prepared> prepare(const v1::GenerateRequest& r, const AdmitOptions& opts) {
    const size_t size = r.ByteSizeLong();
    if (static_cast<int64_t>(size) > options.max_request_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("the request is ", size, " bytes; the limit is ",
                                                     options.max_request_bytes, " (--max-request-bytes)"));
    }
    auto model = find_model(r.model());
    if (!model.ok()) return model.status();
    Prepared p;
    p.model = *model;
    const ServedModel& m = **model;
    switch (r.prompt_case()) {
      case v1::GenerateRequest::kText: {
        if (r.text().empty()) return absl::InvalidArgumentError("text: the prompt is empty");
        if (auto st = need_tokenizer(m, "text prompts"); !st.ok()) return st;
        EncodeOptions eo;
        eo.add_special_tokens = r.has_add_special_tokens() ? r.add_special_tokens() : true;
        auto ids = m.tokenizer->encode(r.text(), eo);
        if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("text: ", ids.status().message()));
        p.prompt = std::move(*ids);
        break;
      }
      case v1::GenerateRequest::kPromptTokenIds:
        if (r.prompt_token_ids().ids_size() == 0) return absl::InvalidArgumentError("prompt_token_ids: the prompt is empty");
        p.prompt.assign(r.prompt_token_ids().ids().begin(), r.prompt_token_ids().ids().end());
        break;
      case v1::GenerateRequest::kChat: {
        auto ids = chat_ids(m, r.chat());
        if (!ids.ok()) return ids.status();
        p.prompt = std::move(*ids);
        break;
      }
      default:
        return absl::InvalidArgumentError("no prompt: set one of text, prompt_token_ids or chat");
    }
    if (p.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");

    SamplingParams& sp = p.params;
    if (r.has_max_tokens()) sp.max_tokens = r.max_tokens();
    if (r.has_temperature()) sp.temperature = r.temperature();
    if (r.has_top_k()) sp.top_k = r.top_k();
    if (r.has_top_p()) sp.top_p = r.top_p();
    if (r.has_min_p()) sp.min_p = r.min_p();
    if (r.has_seed()) sp.seed = r.seed();
    if (r.has_repetition_penalty()) sp.repetition_penalty = r.repetition_penalty();
    if (r.has_presence_penalty()) sp.presence_penalty = r.presence_penalty();
    if (r.has_frequency_penalty()) sp.frequency_penalty = r.frequency_penalty();
    sp.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
    sp.ignore_eos = r.ignore_eos();
    sp.logprobs = r.has_logprobs() ? r.logprobs() : -1;
    if (sp.max_tokens > kMaxTokensBound) {
      return absl::InvalidArgumentError(absl::StrCat("max_tokens ", sp.max_tokens, " is larger than any model allows"));
    }
    if (r.stop_size() > kMaxStopStrings) {
      return absl::InvalidArgumentError(absl::StrCat("stop: at most ", kMaxStopStrings, " stop strings, got ", r.stop_size()));
    }
    for (const std::string& s : r.stop()) {
      if (s.empty()) return absl::InvalidArgumentError("stop: a stop string is empty");
      p.stop.push_back(s);
    }
    if (!p.stop.empty()) {
      if (auto st = need_tokenizer(m, "stop strings"); !st.ok()) return st;
    }
    p.skip_special_tokens = r.has_skip_special_tokens() ? r.skip_special_tokens() : true;

    // The model's limits, as its workers reported them; checked again against the chosen replica.
    const Registry::ModelState state = registry->model_state(m.spec->name);
    const int64_t prompt_len = static_cast<int64_t>(p.prompt.size());
    if (opts.max_tokens_to_context_end && !r.has_max_tokens() && state.max_model_len > prompt_len) {
      sp.max_tokens = state.max_model_len - prompt_len;
    }
    const int64_t vocab = state.vocab_size > 0 ? state.vocab_size
                          : m.tokenizer       ? m.tokenizer->vocab_size()
                                              : std::numeric_limits<int32_t>::max();
    if (auto st = validate(sp, prompt_len, state.max_model_len > 0 ? state.max_model_len : kMaxTokensBound * 2, vocab);
        !st.ok()) {
      return st;
    }
    if (auto st = check_ids(p.prompt, vocab, "prompt_token_ids"); !st.ok()) return st;
    return p;
  }

  void leave() {
    std::lock_guard lock(in_flight_mu);
    if (--in_flight == 0) in_flight_cv.notify_all();
  }

  // The end of a request, whichever way it ends: its metrics and, for failures, a debug line.
  absl::Status finish(const std::string& label, Clock::time_point arrival, absl::Status s) {
    metrics.request_done(label, status_label(static_cast<int>(s.code())));
    metrics.model(label).e2e_latency->Observe(seconds(Clock::now() - arrival));
    if (!s.ok() && s.code() != absl::StatusCode::kCancelled) {
      spdlog::debug("request failed: {} {}", status_label(static_cast<int>(s.code())), std::string(s.message()));
    }
    return s;
  }

  // A request between admit() and its end: holds an in-flight slot until destroyed.
  struct Admitted final : AdmittedRequest {
    Impl* impl;
    Prepared p;
    Clock::time_point arrival;
    std::string id;
    const CoordinatorMetrics::Model* series;
    bool finished = false;  // its metrics are recorded

    Admitted(Impl* i, Prepared prepared, Clock::time_point t, std::string request_id)
        : impl(i), p(std::move(prepared)), arrival(t), id(std::move(request_id)),
          series(&i->metrics.model(p.model->spec->name)) {
      series->in_flight->Increment();
    }
    ~Admitted() override {
      if (!finished) {
        (void)impl->finish(model(), arrival, absl::CancelledError("the client left before the request started"));
      }
      series->in_flight->Decrement();
      impl->leave();
    }
    absl::Status run(const std::function<bool(const v1::GenerateResponse&)>& emit) override {
      return impl->run(*this, nullptr, emit);
    }
    const std::string& model() const override { return p.model->spec->name; }
    const std::string& request_id() const override { return id; }
    const Tokenizer* tokenizer() const override { return p.model->tokenizer.get(); }
  };

  absl::StatusOr<std::unique_ptr<Admitted>> admit_request(const v1::GenerateRequest& req, const AdmitOptions& opts) {
    const auto arrival = Clock::now();
    std::string label = "unknown";  // the model label of the metrics: only names we serve
    if (auto m = find_model(req.model()); m.ok()) label = (*m)->spec->name;
    if (draining) return finish(label, arrival, absl::UnavailableError("the server is shutting down; retry"));
    auto prepared = prepare(req, opts);
    if (!prepared.ok()) return finish(label, arrival, prepared.status());
    {
      std::lock_guard lock(in_flight_mu);
      if (in_flight >= options.max_in_flight) {
        return finish(label, arrival,
                      absl::ResourceExhaustedError(absl::StrCat("the server is full: ", in_flight,
                                                                " requests in flight (limit ", options.max_in_flight,
                                                                ", --max-in-flight); retry later")));
      }
      ++in_flight;
    }
    const std::string request_id =
        req.request_id().empty() ? absl::StrCat("req-", request_counter.fetch_add(1)) : req.request_id();
    auto admitted = std::make_unique<Admitted>(this, std::move(*prepared), arrival, request_id);
    // No serving group now: fail at once, before a door commits to a response. (A group that
    // fails later is handled by the routing loop in run().)
    const Registry::ModelState state = registry->model_state(label);
    if (state.num_serving == 0) {
      admitted->finished = true;
      const std::string why =
          state.num_groups == 0
              ? absl::StrCat("no group of the cluster config serves model '", label, "'")
              : absl::StrCat("no healthy worker group serves model '", label, "' right now; retry later");
      return finish(label, arrival, absl::UnavailableError(why));
    }
    return admitted;
  }

  // Routes an admitted request and streams it. `ctx` is the gRPC call it came from, or null (the
  // HTTP front): with it, the client's deadline and cancellation reach the worker call.
  absl::Status run(Admitted& a, grpc::ServerContext* ctx,
                   const std::function<bool(const v1::GenerateResponse&)>& emit) {
    if (a.finished) return absl::FailedPreconditionError("the request already ran");
    a.finished = true;
    Prepared& p = a.p;
    const auto arrival = a.arrival;
    const std::string& model = p.model->spec->name;
    const std::string& request_id = a.id;
    const CoordinatorMetrics::Model& series = *a.series;
    auto done = [&](absl::Status s) { return finish(model, arrival, std::move(s)); };

    wv1::WorkerRequest wreq;
    wreq.set_request_id(request_id);
    *wreq.mutable_prompt_token_ids() = {p.prompt.begin(), p.prompt.end()};
    wreq.set_max_tokens(p.params.max_tokens);
    wreq.set_temperature(p.params.temperature);
    wreq.set_top_k(p.params.top_k);
    wreq.set_top_p(p.params.top_p);
    wreq.set_min_p(p.params.min_p);
    if (p.params.seed) wreq.set_seed(*p.params.seed);
    wreq.set_repetition_penalty(p.params.repetition_penalty);
    wreq.set_presence_penalty(p.params.presence_penalty);
    wreq.set_frequency_penalty(p.params.frequency_penalty);
    for (int64_t id : p.params.stop_token_ids) wreq.add_stop_token_ids(static_cast<int32_t>(id));
    wreq.set_ignore_eos(p.params.ignore_eos);
    wreq.set_logprobs(static_cast<int32_t>(p.params.logprobs));
    series.prompt_tokens->Increment(static_cast<double>(p.prompt.size()));

    TextStream text(p.model->tokenizer.get(), p.stop, p.skip_special_tokens);
    const int64_t prompt_len = static_cast<int64_t>(p.prompt.size());
    std::vector<int> excluded;
    int64_t produced = 0;
    int64_t cached_prompt_tokens = 0;
    auto last_token = arrival;
    std::string failures;
    bool sent_metadata = false;
    for (;;) {
      auto route = registry->acquire(model, excluded, prompt_len + p.params.max_tokens);
      if (!route.ok()) {
        if (!failures.empty()) {
          return done(absl::UnavailableError(absl::StrCat(route.status().message(), " (tried: ", failures, ")")));
        }
        return done(route.status());
      }
      struct Release {
        Registry* registry;
        Registry::Route route;
        ~Release() { registry->release(route); }
      } release_guard{registry.get(), *route};
      if (route->max_model_len > 0) {
        absl::Status st = validate(p.params, prompt_len, route->max_model_len, route->vocab_size);
        if (st.ok()) st = check_ids(p.prompt, route->vocab_size, "prompt_token_ids");
        if (!st.ok()) return done(st);
      }

      // gRPC: a child call, so that the client's deadline and cancellation reach the worker.
      // HTTP: a call of its own, cancelled when emit() finds the client gone or at shutdown.
      std::unique_ptr<grpc::ClientContext> call =
          ctx ? grpc::ClientContext::FromServerContext(*ctx) : std::make_unique<grpc::ClientContext>();
      OwnCall own_call(this, ctx ? nullptr : call.get());
      std::unique_ptr<grpc::ClientReader<wv1::WorkerOutput>> reader = route->stub->Generate(call.get(), wreq);
      wv1::WorkerOutput out;
      bool finished = false;
      bool client_gone = false;
      while (reader->Read(&out)) {
        v1::GenerateResponse delta;
        delta.set_request_id(request_id);
        if (out.num_cached_prompt_tokens() > 0) cached_prompt_tokens = out.num_cached_prompt_tokens();
        const int n = out.token_ids_size();
        if (n > 0) {
          const auto now = Clock::now();
          if (produced == 0) {
            series.time_to_first_token->Observe(seconds(now - arrival));
          } else {
            for (int i = 0; i < n; ++i) series.inter_token_latency->Observe(seconds(now - last_token) / n);
          }
          last_token = now;
          produced += n;
          series.generation_tokens->Increment(n);
          *delta.mutable_token_ids() = out.token_ids();
          *delta.mutable_logprobs() = out.logprobs();
          auto t = text.push(std::span<const int32_t>(out.token_ids().data(), n));
          if (!t.ok()) {
            call->TryCancel();
            return done(absl::InternalError(absl::StrCat("detokenizing: ", t.status().message())));
          }
          delta.set_text(std::move(t->text));
          if (t->stop) {
            delta.set_stop(*t->stop);
            delta.set_finish_reason(v1::FINISH_REASON_STOP);
            finished = true;
          }
        }
        if (!finished && out.finished()) {
          if (out.finish_reason() == "abort") break;  // only our own cancellation aborts
          delta.mutable_text()->append(text.finish());
          delta.set_finish_reason(out.finish_reason() == "length" ? v1::FINISH_REASON_LENGTH : v1::FINISH_REASON_STOP);
          finished = true;
        }
        if (finished) {
          delta.mutable_usage()->set_prompt_tokens(prompt_len);
          delta.mutable_usage()->set_completion_tokens(produced);
          delta.mutable_usage()->set_cached_prompt_tokens(cached_prompt_tokens);
        }
        if (!sent_metadata && ctx) {  // which replica served it: for logs, debugging and tests
          ctx->AddInitialMetadata("shardserve-group", route->name);
          sent_metadata = true;
        }
        if (!emit(delta)) {
          client_gone = true;
          break;
        }
        if (finished) break;
      }
      if (client_gone || finished) call->TryCancel();  // a stop string ends it early: free its blocks now
      const grpc::Status ws = reader->Finish();
      if (finished && !client_gone) return done(absl::OkStatus());
      if (client_gone || (ctx && ctx->IsCancelled()) || own_call.cancelled()) {
        // A write that failed because the call's deadline passed (a client that stopped reading,
        // say) is counted as what it is, not as a cancellation.
        if (ctx && std::chrono::system_clock::now() >= ctx->deadline()) {
          return done(absl::DeadlineExceededError("the request's deadline passed"));
        }
        return done(absl::CancelledError("the client cancelled the request"));
      }
      switch (ws.error_code()) {
        case grpc::StatusCode::INVALID_ARGUMENT:
        case grpc::StatusCode::RESOURCE_EXHAUSTED:
        case grpc::StatusCode::DEADLINE_EXCEEDED:
        case grpc::StatusCode::FAILED_PRECONDITION:
        case grpc::StatusCode::OUT_OF_RANGE:
          // About this request, not the replica.
          return done(absl::Status(static_cast<absl::StatusCode>(ws.error_code()), ws.error_message()));
        default:
          break;
      }
      const std::string why = ws.ok() ? "the worker ended the stream early" : ws.error_message();
      registry->report_failure(*route, why);
      if (produced == 0) {
        spdlog::warn("request {}: replica {} failed before the first token ({}); trying another", request_id,
                     route->name, why);
        series.retries->Increment();
        excluded.push_back(route->replica);
        absl::StrAppend(&failures, failures.empty() ? "" : "; ", route->name, ": ", why);
        continue;
      }
      return done(absl::UnavailableError(absl::StrCat("worker group ", route->name, " failed after ", produced,
                                                      " tokens of this request (", why, "); retry the request")));
    }
  }

  // The public API's calls, before anything else: the API key (when the server has one).
  absl::Status authorize(const grpc::ServerContext* ctx) const {
    if (options.api_key.empty()) return absl::OkStatus();
    const auto& md = ctx->client_metadata();
    const auto it = md.find("authorization");
    return check_api_key(options.api_key,
                         it == md.end() ? std::string_view() : std::string_view(it->second.data(), it->second.size()));
  }

  // One gRPC Generate call: the same path as every door.
  grpc::Status serve(grpc::ServerContext* ctx, const v1::GenerateRequest& req,
                     const std::function<bool(const v1::GenerateResponse&)>& emit) {
    if (auto st = authorize(ctx); !st.ok()) return to_grpc(finish("unknown", Clock::now(), st));
    auto admitted = admit_request(req, AdmitOptions{});
    if (!admitted.ok()) return to_grpc(admitted.status());
    return to_grpc(run(**admitted, ctx, emit));
  }

  // ---- the Frontend of the HTTP door ----

  absl::StatusOr<std::unique_ptr<AdmittedRequest>> admit(const v1::GenerateRequest& request,
                                                         const AdmitOptions& opts) override {
    auto admitted = admit_request(request, opts);
    if (!admitted.ok()) return admitted.status();
    return std::unique_ptr<AdmittedRequest>(std::move(*admitted));
  }

  v1::ListModelsResponse list_models() override {
    v1::ListModelsResponse resp;
    ListModels(nullptr, nullptr, &resp);
    return resp;
  }

  bool serving() const override { return !draining; }

  // Worker calls of HTTP requests (gRPC ones are children of their client's call): cancelled
  // together when the server stops.
  std::mutex own_calls_mu;
  std::set<grpc::ClientContext*> own_calls;
  bool own_calls_cancelled = false;

  class OwnCall {
   public:
    OwnCall(Impl* impl, grpc::ClientContext* call) : impl_(impl), call_(call) {
      if (!call_) return;
      std::lock_guard lock(impl_->own_calls_mu);
      impl_->own_calls.insert(call_);
      if (impl_->own_calls_cancelled) call_->TryCancel();
    }
    ~OwnCall() {
      if (!call_) return;
      std::lock_guard lock(impl_->own_calls_mu);
      impl_->own_calls.erase(call_);
    }
    bool cancelled() const {
      if (!call_) return false;
      std::lock_guard lock(impl_->own_calls_mu);
      return impl_->own_calls_cancelled;
    }

   private:
    Impl* impl_;
    grpc::ClientContext* call_;
  };

  void cancel_own_calls() {
    std::lock_guard lock(own_calls_mu);
    own_calls_cancelled = true;
    for (grpc::ClientContext* c : own_calls) c->TryCancel();
  }

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req, v1::GenerateResponse* resp) override {
    return serve(ctx, *req, [&](const v1::GenerateResponse& d) {
      resp->set_request_id(d.request_id());
      resp->mutable_token_ids()->MergeFrom(d.token_ids());
      resp->mutable_text()->append(d.text());
      resp->mutable_logprobs()->MergeFrom(d.logprobs());
      if (d.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        resp->set_finish_reason(d.finish_reason());
        *resp->mutable_usage() = d.usage();
        resp->set_stop(d.stop());
      }
      return true;
    });
  }

  grpc::Status GenerateStream(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                              grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (!stall_guard || !stall_guard->enabled()) {
      return serve(ctx, *req, [&](const v1::GenerateResponse& d) { return writer->Write(d); });
    }
    StallGuard::Call call;
    call.ctx = ctx;
    stall_guard->add(&call);
    const grpc::Status status = serve(ctx, *req, [&](const v1::GenerateResponse& d) {
      call.write_since_ns = StallGuard::now_ns();
      const bool ok = writer->Write(d);
      call.write_since_ns = 0;
      return ok;
    });
    stall_guard->remove(&call);
    return status;
  }

  grpc::Status Tokenize(grpc::ServerContext* ctx, const v1::TokenizeRequest* req, v1::TokenizeResponse* resp) override {
    if (auto st = authorize(ctx); !st.ok()) return to_grpc(st);
    if (static_cast<int64_t>(req->ByteSizeLong()) > options.max_request_bytes) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("the request is larger than ", options.max_request_bytes, " bytes"));
    }
    auto model = find_model(req->model());
    if (!model.ok()) return to_grpc(model.status());
    const ServedModel& m = **model;
    absl::StatusOr<std::vector<int32_t>> ids;
    if (req->input_case() == v1::TokenizeRequest::kText) {
      if (auto st = need_tokenizer(m, "text"); !st.ok()) return to_grpc(st);
      EncodeOptions eo;
      eo.add_special_tokens = req->has_add_special_tokens() ? req->add_special_tokens() : true;
      ids = m.tokenizer->encode(req->text(), eo);
      if (!ids.ok()) ids = absl::InvalidArgumentError(absl::StrCat("text: ", ids.status().message()));
    } else if (req->input_case() == v1::TokenizeRequest::kChat) {
      ids = chat_ids(m, req->chat());
    } else {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "set one of text or chat");
    }
    if (!ids.ok()) return to_grpc(ids.status());
    *resp->mutable_token_ids() = {ids->begin(), ids->end()};
    return grpc::Status::OK;
  }

  grpc::Status ListModels(grpc::ServerContext* ctx, const v1::ListModelsRequest*,
                          v1::ListModelsResponse* resp) override {
    if (ctx) {  // null: the HTTP door's list_models(), which checked the key itself
      if (auto st = authorize(ctx); !st.ok()) return to_grpc(st);
    }
    for (const auto& [name, m] : models) {
      const Registry::ModelState s = registry->model_state(name);
      v1::Model* out = resp->add_models();
      out->set_name(name);
      out->set_has_tokenizer(m.tokenizer != nullptr);
      out->set_has_chat_template(m.chat.has_value());
      out->set_max_model_len(s.max_model_len);
      out->set_vocab_size(s.vocab_size);
      out->set_num_groups(s.num_groups);
      out->set_num_healthy_groups(s.num_serving);
    }
    return grpc::Status::OK;
  }

  grpc::Status Register(grpc::ServerContext*, const wv1::RegisterRequest* req, wv1::Assignment* resp) override {
    auto a = registry->register_worker(*req);
    if (!a.ok()) return to_grpc(a.status());
    *resp = std::move(*a);
    return grpc::Status::OK;
  }

  // ---- lifecycle ----

  absl::Status load_models() {
    for (const ModelSpec& spec : config.models) {
      ServedModel m;
      m.spec = &spec;
      const std::string dir = spec.tokenizer.empty() ? spec.checkpoint : spec.tokenizer;
      const bool explicit_tokenizer = !spec.tokenizer.empty();
      const bool has_file = fs::exists(fs::path(dir) / "tokenizer.json") || fs::is_regular_file(dir);
      if (has_file) {
        auto tok = Tokenizer::load(dir);
        if (!tok.ok()) {
          return absl::Status(tok.status().code(),
                              absl::StrCat("model '", spec.name, "': tokenizer: ", tok.status().message()));
        }
        m.tokenizer = std::move(*tok);
        auto chat = ChatTemplate::load(fs::is_regular_file(dir) ? fs::path(dir).parent_path().string() : dir);
        if (chat.ok()) {
          m.chat = std::move(*chat);
        } else {
          m.no_chat_reason = std::string(chat.status().message());
        }
      } else if (explicit_tokenizer) {
        return absl::NotFoundError(absl::StrCat("model '", spec.name, "': no tokenizer.json in ", dir));
      } else if (!spec.synthetic.empty()) {
        m.no_tokenizer_reason = absl::StrCat("synthetic weights (", spec.synthetic, ") and no tokenizer configured");
        spdlog::info("model '{}': {}; it serves prompt_token_ids only", spec.name, m.no_tokenizer_reason);
      } else {
        m.no_tokenizer_reason = absl::StrCat("no tokenizer.json in ", dir);
        spdlog::warn("model '{}': {}; it serves prompt_token_ids only", spec.name, m.no_tokenizer_reason);
      }
      spdlog::info("model '{}': {} {}, tokenizer {}, chat template {}", spec.name,
                   spec.synthetic.empty() ? "checkpoint" : "synthetic", spec.synthetic.empty() ? spec.checkpoint : spec.synthetic,
                   m.tokenizer ? "yes" : "no", m.chat ? "yes" : "no");
      models.emplace(spec.name, std::move(m));
    }
    return absl::OkStatus();
  }

  void write_ready_file() {
    nlohmann::json j;
    const std::string host = options.host == "0.0.0.0" ? "127.0.0.1" : options.host;
    j["address"] = absl::StrCat(host, ":", port);
    j["worker_address"] = absl::StrCat(host, ":", worker_port);
    j["metrics_address"] = metrics_port >= 0 ? absl::StrCat(host, ":", metrics_port) : "";
    j["http_address"] = http_port >= 0 ? absl::StrCat(host, ":", http_port) : "";
    j["groups"] = registry->describe();
    const std::string tmp = options.ready_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << j.dump(2) << "\n";
    }
    fs::rename(tmp, options.ready_file);
    spdlog::info("every group is serving; wrote {}", options.ready_file);
  }

  void start_ready_watch() {
    if (options.ready_file.empty()) return;
    ready_thread = std::thread([this] {
      std::unique_lock lock(ready_mu);
      while (!ready_stop) {
        if (registry->all_serving()) {
          write_ready_file();
          return;
        }
        ready_cv.wait_for(lock, std::chrono::milliseconds(50), [this] { return ready_stop; });
      }
    });
  }
};

Coordinator::Coordinator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Coordinator::~Coordinator() {
  if (!impl_) return;
  {
    std::lock_guard lock(impl_->ready_mu);
    impl_->ready_stop = true;
  }
  impl_->ready_cv.notify_all();
  if (impl_->ready_thread.joinable()) impl_->ready_thread.join();
  if (impl_->http) {
    impl_->cancel_own_calls();
    impl_->http->stop();
  }
  if (impl_->server) impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (impl_->worker_server) impl_->worker_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  impl_->registry->stop_health_checks();
}

int Coordinator::port() const { return impl_->port; }
int Coordinator::http_port() const { return impl_->http_port; }
int Coordinator::worker_port() const { return impl_->worker_port; }
Frontend& Coordinator::frontend() { return *impl_; }

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::start(const CoordinatorOptions& options,
                                                                 ClusterConfig config) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->stall_guard = std::make_unique<StallGuard>(options.stream_stall_timeout);
  impl->config = std::move(config);
  if (auto st = impl->load_models(); !st.ok()) return st;
  RegistryOptions ro;
  ro.health_interval = options.health_interval;
  ro.health_timeout = options.health_timeout;
  ro.dead_after = options.dead_after;
  impl->registry = std::make_unique<Registry>(impl->config, ro, &impl->metrics);

  if (options.metrics_port >= 0) {
    try {
      impl->exposer = std::make_unique<prometheus::Exposer>(absl::StrCat(options.host, ":", options.metrics_port));
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("cannot serve metrics on ", options.host, ":", options.metrics_port, ": ", e.what()));
    }
    impl->exposer->RegisterCollectable(impl->metrics.registry());
    impl->metrics_port = impl->exposer->GetListeningPorts().at(0);
  }

  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty();
  if (tls && (options.tls_cert.empty() || options.tls_key.empty())) {
    return absl::InvalidArgumentError("TLS needs both --tls-cert and --tls-key");
  }
  if (!tls && !options.tls_client_ca.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key (TLS)");
  }
  if ((tls || !options.api_key.empty()) && options.worker_port < 0) {
    return absl::InvalidArgumentError(
        "with TLS or an API key, workers register on a port of their own: set --worker-port (plaintext, for the "
        "cluster's internal network)");
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls) {
    auto cert = read_pem(options.tls_cert, "--tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = read_pem(options.tls_key, "--tls-key");
    if (!key.ok()) return key.status();
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (!options.tls_client_ca.empty()) {
      auto ca = read_pem(options.tls_client_ca, "--tls-client-ca");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = std::move(*ca);
      ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    ssl.pem_key_cert_pairs.push_back({std::move(*key), std::move(*cert)});
    credentials = grpc::SslServerCredentials(ssl);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(options.host, ":", options.port);
  // Without SO_REUSEPORT (gRPC sets it by default): a second server on a taken port must fail to
  // start, not share the port and answer half the connections with its own services.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(address, credentials, &impl->port);
  // Above our own limit, so that an oversized request gets our INVALID_ARGUMENT, not gRPC's error.
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::max<int64_t>(options.max_request_bytes * 4, 16 << 20)));
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<ParseErrorInterceptorFactory>());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.RegisterService(static_cast<v1::Generation::Service*>(impl.get()));
  if (options.worker_port < 0) builder.RegisterService(static_cast<wv1::Registry::Service*>(impl.get()));
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address,
                     tls ? " (is the port in use, or are the TLS certificate and key invalid?)" : " (is the port in use?)"));
  }
  impl->worker_port = impl->port;
  if (options.worker_port >= 0) {
    // Plaintext and without the key: workers hold neither. The Registry alone is served here (and
    // health, for probes that cannot speak TLS); the public API is not.
    grpc::ServerBuilder worker_builder;
    const std::string worker_address = absl::StrCat(options.host, ":", options.worker_port);
    worker_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    worker_builder.AddListeningPort(worker_address, grpc::InsecureServerCredentials(), &impl->worker_port);
    worker_builder.RegisterService(static_cast<wv1::Registry::Service*>(impl.get()));
    impl->worker_server = worker_builder.BuildAndStart();
    if (!impl->worker_server || impl->worker_port == 0) {
      impl->server->Shutdown();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", worker_address, " (is the port in use?)"));
    }
  }
  if (options.http_port >= 0) {
    // A client that leaves mid-stream must cost a failed write, not the process: httplib sends
    // without MSG_NOSIGNAL.
    signal(SIGPIPE, SIG_IGN);
    HttpOptions ho;
    ho.host = options.host;
    ho.port = options.http_port;
    ho.threads = options.http_threads;
    ho.max_body_bytes = options.max_request_bytes;
    ho.tls_cert = options.tls_cert;
    ho.tls_key = options.tls_key;
    ho.tls_client_ca = options.tls_client_ca;
    ho.api_key = options.api_key;
    auto http = HttpServer::start(impl.get(), ho);
    if (!http.ok()) {
      impl->server->Shutdown();
      if (impl->worker_server) impl->worker_server->Shutdown();
      return http.status();
    }
    impl->http = std::move(*http);
    impl->http_port = impl->http->port();
  }
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  // Probes that cannot speak TLS (Kubernetes' gRPC probe) check the plaintext worker port.
  if (impl->worker_server) impl->worker_server->GetHealthCheckService()->SetServingStatus(true);
  impl->registry->start_health_checks();
  impl->start_ready_watch();
  spdlog::info("shardserve-coordinator listening on {}:{}{}{}{}{}{}", options.host, impl->port, tls ? " (TLS)" : "",
               options.api_key.empty() ? "" : " (API key)",
               impl->worker_server ? absl::StrCat(", workers register on :", impl->worker_port) : "",
               impl->metrics_port >= 0 ? absl::StrCat(", metrics on :", impl->metrics_port) : "",
               impl->http_port >= 0 ? absl::StrCat(", HTTP (OpenAI API) on :", impl->http_port) : "");
  return std::unique_ptr<Coordinator>(new Coordinator(std::move(impl)));
}

void Coordinator::drain_and_stop() {
  Impl& impl = *impl_;
  impl.draining = true;
  impl.server->GetHealthCheckService()->SetServingStatus(false);
  if (impl.worker_server) impl.worker_server->GetHealthCheckService()->SetServingStatus(false);
  {
    std::unique_lock lock(impl.in_flight_mu);
    spdlog::info("draining: {} requests in flight, waiting up to {} ms", impl.in_flight,
                 impl.options.shutdown_timeout.count());
    impl.in_flight_cv.wait_for(lock, impl.options.shutdown_timeout, [&] { return impl.in_flight == 0; });
    if (impl.in_flight > 0) spdlog::warn("shutdown timeout: cancelling {} requests", impl.in_flight);
  }
  if (impl.http) {
    impl.cancel_own_calls();
    impl.http->stop();
  }
  impl.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (impl.worker_server) impl.worker_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  impl.registry->stop_health_checks();
}

}  // namespace shardserve
