// `shardserve bench`: a load generator against a running server (shardserve serve, or a
// coordinator), through the public streaming API (GenerateStream), as a client would use it.
//
//   closed loop: shardserve bench --target 127.0.0.1:50051 --concurrency 8 --num-requests 256
//                    --input-len 128 --output-len 128 --warmup 8
//   open loop:   shardserve bench --request-rate 4 --num-requests 200 --input-len uniform:64:256
//                    --output-len normal:128:32 --seed 1 --output json --samples-file s.jsonl
//
// Closed loop: --concurrency N requests in flight, each followed at once by the next until
// --num-requests are done. Open loop: Poisson arrivals at --request-rate R per second
// (exponential gaps; "inf" sends them all at once), any number in flight unless
// --max-concurrency caps it (an arrival then waits for a free slot and is timed from its send).
// --warmup requests run first, closed loop, and are not counted.
//
// Prompts are synthetic token ids (prompt_token_ids, uniform over a safe range of the vocab:
// see kFirstSyntheticId) of --input-len tokens, or the lines of --prompt-file (text, or JSON lines
// with "prompt" or "prompt_token_ids"), taken in file order and cycled. Every request sets
// max_tokens to its drawn output length with ignore_eos and no stop strings, so a request that
// succeeds produces exactly that many tokens (output_tokens_mismatched counts any that did not).
// Metrics and their conventions: worker/cli/bench_stats.h.
//
// The report (a table, or --output json: one line on stdout) is written however the run ends;
// the exit status is 0 when every measured request succeeded, 1 when any failed (errors_by_code
// says how: an unknown --model gives NOT_FOUND for each), 130 after Ctrl-C (in-flight requests
// are cancelled; the report covers those that finished), and 2, with no report, when the bench
// could not start (bad arguments, unreadable --prompt-file, server unreachable). A progress line
// goes to stderr.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "shardserve/v1/generation.grpc.pb.h"
#include "worker/cli/bench_stats.h"
#include "worker/cli/commands.h"

namespace shardserve::cli {
namespace {

namespace v1 = shardserve::v1;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using bench::LengthDist;
using bench::RequestRecord;

// Synthetic prompt ids are drawn from [kFirstSyntheticId, min(vocab, kLlama3FirstSpecialId)):
// the low ids hold Llama 2's control and byte-fallback tokens, and from 128000 on Llama 3 keeps
// its special tokens (BOS, headers, EOT), which would change what the model does with the prompt.
constexpr int64_t kFirstSyntheticId = 100;
constexpr int64_t kLlama3FirstSpecialId = 128000;
// When the server does not say (and --vocab-size is not given): Llama 2's vocab, the smallest of
// the family, so the ids are valid for every Llama.
constexpr int64_t kDefaultVocabSize = 32000;
constexpr int kCannotRun = 2;  // the exit status when no request was sent
constexpr double kDefaultTimeoutS = 600;

struct BenchArgs {
  std::string target = "127.0.0.1:50051";
  std::string model;
  int64_t concurrency = 0;
  double request_rate = 0;
  int64_t max_concurrency = 0;
  int64_t num_requests = 100;
  int64_t warmup = 0;
  std::string input_len = "128";
  std::string output_len = "128";
  std::string prompt_file;
  int64_t vocab_size = 0;
  std::optional<uint64_t> seed;  // unset: a fresh one, reported, so no run meets another's prompts
  double temperature = 0;
  double timeout = kDefaultTimeoutS;
  std::string output = "table";
  std::string output_file;
  std::string samples_file;
  double progress_interval = 1;
};

// What one request sends: a prompt (ids or text) and its output length.
struct PlannedRequest {
  std::vector<int32_t> prompt_ids;
  std::string prompt_text;
  int64_t max_tokens = 0;
};

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

absl::StatusOr<std::vector<PlannedRequest>> read_prompt_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--prompt-file: cannot open ", path));
  std::vector<PlannedRequest> prompts;
  std::string line;
  for (int line_no = 1; std::getline(in, line); ++line_no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    PlannedRequest p;
    if (line.front() == '{') {  // a JSON line: {"prompt": "..."} or {"prompt_token_ids": [...]}
      const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("prompt") && j["prompt"].is_string()) {
        p.prompt_text = j["prompt"].get<std::string>();
      } else if (j.is_object() && j.contains("prompt_token_ids") && j["prompt_token_ids"].is_array() &&
                 !j["prompt_token_ids"].empty() &&
                 std::all_of(j["prompt_token_ids"].begin(), j["prompt_token_ids"].end(),
                             [](const json& v) { return v.is_number_integer(); })) {
        p.prompt_ids = j["prompt_token_ids"].get<std::vector<int32_t>>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(path, ":", line_no,
                                                       ": a JSON line needs \"prompt\" (a string) or "
                                                       "\"prompt_token_ids\" (a list of integers)"));
      }
    } else {
      p.prompt_text = line;
    }
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat("--prompt-file: ", path, " has no prompts"));
  return prompts;
}

