// Coordinator throughput and added latency per token, with a fast fake worker.
//
// This program runs a fake worker (a Worker service that streams `--tokens` ids per request as fast
// as gRPC takes them, and registers with the coordinator like a real rank 0) and the clients; it
// starts shardserve-coordinator as a child process (the coordinator detokenizes with the Llama 3.1
// tokenizer, as it would for a real model). Reported:
//   - streamed tokens per second through the coordinator, `--streams` concurrent streams, with the
//     worker writing as fast as it can (and, as the baseline, straight from the worker);
//   - latency per token from the fake worker's Write to the client's Read, through the coordinator
//     and straight from the worker, with the worker pacing tokens like a decode loop
//     (--interval-us) so that no queue builds up: the difference is what the coordinator adds.
// Worker and client share this process, so both timestamps come from one steady clock.
//
//   build/bin/coordinator_bench [--streams 16] [--tokens 256] [--seconds 5] [--interval-us 2000]
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>
#include <spawn.h>
#include <sys/wait.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "shardserve/v1/generation.grpc.pb.h"
#include "shardserve/worker/v1/worker.grpc.pb.h"

extern char** environ;

namespace {

namespace v1 = shardserve::v1;
namespace wv1 = shardserve::worker::v1;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(); }

// When the worker wrote each token of each request.
class SendTimes {
 public:
  void record(const std::string& id, int64_t t) {
    std::lock_guard lock(mu_);
    times_[id].push_back(t);
  }
  std::vector<int64_t> take(const std::string& id) {
    std::lock_guard lock(mu_);
    auto node = times_.extract(id);
    return node.empty() ? std::vector<int64_t>{} : std::move(node.mapped());
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::vector<int64_t>> times_;
};

class FakeWorker final : public wv1::Worker::Service {
 public:
  FakeWorker(int tokens, SendTimes* times) : tokens_(tokens), times_(times) {}
  // 0: tokens as fast as gRPC takes them (throughput); > 0: one token per interval per request,
  // like a decode loop, so that queues stay empty and latency is the path's own.
  void set_interval(std::chrono::microseconds interval) { interval_us_ = interval.count(); }
  grpc::Status Generate(grpc::ServerContext* ctx, const wv1::WorkerRequest* req,
                        grpc::ServerWriter<wv1::WorkerOutput>* writer) override {
    const int n = static_cast<int>(std::min<int64_t>(tokens_, req->max_tokens()));
    const auto interval = std::chrono::microseconds(interval_us_.load());
    const auto start = Clock::now();
    for (int i = 0; i < n && !ctx->IsCancelled(); ++i) {
      if (interval.count() > 0) std::this_thread::sleep_until(start + i * interval);
      wv1::WorkerOutput out;
      out.add_token_ids(1000 + (i * 37) % 20000);  // ordinary English tokens: the detokenizer works
      out.set_num_prompt_tokens(req->prompt_token_ids_size());
      if (i + 1 == n) {
        out.set_finished(true);
        out.set_finish_reason("length");
      }
      times_->record(req->request_id(), now_ns());
      if (!writer->Write(out)) break;
    }
    return grpc::Status::OK;
  }
  grpc::Status GetStats(grpc::ServerContext*, const wv1::GetStatsRequest*, wv1::WorkerStats* s) override {
    s->set_state(wv1::WORKER_STATE_SERVING);
    s->set_num_blocks(1 << 20);
    s->set_num_free_blocks(1 << 20);
    s->set_block_size(16);
    s->set_vocab_size(128256);
    s->set_max_model_len(1 << 20);
    return grpc::Status::OK;
  }