// Counters the progress line reads while requests run.
struct Progress {
  std::atomic<int64_t> done{0}, errors{0}, in_flight{0}, output_tokens{0};
  std::atomic<int64_t> total{0};
  std::atomic<bool> measured{false};
  std::atomic<int64_t> phase_start_ns{0};  // Clock time of the phase start
};

class Load;

// One streaming call; reports its tokens and its end to the Load. Owned by the Load until the
// phase ends, so a cancellation never reaches a freed call.
class Call final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  Call(Load* load, RequestRecord* record, v1::GenerateRequest request)
      : load_(load), record_(record), request_(std::move(request)) {}
  void start(v1::Generation::Stub* stub, Clock::time_point phase_start, double timeout_s);
  void cancel() { ctx_.TryCancel(); }
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& s) override;

 private:
  Load* load_;
  RequestRecord* record_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  grpc::ClientContext ctx_;
  Clock::time_point phase_start_;
};

// Runs phases of requests (the warm-up, then the measured run) and can be interrupted from
// another thread. in_flight_ counts calls started whose OnDone has not run.
class Load {
 public:
  Load(v1::Generation::Stub* stub, const BenchArgs& args, Progress* progress)
      : stub_(stub), args_(args), progress_(progress) {}

  // Sends requests[i] for each i in [first, first + count): closed loop when arrivals is empty
  // (at most `slots` in flight), else request k is sent at arrivals[k] seconds after the phase
  // start, with at most `slots` in flight when slots > 0. Returns the records of the requests
  // that were sent, and of those a Ctrl-C cancelled none.
  std::vector<RequestRecord> run(const std::vector<PlannedRequest>& requests, size_t first, size_t count,
                                 int64_t slots, const std::vector<double>& arrivals, bool measured) {
    std::vector<RequestRecord> records(count);
    std::vector<std::unique_ptr<Call>> calls;
    calls.reserve(count);
    const Clock::time_point start = Clock::now();
    progress_->done = 0;
    progress_->errors = 0;
    progress_->output_tokens = 0;
    progress_->total = static_cast<int64_t>(count);
    progress_->measured = measured;
    progress_->phase_start_ns = start.time_since_epoch().count();
    {
      std::unique_lock lock(mu_);
      for (size_t k = 0; k < count && !interrupted_; ++k) {
        if (!arrivals.empty()) {
          const auto when = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(arrivals[k]));
          cv_.wait_until(lock, when, [&] { return interrupted_; });
        }
        cv_.wait(lock, [&] { return interrupted_ || slots <= 0 || in_flight_ < slots; });
        if (interrupted_) break;
        records[k].index = static_cast<int64_t>(first + k);
        calls.push_back(std::make_unique<Call>(this, &records[k], make_request(requests[first + k], first + k)));
        records[k].requested_output_tokens = requests[first + k].max_tokens;
        records[k].prompt_tokens = static_cast<int64_t>(requests[first + k].prompt_ids.size());
        ++in_flight_;
        ++progress_->in_flight;
        active_.push_back(calls.back().get());
        // Started outside the lock, which OnDone takes (gRPC may run it on this thread). A
        // cancellation that comes first is kept by the ClientContext and applied at the start.
        lock.unlock();
        calls.back()->start(stub_, start, args_.timeout);
        lock.lock();
      }
      cv_.wait(lock, [&] { return in_flight_ == 0 && !cancelling_; });
      active_.clear();
    }
    records.resize(calls.size());
    if (interrupted()) {  // what Ctrl-C cancelled did not finish: not part of the report
      std::erase_if(records, [](const RequestRecord& r) { return r.status_code == grpc::StatusCode::CANCELLED; });
    }
    return records;
  }

  // Stops sending and cancels the calls in flight (from the signal thread).
  void interrupt() {
    std::unique_lock lock(mu_);
    interrupted_ = true;
    cancelling_ = true;
    const std::vector<Call*> active = active_;
    // Outside the lock: a cancellation may run OnDone, which takes it. cancelling_ keeps run()
    // (and so the calls) from ending meanwhile.
    lock.unlock();
    for (Call* c : active) c->cancel();
    lock.lock();
    cancelling_ = false;
    cv_.notify_all();
  }

  bool interrupted() {
    std::lock_guard lock(mu_);
    return interrupted_;
  }

  void tokens_arrived(int n) { progress_->output_tokens += n; }

  void finished(Call* call, grpc::StatusCode code) {
    std::lock_guard lock(mu_);
    std::erase(active_, call);
    --in_flight_;
    --progress_->in_flight;
    ++progress_->done;
    if (code != grpc::StatusCode::OK && !(interrupted_ && code == grpc::StatusCode::CANCELLED)) ++progress_->errors;
    // Under the lock: once it is released, run() may return and the Load go away.
    cv_.notify_all();
  }

 private:
  v1::GenerateRequest make_request(const PlannedRequest& p, size_t index) const {
    v1::GenerateRequest req;
    req.set_model(args_.model);
    if (!p.prompt_ids.empty()) {
      *req.mutable_prompt_token_ids()->mutable_ids() = {p.prompt_ids.begin(), p.prompt_ids.end()};
    } else {
      req.set_text(p.prompt_text);
    }
    req.set_max_tokens(p.max_tokens);
    req.set_ignore_eos(true);
    req.set_temperature(args_.temperature);
    req.set_seed(*args_.seed + index);
    req.set_request_id(absl::StrCat("bench-", index));
    return req;
  }

  v1::Generation::Stub* stub_;
  const BenchArgs& args_;
  Progress* progress_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t in_flight_ = 0;
  std::vector<Call*> active_;
  bool interrupted_ = false;
  bool cancelling_ = false;
};

void Call::start(v1::Generation::Stub* stub, Clock::time_point phase_start, double timeout_s) {
  phase_start_ = phase_start;
  const auto now = Clock::now();
  ctx_.set_deadline(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(timeout_s)));
  record_->send_s = seconds(now - phase_start_);
  stub->async()->GenerateStream(&ctx_, &request_, this);
  StartRead(&response_);
  StartCall();
}

void Call::OnReadDone(bool ok) {
  if (!ok) return;  // the stream is over; OnDone follows with the status
  const double now = seconds(Clock::now() - phase_start_);
  const int n = response_.token_ids_size();
  if (n > 0) {
    record_->chunks.emplace_back(now, n);
    load_->tokens_arrived(n);
  }
  if (response_.has_usage()) {
    record_->prompt_tokens = response_.usage().prompt_tokens();
    record_->cached_prompt_tokens = response_.usage().cached_prompt_tokens();
  }
  StartRead(&response_);
}

void Call::OnDone(const grpc::Status& s) {
  record_->end_s = seconds(Clock::now() - phase_start_);
  record_->status_code = static_cast<int>(s.error_code());
  record_->error_message = s.error_message();
  load_->finished(this, s.error_code());
}

// Blocks SIGINT/SIGTERM in every thread (call before any thread starts) so that only the
// monitor thread takes them, with sigtimedwait.
void block_signals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
}

bool got_signal(std::chrono::milliseconds timeout) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  const timespec ts{static_cast<time_t>(timeout.count() / 1000), static_cast<long>(timeout.count() % 1000) * 1000000};
  return sigtimedwait(&signals, nullptr, &ts) > 0;
}