 private:
  int tokens_;
  SendTimes* times_;
  std::atomic<int64_t> interval_us_{0};
};

struct Result {
  int64_t tokens = 0;
  std::vector<double> latency_us;
  int64_t errors = 0;
};

// `streams` client threads for `seconds`, each streaming requests back to back.
template <typename Call>
Result run_load(int streams, double seconds, SendTimes& times, Call call) {
  std::vector<Result> per(streams);
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      for (int64_t k = 0; !stop; ++k) {
        const std::string id = absl::StrCat("s", s, "-", k);
        std::vector<int64_t> recv;
        if (!call(id, recv)) {
          ++per[s].errors;
          continue;
        }
        const std::vector<int64_t> sent = times.take(id);
        per[s].tokens += static_cast<int64_t>(recv.size());
        for (size_t i = 0; i < std::min(sent.size(), recv.size()); ++i) {
          per[s].latency_us.push_back(static_cast<double>(recv[i] - sent[i]) / 1000.0);
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));  // the measurement window
  stop = true;
  for (auto& t : threads) t.join();
  Result all;
  for (auto& r : per) {
    all.tokens += r.tokens;
    all.errors += r.errors;
    all.latency_us.insert(all.latency_us.end(), r.latency_us.begin(), r.latency_us.end());
  }
  std::sort(all.latency_us.begin(), all.latency_us.end());
  return all;
}

// CPU seconds (user + system) a process has used so far.
double cpu_seconds(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string field;
  double ticks = 0;
  for (int i = 1; i <= 15 && in >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::stod(field);  // utime, stime (the name has no spaces here)
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double pct(const std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"coordinator_bench: coordinator throughput and added latency with a fake worker"};
  int streams = 16, tokens = 256, port = 0, interval_us = 2000;
  double seconds = 5;
  std::string bin_dir = fs::path(fs::read_symlink("/proc/self/exe")).parent_path().string();
  std::string tokenizer = std::string(SHARDSERVE_SOURCE_DIR) + "/tests/data/llama-3.1-tokenizer";
  app.add_option("--streams", streams, "Concurrent client streams")->capture_default_str();
  app.add_option("--tokens", tokens, "Tokens per request")->capture_default_str();
  app.add_option("--seconds", seconds, "Length of each measurement")->capture_default_str();
  app.add_option("--interval-us", interval_us, "Between a request's tokens in the latency runs (a decode step)")
      ->capture_default_str();
  app.add_option("--coordinator-port", port, "Port for the coordinator (0: pick one)");
  app.add_option("--tokenizer", tokenizer, "Tokenizer the coordinator detokenizes with")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  SendTimes times;
  FakeWorker worker(tokens, &times);
  int worker_port = 0;
  grpc::ServerBuilder wb;
  wb.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &worker_port);
  wb.RegisterService(&worker);
  auto worker_server = wb.BuildAndStart();

  if (port == 0) {  // a free port: bind one and release it
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    close(fd);
  }
  const fs::path dir = fs::temp_directory_path() / absl::StrCat("shardserve-bench-", getpid());
  fs::create_directories(dir);
  {
    std::ofstream cfg(dir / "cluster.yaml");
    cfg << "models:\n  - name: fake\n    checkpoint: /nonexistent\n    tokenizer: " << tokenizer
        << "\ngroups:\n  - name: fake\n    model: fake\n";
  }
  const std::string coordinator = absl::StrCat("127.0.0.1:", port);
  std::vector<std::string> args = {bin_dir + "/shardserve-coordinator", "--config", (dir / "cluster.yaml").string(),
                                   "--host", "127.0.0.1", "--port", std::to_string(port), "--ready-file",
                                   (dir / "ready.json").string(), "--log-level", "warn"};
  std::vector<char*> argv_c;
  for (auto& a : args) argv_c.push_back(a.data());
  argv_c.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, argv_c[0], nullptr, nullptr, argv_c.data(), environ) != 0) {
    std::fprintf(stderr, "cannot start %s\n", argv_c[0]);
    return 1;
  }
  {
    auto reg = wv1::Registry::NewStub(grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    wv1::RegisterRequest req;
    req.set_group("fake");
    req.set_address(absl::StrCat("127.0.0.1:", worker_port));
    req.set_worker_id("fake");
    wv1::Assignment a;
    if (auto st = reg->Register(&ctx, req, &a); !st.ok()) {
      std::fprintf(stderr, "register: %s\n", st.error_message().c_str());
      kill(pid, SIGKILL);
      return 1;
    }
  }
  for (int i = 0; i < 3000 && !fs::exists(dir / "ready.json"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling for the ready file
  }

  auto gen = v1::Generation::NewStub(grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
  auto direct = wv1::Worker::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", worker_port),
                                                         grpc::InsecureChannelCredentials()));
  auto via_coordinator = [&](const std::string& id, std::vector<int64_t>& recv) {
    grpc::ClientContext ctx;
    v1::GenerateRequest req;
    req.set_model("fake");
    req.set_request_id(id);
    for (int i = 0; i < 8; ++i) req.mutable_prompt_token_ids()->add_ids(1000 + i);
    req.set_max_tokens(tokens);
    auto reader = gen->GenerateStream(&ctx, req);
    v1::GenerateResponse d;
    while (reader->Read(&d)) {
      const int64_t t = now_ns();
      for (int i = 0; i < d.token_ids_size(); ++i) recv.push_back(t);
    }
    return reader->Finish().ok();
  };
  auto straight = [&](const std::string& id, std::vector<int64_t>& recv) {
    grpc::ClientContext ctx;
    wv1::WorkerRequest req;
    req.set_request_id(id);
    req.set_max_tokens(tokens);
    auto reader = direct->Generate(&ctx, req);
    wv1::WorkerOutput o;
    while (reader->Read(&o)) {
      const int64_t t = now_ns();
      for (int i = 0; i < o.token_ids_size(); ++i) recv.push_back(t);
    }
    return reader->Finish().ok();
  };

  run_load(streams, 1.0, times, via_coordinator);  // warm-up
  // Throughput: the worker streams as fast as it can.
  const Result base_tp = run_load(streams, seconds, times, straight);
  const double cpu_before = cpu_seconds(pid);
  const Result coord_tp = run_load(streams, seconds, times, via_coordinator);
  const double coordinator_cpu = cpu_seconds(pid) - cpu_before;
  // Latency: paced tokens, so that no queue builds up anywhere.
  worker.set_interval(std::chrono::microseconds(interval_us));
  const Result base = run_load(streams, seconds, times, straight);
  const Result coord = run_load(streams, seconds, times, via_coordinator);
  std::printf("coordinator_bench: %d streams x %d tokens/request, %.1f s per run, %u hardware threads\n", streams,
              tokens, seconds, std::thread::hardware_concurrency());
  std::printf("throughput (unpaced worker):  direct %9.0f tokens/s   through the coordinator %9.0f tokens/s  (errors %lld)\n",
              static_cast<double>(base_tp.tokens) / seconds, static_cast<double>(coord_tp.tokens) / seconds,
              static_cast<long long>(base_tp.errors + coord_tp.errors));
  std::printf("coordinator CPU per streamed token: %.1f us (user + system; %.2f cores busy during the run)\n",
              coordinator_cpu * 1e6 / static_cast<double>(std::max<int64_t>(coord_tp.tokens, 1)), coordinator_cpu / seconds);
  std::printf("latency per token, worker Write -> client Read (one token per %d us per stream, %.0f tokens/s):\n",
              interval_us, static_cast<double>(coord.tokens) / seconds);
  std::printf("  direct from the worker:   p50 %8.1f us   p99 %8.1f us\n", pct(base.latency_us, 0.5),
              pct(base.latency_us, 0.99));
  std::printf("  through the coordinator:  p50 %8.1f us   p99 %8.1f us\n", pct(coord.latency_us, 0.5),
              pct(coord.latency_us, 0.99));
  std::printf("  added by the coordinator: p50 %8.1f us   p99 %8.1f us  (errors %lld)\n",
              pct(coord.latency_us, 0.5) - pct(base.latency_us, 0.5),
              pct(coord.latency_us, 0.99) - pct(base.latency_us, 0.99), static_cast<long long>(base.errors + coord.errors));
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  worker_server->Shutdown();
  fs::remove_all(dir);
  return 0;
}