// The progress line on stderr and Ctrl-C, on their own thread while the load runs. On a
// terminal the line is redrawn in place; otherwise one line per interval.
class Monitor {
 public:
  Monitor(Load* load, const Progress* progress, double interval_s)
      : load_(load), progress_(progress), interval_s_(interval_s), tty_(isatty(STDERR_FILENO) != 0) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Monitor() {
    stop_ = true;
    thread_.join();
    if (interval_s_ > 0) print(/*last=*/true);
  }

 private:
  void loop() {
    auto next = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(interval_s_));
    while (!stop_) {
      if (got_signal(std::chrono::milliseconds(100))) {
        if (load_->interrupted()) std::_Exit(130);  // a second Ctrl-C: stop now, no report
        std::cerr << (tty_ ? "\n" : "") << "bench: interrupted; cancelling the requests in flight (Ctrl-C again to quit now)\n";
        load_->interrupt();
      }
      if (interval_s_ > 0 && Clock::now() >= next) {
        print(/*last=*/false);
        next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(interval_s_));
      }
    }
  }

  void print(bool last) {
    const double elapsed =
        seconds(Clock::now().time_since_epoch() - Clock::duration(progress_->phase_start_ns.load()));
    const int64_t tokens = progress_->output_tokens;
    char line[256];
    std::snprintf(line, sizeof(line), "bench: %s %lld/%lld done, %lld errors, %lld in flight, %.1f output tok/s, %.1f s",
                  progress_->measured ? "measured" : "warm-up", static_cast<long long>(progress_->done.load()),
                  static_cast<long long>(progress_->total.load()), static_cast<long long>(progress_->errors.load()),
                  static_cast<long long>(progress_->in_flight.load()), elapsed > 0 ? tokens / elapsed : 0.0, elapsed);
    if (tty_) {
      std::cerr << "\r" << line << "\033[K" << (last ? "\n" : "") << std::flush;
    } else {
      std::cerr << line << "\n" << std::flush;
    }
  }

  Load* load_;
  const Progress* progress_;
  double interval_s_;
  bool tty_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

// The command that reproduces the run (what the report prints as the exact command).
std::string command_line(const BenchArgs& a, bool open_loop) {
  std::vector<std::string> parts = {"shardserve bench", "--target " + a.target, "--model " + a.model};
  if (open_loop) {
    parts.push_back(std::isinf(a.request_rate) ? "--request-rate inf" : absl::StrCat("--request-rate ", a.request_rate));
    if (a.max_concurrency > 0) parts.push_back(absl::StrCat("--max-concurrency ", a.max_concurrency));
  } else {
    parts.push_back(absl::StrCat("--concurrency ", a.concurrency));
  }
  parts.push_back(absl::StrCat("--num-requests ", a.num_requests));
  if (a.warmup > 0) parts.push_back(absl::StrCat("--warmup ", a.warmup));
  if (a.prompt_file.empty()) {
    parts.push_back("--input-len " + a.input_len);
  } else {
    parts.push_back("--prompt-file " + a.prompt_file);
  }
  parts.push_back("--output-len " + a.output_len);
  parts.push_back(absl::StrCat("--seed ", *a.seed));
  if (a.temperature != 0) parts.push_back(absl::StrCat("--temperature ", a.temperature));
  if (a.vocab_size > 0) parts.push_back(absl::StrCat("--vocab-size ", a.vocab_size));
  if (a.timeout != kDefaultTimeoutS) parts.push_back(absl::StrCat("--timeout ", a.timeout));
  return absl::StrJoin(parts, " ");
}

void print_table(const json& r, std::ostream& out) {
  char line[256];
  out << r["command"].get<std::string>() << "\n";
  const auto row = [&](const char* name, const std::string& value) {
    std::snprintf(line, sizeof(line), "  %-28s %s\n", name, value.c_str());
    out << line;
  };
  const auto num = [](double v, int digits) {
    char text[64];
    std::snprintf(text, sizeof(text), "%.*f", digits, v);
    return std::string(text);
  };
  row("completed requests", std::to_string(r["completed"].get<int64_t>()));
  row("errors", std::to_string(r["errors"].get<int64_t>()));
  for (const auto& [code, n] : r["errors_by_code"].items()) {
    row(("  " + code).c_str(), std::to_string(n.get<int64_t>()) + ": " + r["error_messages"][code].get<std::string>());
  }
  if (r["interrupted"].get<bool>()) row("interrupted", "yes (Ctrl-C): partial results");
  row("duration (s)", num(r["duration_s"], 3));
  row("requests/s", num(r["requests_per_s"], 3));
  row("output tokens/s", num(r["output_tokens_per_s"], 1));
  row("input tokens/s", num(r["input_tokens_per_s"], 1));
  row("input tokens", std::to_string(r["total_input_tokens"].get<int64_t>()) + " (" +
                          std::to_string(r["total_cached_prompt_tokens"].get<int64_t>()) + " from the prefix cache)");
  row("output tokens", std::to_string(r["total_output_tokens"].get<int64_t>()) + " (requested " +
                           std::to_string(r["requested_output_tokens"].get<int64_t>()) + ")");
  std::snprintf(line, sizeof(line), "\n  %-12s %10s %10s %10s %10s\n", "latency (ms)", "mean", "p50", "p90", "p99");
  out << line;
  for (const auto& [label, key] : {std::pair{"TTFT", "ttft"}, {"ITL", "itl"}, {"TPOT", "tpot"}, {"E2E", "e2e"}}) {
    const std::string k = key;
    std::snprintf(line, sizeof(line), "  %-12s %10.2f %10.2f %10.2f %10.2f\n", label, r[k + "_mean_s"].get<double>() * 1e3,
                  r[k + "_p50_s"].get<double>() * 1e3, r[k + "_p90_s"].get<double>() * 1e3, r[k + "_p99_s"].get<double>() * 1e3);
    out << line;
  }
}

int run_bench(BenchArgs a) {
  const bool open_loop = a.request_rate > 0;
  if (!open_loop && a.concurrency <= 0) a.concurrency = 1;
  if (a.num_requests < 1) {
    std::cerr << "error: --num-requests must be at least 1\n";
    return kCannotRun;
  }
  absl::StatusOr<LengthDist> input_len = LengthDist::parse(a.input_len);
  absl::StatusOr<LengthDist> output_len = LengthDist::parse(a.output_len);
  for (const auto* d : {&input_len, &output_len}) {
    if (!d->ok()) {
      std::cerr << "error: " << d->status().message() << "\n";
      return kCannotRun;
    }
  }
  std::vector<PlannedRequest> prompts;
  if (!a.prompt_file.empty()) {
    auto read = read_prompt_file(a.prompt_file);
    if (!read.ok()) {
      std::cerr << "error: " << read.status().message() << "\n";
      return kCannotRun;
    }
    prompts = std::move(*read);
  }

  block_signals();  // before gRPC starts its threads, so they inherit the mask
  auto channel = grpc::CreateChannel(a.target, grpc::InsecureChannelCredentials());
  auto stub = v1::Generation::NewStub(channel);

  // The model's vocab and length, from the server; an unknown model is benchmarked anyway, so
  // that its errors are counted and reported like any others.
  int64_t max_model_len = 0;
  int64_t server_vocab = 0;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ListModelsResponse listed;
    if (grpc::Status s = stub->ListModels(&ctx, {}, &listed); !s.ok()) {
      std::cerr << "error: cannot reach the server at " << a.target << ": " << bench::status_code_name(s.error_code())
                << ": " << s.error_message() << "\n";
      return kCannotRun;
    }
    std::vector<std::string> names;
    for (const auto& m : listed.models()) names.push_back(m.name());
    if (a.model.empty()) {
      if (names.size() != 1) {
        std::cerr << "error: the server serves " << names.size() << " models (" << absl::StrJoin(names, ", ")
                  << "): choose one with --model\n";
        return kCannotRun;
      }
      a.model = names.front();
    }
    bool found = false;
    for (const auto& m : listed.models()) {
      if (m.name() != a.model) continue;
      found = true;
      max_model_len = m.max_model_len();
      server_vocab = m.vocab_size();
    }
    if (!found) {
      std::cerr << "warning: the server does not serve a model '" << a.model << "' (it serves: "
                << absl::StrJoin(names, ", ") << "); its requests will fail\n";
    }
  }
  const int64_t vocab = a.vocab_size > 0 ? a.vocab_size : server_vocab > 0 ? server_vocab : kDefaultVocabSize;
  const int64_t id_hi = std::min(vocab, kLlama3FirstSpecialId);
  const int64_t id_lo = id_hi > 2 * kFirstSyntheticId ? kFirstSyntheticId : 0;
  if (a.prompt_file.empty() && max_model_len > 0 && input_len->upper_bound() + output_len->upper_bound() > max_model_len) {
    std::cerr << "warning: --input-len + --output-len can reach " << input_len->upper_bound() + output_len->upper_bound()
              << " tokens, past the model's " << max_model_len << ": those requests will fail (INVALID_ARGUMENT)\n";
  }

  // The plan, drawn before anything is sent: warm-up requests first, then the measured ones.
  if (!a.seed) a.seed = (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
  const size_t total = static_cast<size_t>(a.warmup + a.num_requests);
  std::mt19937_64 rng(*a.seed);
  std::vector<PlannedRequest> plan(total);
  for (size_t i = 0; i < total; ++i) {
    if (!prompts.empty()) {
      plan[i] = prompts[i % prompts.size()];
    } else {
      std::uniform_int_distribution<int32_t> token(static_cast<int32_t>(id_lo), static_cast<int32_t>(id_hi - 1));
      plan[i].prompt_ids.resize(static_cast<size_t>(input_len->sample(rng)));
      for (int32_t& id : plan[i].prompt_ids) id = token(rng);
    }
    plan[i].max_tokens = output_len->sample(rng);
  }
  std::vector<double> arrivals;
  if (open_loop) {
    std::mt19937_64 arrival_rng(*a.seed ^ 0x9e3779b97f4a7c15ULL);  // independent of the lengths drawn
    std::exponential_distribution<double> gap(std::isinf(a.request_rate) ? 1.0 : a.request_rate);
    double t = 0;
    for (int64_t i = 0; i < a.num_requests; ++i) {
      arrivals.push_back(std::isinf(a.request_rate) ? 0.0 : t);
      t += gap(arrival_rng);
    }
  }

  Progress progress;
  progress.phase_start_ns = Clock::now().time_since_epoch().count();
  progress.measured = a.warmup == 0;  // what the first progress line says, before run() starts
  progress.total = a.warmup > 0 ? a.warmup : a.num_requests;
  Load load(stub.get(), a, &progress);
  std::vector<RequestRecord> records;
  int64_t warmup_errors = 0;
  {
    Monitor monitor(&load, &progress, a.progress_interval);
    if (a.warmup > 0) {
      const int64_t slots = open_loop ? (a.max_concurrency > 0 ? a.max_concurrency : a.warmup) : a.concurrency;
      for (const RequestRecord& r : load.run(plan, 0, static_cast<size_t>(a.warmup), slots, {}, false)) {
        warmup_errors += r.ok() ? 0 : 1;
      }
    }
    if (!load.interrupted()) {
      records = load.run(plan, static_cast<size_t>(a.warmup), static_cast<size_t>(a.num_requests),
                         open_loop ? a.max_concurrency : a.concurrency, arrivals, true);
    }
  }

  json report = {
      {"target", a.target},
      {"model", a.model},
      {"mode", open_loop ? "open" : "closed"},
      {"concurrency", open_loop ? json(nullptr) : json(a.concurrency)},
      {"request_rate", !open_loop ? json(nullptr) : std::isinf(a.request_rate) ? json("inf") : json(a.request_rate)},
      {"max_concurrency", open_loop && a.max_concurrency > 0 ? json(a.max_concurrency) : json(nullptr)},
      {"num_requests", a.num_requests},
      {"warmup", a.warmup},
      {"warmup_errors", warmup_errors},
      {"input_len", a.prompt_file.empty() ? json(input_len->to_string()) : json(nullptr)},
      {"output_len", output_len->to_string()},
      {"prompt_file", a.prompt_file.empty() ? json(nullptr) : json(a.prompt_file)},
      {"vocab_size", vocab},
      {"token_id_range", a.prompt_file.empty() ? json::array({id_lo, id_hi}) : json(nullptr)},
      {"ignore_eos", true},
      {"temperature", a.temperature},
      {"seed", *a.seed},
      {"timeout_s", a.timeout},
      {"max_model_len", max_model_len},
      {"interrupted", load.interrupted()},
      {"date", utc_now()},
      {"command", command_line(a, open_loop)},
      {"samples_file", a.samples_file.empty() ? json(nullptr) : json(a.samples_file)},
  };
  report.update(bench::summarize_run(records));

  if (!a.samples_file.empty()) {
    std::ofstream samples(a.samples_file);
    for (const RequestRecord& r : records) samples << bench::sample_json(r).dump() << "\n";
    if (!samples) std::cerr << "error: cannot write " << a.samples_file << "\n";
  }
  if (!a.output_file.empty()) {
    std::ofstream file(a.output_file);
    file << report.dump(2) << "\n";
    if (!file) std::cerr << "error: cannot write " << a.output_file << "\n";
  }
  if (a.output == "json") {
    std::cout << report.dump() << "\n";
  } else {
    print_table(report, std::cout);
  }
  if (load.interrupted()) return 130;
  return report["errors"].get<int64_t>() > 0 ? 1 : 0;
}

}  // namespace

void register_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand("bench", "Load a running server with requests and report latency and throughput");
  cmd->add_option("--target", a->target, "The server, host:port")->capture_default_str();
  cmd->add_option("--model", a->model, "Model name (default: the server's only model)");
  auto* concurrency = cmd->add_option("--concurrency", a->concurrency,
                                      "Closed loop: requests in flight, each followed at once by the next (default 1)");
  auto* rate = cmd->add_option("--request-rate", a->request_rate,
                               "Open loop: Poisson arrivals, requests per second (inf: all at once)");
  // CLI::PositiveNumber stops at the largest double, and "inf" is a rate here.
  rate->check(CLI::Validator(
      [](std::string& text) {
        double v = 0;
        return CLI::detail::lexical_cast(text, v) && v > 0 ? std::string() : "must be > 0 or inf";
      },
      "POSITIVE|inf"));
  concurrency->check(CLI::PositiveNumber)->excludes(rate);
  cmd->add_option("--max-concurrency", a->max_concurrency, "Open loop: most requests in flight (default: no limit)")
      ->check(CLI::PositiveNumber)
      ->needs(rate);
  cmd->add_option("--num-requests", a->num_requests, "Measured requests")->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Requests sent first and not counted")->capture_default_str()->check(CLI::NonNegativeNumber);
  auto* input = cmd->add_option("--input-len", a->input_len,
                                "Prompt tokens: N, uniform:LOW:HIGH or normal:MEAN:STD (synthetic ids)")
                    ->capture_default_str();
  cmd->add_option("--output-len", a->output_len, "Output tokens, forced (ignore_eos): N, uniform:LOW:HIGH or normal:MEAN:STD")
      ->capture_default_str();
  cmd->add_option("--prompt-file", a->prompt_file,
                  "Prompts instead of synthetic ids: one text per line, or JSON lines with \"prompt\" or "
                  "\"prompt_token_ids\"; used in order, cycled")
      ->excludes(input);
  cmd->add_option("--vocab-size", a->vocab_size,
                  "Synthetic ids are drawn from [100, min(vocab, 128000)) (default: the model's vocab as the server "
                  "reports it, else 32000)");
  cmd->add_option_function<uint64_t>(
      "--seed", [a](const uint64_t& seed) { a->seed = seed; },
      "Seeds the lengths, the ids, the arrivals and the requests' sampling (default: a fresh seed, "
                  "reported; the server's prefix cache would serve a repeated seed's prompts)");
  cmd->add_option("--temperature", a->temperature, "Sampling temperature of every request (0 = greedy)")->capture_default_str();
  cmd->add_option("--timeout", a->timeout, "Deadline of each request in seconds (DEADLINE_EXCEEDED counts as an error)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--output", a->output, "table or json (one line on stdout)")
      ->check(CLI::IsMember({"table", "json"}))
      ->capture_default_str();
  cmd->add_option("--output-file", a->output_file, "Also write the JSON report to this file");
  cmd->add_option("--samples-file", a->samples_file, "Write one JSON line per measured request (TTFT, ITLs, E2E)");
  cmd->add_option("--progress-interval", a->progress_interval, "Seconds between progress lines on stderr (0: none)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->callback([a] {
    const int rc = run_bench(*a);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
