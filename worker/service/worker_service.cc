#include "worker/service/worker_service.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <httplib.h>
#include <prometheus/text_serializer.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "shardserve/worker/v1/worker.grpc.pb.h"
#include "worker/engine/process_group.h"
#include "worker/service/engine_loop.h"
#include "worker/service/worker_metrics.h"

namespace shardserve {
namespace {

namespace wv1 = shardserve::worker::v1;

grpc::Status to_grpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// Notices cancelled calls for the Generate handlers. The synchronous API has no cancellation
// callback, and a handler that polled IsCancelled itself would have to wake every few ms: at 1,000
// streams those wake-ups (200,000 a second at 5 ms) were most of a 2-core machine's time and
// halved its token rate. One thread checks every open call each 10 ms instead and wakes only the
// handlers whose call was cancelled; the others sleep until their stream has output.
class CancellationWatcher {
 public:
  struct Call {
    grpc::ServerContext* ctx;
    RequestStream* stream;
    bool cancelled = false;  // under stream->mu
  };

  CancellationWatcher() : thread_([this] { run(); }) {}
  ~CancellationWatcher() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void add(Call* c) {
    {
      std::lock_guard lock(mu_);
      calls_.push_back(c);
    }
    cv_.notify_all();
  }
  // After this returns the watcher no longer touches `c`.
  void remove(Call* c) {
    std::lock_guard lock(mu_);
    std::erase(calls_, c);
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      if (calls_.empty()) {
        cv_.wait(lock, [this] { return stop_ || !calls_.empty(); });
        continue;
      }
      for (Call* c : calls_) {
        if (!c->ctx->IsCancelled()) continue;
        std::lock_guard stream_lock(c->stream->mu);  // order: mu_, then a stream's mu
        if (!c->cancelled) {
          c->cancelled = true;
          c->stream->cv.notify_all();
        }
      }
      cv_.wait_for(lock, std::chrono::milliseconds(10), [this] { return stop_; });
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call*> calls_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it reads
};

class WorkerService final : public wv1::Worker::Service {
 public:
  explicit WorkerService(std::string group) : group_(std::move(group)) {}

  // loading -> serving
  void serve(EngineLoop* loop) {
    loop_ = loop;
    state_ = wv1::WORKER_STATE_SERVING;
  }
  // The model failed and the process is about to exit: refuse new requests, report draining.
  void fail() {
    failed_ = true;
    state_ = wv1::WORKER_STATE_DRAINING;
  }
  // serving -> draining; waits for the handlers of in-flight requests, up to `timeout`.
  void drain(std::chrono::milliseconds timeout) {
    state_ = wv1::WORKER_STATE_DRAINING;
    std::unique_lock lock(mu_);
    spdlog::info("draining: {} requests in flight, waiting up to {} ms", active_, timeout.count());
    cv_.wait_for(lock, timeout, [this] { return active_ == 0; });
    if (active_ > 0) spdlog::warn("shutdown timeout: {} requests still in flight", active_);
  }

  grpc::Status Generate(grpc::ServerContext* ctx, const wv1::WorkerRequest* req,
                        grpc::ServerWriter<wv1::WorkerOutput>* writer) override {
    if (state_ != wv1::WORKER_STATE_SERVING) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, failed_                                  ? "the worker's model failed"
                                                         : state_ == wv1::WORKER_STATE_DRAINING ? "the worker is draining"
                                                                                                : "the worker is loading");
    }
    {
      std::lock_guard lock(mu_);
      ++active_;
    }
    struct Leave {
      WorkerService* s;
      ~Leave() {
        std::lock_guard lock(s->mu_);
        if (--s->active_ == 0) s->cv_.notify_all();
      }
    } leave{this};

    Request r;
    // Our own id: the engine needs uniqueness, which a client-chosen id does not promise.
    r.request_id = absl::StrCat(next_id_.fetch_add(1));
    r.prompt_token_ids.assign(req->prompt_token_ids().begin(), req->prompt_token_ids().end());
    SamplingParams& p = r.params;
    p.max_tokens = req->max_tokens();
    p.temperature = req->temperature();
    p.top_k = req->top_k();
    p.top_p = req->top_p();
    p.min_p = req->min_p();
    if (req->has_seed()) p.seed = req->seed();
    p.repetition_penalty = req->repetition_penalty();
    p.presence_penalty = req->presence_penalty();
    p.frequency_penalty = req->frequency_penalty();
    p.stop_token_ids.assign(req->stop_token_ids().begin(), req->stop_token_ids().end());
    p.ignore_eos = req->ignore_eos();
    p.logprobs = req->logprobs();
    const std::string id = r.request_id;
    spdlog::debug("request {} (coordinator's {}): {} prompt tokens", id, req->request_id(), r.prompt_token_ids.size());

    EngineLoop* loop = loop_.load();
    std::shared_ptr<RequestStream> stream = loop->submit(std::move(r));
    CancellationWatcher::Call call{ctx, stream.get()};
    watcher_.add(&call);
    struct Unwatch {
      CancellationWatcher& w;
      CancellationWatcher::Call* c;
      ~Unwatch() { w.remove(c); }
    } unwatch{watcher_, &call};
    std::deque<RequestOutput> outputs;
    for (;;) {
      bool done = false;
      bool cancelled = false;
      absl::Status status;
      {
        std::unique_lock lock(stream->mu);
        stream->cv.wait(lock, [&] { return !stream->outputs.empty() || stream->done || call.cancelled; });
        outputs.swap(stream->outputs);
        done = stream->done;
        status = stream->status;
        cancelled = call.cancelled;
      }
      for (RequestOutput& o : outputs) {
        wv1::WorkerOutput out;
        *out.mutable_token_ids() = {o.new_token_ids.begin(), o.new_token_ids.end()};
        for (const TokenLogprobs& lp : o.new_logprobs) {
          auto* l = out.add_logprobs();
          l->set_token_id(lp.token_id);
          l->set_logprob(lp.logprob);
          for (const auto& [tid, v] : lp.top) {
            auto* t = l->add_top_logprobs();
            t->set_token_id(tid);
            t->set_logprob(v);
          }
        }
        out.set_finished(o.finished);
        out.set_finish_reason(o.finish_reason);
        out.set_num_prompt_tokens(o.num_prompt_tokens);
        out.set_num_cached_prompt_tokens(o.num_cached_prompt_tokens);
        if (!writer->Write(out)) {
          loop->abort(id);
          return grpc::Status(grpc::StatusCode::CANCELLED, "the coordinator went away");
        }
      }
      outputs.clear();
      if (done) return to_grpc(status);
      if (cancelled) {
        loop->abort(id);  // frees the request's KV blocks before the next step
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
    }
  }

  grpc::Status GetStats(grpc::ServerContext*, const wv1::GetStatsRequest*, wv1::WorkerStats* resp) override {
    resp->set_state(state_.load());
    resp->set_group(group_);
    if (EngineLoop* loop = loop_) {
      const EngineStats s = loop->stats();
      resp->set_num_waiting(static_cast<int64_t>(s.num_waiting));
      resp->set_num_running(static_cast<int64_t>(s.num_running));
      resp->set_num_free_blocks(s.num_free_blocks);
      resp->set_num_blocks(s.num_blocks);
      resp->set_block_size(loop->block_size());
      resp->set_num_preemptions(s.num_preemptions);
      resp->set_prefix_cache_hits(s.prefix_cache_hits);
      resp->set_prefix_cache_queries(s.prefix_cache_queries);
      resp->set_vocab_size(loop->model_config().vocab_size);
      resp->set_max_model_len(loop->max_model_len());
      resp->set_num_in_flight(loop->num_in_flight());
    }
    return grpc::Status::OK;
  }

 private:
  const std::string group_;
  std::atomic<wv1::WorkerState> state_{wv1::WORKER_STATE_LOADING};
  std::atomic<bool> failed_{false};
  std::atomic<EngineLoop*> loop_{nullptr};
  std::atomic<uint64_t> next_id_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t active_ = 0;
  CancellationWatcher watcher_;
};

absl::StatusOr<wv1::Assignment> register_with_coordinator(const WorkerOptions& o, const wv1::RegisterRequest& req) {
  auto channel = grpc::CreateChannel(o.coordinator, grpc::InsecureChannelCredentials());
  auto stub = wv1::Registry::NewStub(channel);
  using SystemClock = std::chrono::system_clock;  // what gRPC deadlines take
  const auto give_up = SystemClock::now() + o.register_timeout;
  grpc::Status last;
  while (SystemClock::now() < give_up) {
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);  // the coordinator may start after us
    ctx.set_deadline(std::min(give_up, SystemClock::now() + std::chrono::seconds(5)));
    wv1::Assignment a;
    last = stub->Register(&ctx, req, &a);
    if (last.ok()) return a;
    if (last.error_code() != grpc::StatusCode::UNAVAILABLE && last.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      // The code is part of the message: gRPC's own errors (UNIMPLEMENTED from a server that is
      // not a coordinator, say) come without text.
      const auto code = static_cast<absl::StatusCode>(last.error_code());
      return absl::Status(code, absl::StrCat("registering with ", o.coordinator, ": ", absl::StatusCodeToString(code),
                                             last.error_message().empty() ? "" : ": ", last.error_message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // a retry back-off, not a synchronisation
  }
  return absl::UnavailableError(absl::StrCat("could not register with the coordinator at ", o.coordinator, " within ",
                                             o.register_timeout.count(), " ms: ", last.error_message()));
}

// Registers rank 0 again every second while it serves. The coordinator keeps its registry in
// memory: one that restarted, or that gave this worker's slot away (dead_after), learns of it
// again within a second, and traffic resumes. For a worker_id it knows, Register is a no-op that
// returns the same assignment. An assignment that no longer matches what was loaded (the cluster
// config changed) cannot be served: the worker drains and exits, to be restarted with the new one.
class RegistrationKeeper {
 public:
  RegistrationKeeper(const WorkerOptions& o, wv1::RegisterRequest req, wv1::Assignment loaded)
      : req_(std::move(req)), loaded_(std::move(loaded)) {
    grpc::ChannelArguments args;
    // A restarted coordinator is found within a second, not after gRPC's default back-off (up to 2 min).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    stub_ = wv1::Registry::NewStub(grpc::CreateCustomChannel(o.coordinator, grpc::InsecureChannelCredentials(), args));
    thread_ = std::thread([this] { run(); });
  }
  ~RegistrationKeeper() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    grpc::StatusCode last = grpc::StatusCode::OK;
    while (!cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stop_; })) {
      lock.unlock();
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      wv1::Assignment a;
      const grpc::Status s = stub_->Register(&ctx, req_, &a);
      lock.lock();
      if (!s.ok()) {
        if (s.error_code() != last) spdlog::warn("registering with the coordinator again: {}", s.error_message());
        last = s.error_code();
        continue;
      }
      if (a.model() != loaded_.model() || a.checkpoint() != loaded_.checkpoint() || a.synthetic() != loaded_.synthetic() ||
          a.backend() != loaded_.backend() ||
          a.tp_size() != loaded_.tp_size() || a.quantization() != loaded_.quantization()) {
        spdlog::error("the coordinator now assigns model '{}' ({}), backend {}, tp_size {}, quantization {} to group "
                      "{}; this worker loaded '{}' ({}): exiting, to be started again with the new assignment",
                      a.model(), a.checkpoint(), a.backend(), a.tp_size(), a.quantization(), a.group(),
                      loaded_.model(), loaded_.checkpoint());
        kill(getpid(), SIGTERM);  // the drain path of run_worker, as an operator's SIGTERM
        return;
      }
      if (last != grpc::StatusCode::OK) spdlog::info("registered with the coordinator again: replica {}", a.replica());
      last = grpc::StatusCode::OK;
    }
  }

  const wv1::RegisterRequest req_;
  const wv1::Assignment loaded_;
  std::unique_ptr<wv1::Registry::Stub> stub_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// /metrics over cpp-httplib rather than prometheus-cpp's Exposer: civetweb starts its threads with
// a fixed 100 KB stack, and a worker built with CUDA carries cuBLASLt's static TLS, which alone is
// larger, so every pthread_create in civetweb fails with EINVAL there.
class MetricsServer {
 public:
  ~MetricsServer() {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }
  // Listens on host:port (0: any free port) and returns the port.
  absl::StatusOr<int> start(const std::string& host, int port) {
    server_.new_task_queue = [] { return new httplib::ThreadPool(2); };
    server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::vector<prometheus::MetricFamily> families;
      {
        std::lock_guard lock(mu_);
        for (const auto& c : collectables_) {
          for (auto& f : c->Collect()) families.push_back(std::move(f));
        }
      }
      res.set_content(prometheus::TextSerializer().Serialize(families), "text/plain; version=0.0.4");
    });
    const int bound = port == 0 ? server_.bind_to_any_port(host) : (server_.bind_to_port(host, port) ? port : -1);
    if (bound <= 0) return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", host, ":", port));
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    return bound;
  }
  void add(std::shared_ptr<prometheus::Collectable> collectable) {
    std::lock_guard lock(mu_);
    collectables_.push_back(std::move(collectable));
  }

 private:
  httplib::Server server_;
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
};

void wait_for_termination() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("got {}; draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
}

}  // namespace

absl::Status run_worker(const WorkerOptions& o) {
  WorkerService service(o.group);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a taken port is an error, never shared
  builder.AddListeningPort(absl::StrCat(o.host, ":", o.port), grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", o.host, ":", o.port, " (is the port in use?)"));
  }

  MetricsServer metrics_server;
  int metrics_port = -1;
  if (o.metrics_port >= 0) {
    auto bound = metrics_server.start(o.host, o.metrics_port);
    if (!bound.ok()) return bound.status();
    metrics_port = *bound;
  }
  const std::string advertise = o.advertise_host.empty() ? o.host : o.advertise_host;

  wv1::RegisterRequest req;
  req.set_group(o.group);
  req.set_rank(o.rank);
  if (o.rank == 0) req.set_address(absl::StrCat(advertise, ":", port));
  if (metrics_port >= 0) req.set_metrics_address(absl::StrCat(advertise, ":", metrics_port));
  req.set_worker_id(absl::StrCat(advertise, ":", port, "/", getpid(), "/", std::random_device{}()));
  // Rank 0 is ready to lead a group of processes before it knows it will (the assignment says):
  // a listener for its followers and, where NCCL is, the group's unique id.
  std::unique_ptr<FrameListener> group_listener;
  if (o.rank == 0) {
    auto listener = FrameListener::listen(o.host, o.group_port);
    if (!listener.ok()) return listener.status();
    group_listener = std::move(*listener);
    req.set_group_address(absl::StrCat(advertise, ":", group_listener->port()));
    req.set_nccl_unique_id(make_nccl_unique_id());
  }
  auto assignment = register_with_coordinator(o, req);
  if (!assignment.ok()) return assignment.status();
  const wv1::Assignment& a = *assignment;
  spdlog::info("assigned: group {}/{} rank {}/{} of model '{}' ({}), backend {}, serving on {}:{}", a.group(),
               a.replica(), a.rank(), a.tp_size(), a.model(), a.checkpoint(), a.backend(), advertise, port);
  const bool process_group = a.local_ranks() < a.tp_size();
  if (a.dtype() != "auto" && !a.dtype().empty()) {
    spdlog::warn("dtype '{}' requested; this build uses the checkpoint's dtype", a.dtype());
  }

  ExecutorOptions eo;
  eo.model_dir = a.checkpoint();
  eo.synthetic = a.synthetic();  // random weights of this shape instead of a checkpoint
  eo.backend = a.backend();
  eo.tp_size = a.tp_size();
  // The group's `quantization:` (none = the checkpoint as published); load_model checks it
  // against the checkpoint, or quantizes a 16-bit one at load (fp8, int8).
  eo.quantization = a.quantization();
  if (a.block_size() > 0) eo.block_size = a.block_size();
  eo.num_kv_blocks = a.num_kv_blocks();
  if (a.kv_cache_bytes() > 0) eo.kv_cache_bytes = a.kv_cache_bytes();
  // The GPU memory plan sizes activations and the KV cache for the group's engine limits.
  eo.max_model_len = a.max_model_len();
  if (a.max_num_seqs() > 0) eo.max_num_seqs = a.max_num_seqs();
  if (a.max_num_batched_tokens() > 0) eo.max_num_batched_tokens = a.max_num_batched_tokens();
  eo.device = o.device >= 0 ? o.device : (process_group ? a.rank() : 0);
  GroupOptions go;
  go.rank = a.rank();
  go.tp_size = a.tp_size();
  go.leader_address = a.group_address();
  go.nccl_unique_id = a.nccl_unique_id();
  go.join_timeout = o.register_timeout;
  go.collective_timeout = o.collective_timeout;
  if (process_group && a.rank() > 0) {
    // A follower serves nothing itself: it runs rank 0's steps until rank 0 closes the group.
    spdlog::info("following rank 0 of group {} at {}", a.group(), a.group_address());
    server->Shutdown();
    return run_group_follower(eo, go);
  }
  auto loaded = process_group ? start_group_leader(eo, go, *group_listener) : load_model(eo);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(), absl::StrCat("loading ", a.checkpoint(), ": ", loaded.status().message()));
  }
  EngineConfig ec;
  if (a.max_num_seqs() > 0) ec.scheduler.max_num_seqs = a.max_num_seqs();
  if (a.max_num_batched_tokens() > 0) ec.scheduler.max_num_batched_tokens = a.max_num_batched_tokens();
  ec.max_model_len = a.max_model_len();
  ec.enable_prefix_caching = a.enable_prefix_caching();
  ec.eos_token_ids = stop_token_ids(loaded->config, loaded->generation);

  auto metrics = std::make_shared<WorkerMetrics>(a.group(), a.model());
  if (metrics_port >= 0) metrics_server.add(metrics->registry());
  EngineLoopHooks hooks;
  hooks.on_queue_time = [metrics](double s) { metrics->queue_time(s); };
  hooks.on_finished = [metrics](const std::string& reason) { metrics->request_finished(reason); };
  hooks.on_stats = [metrics](const EngineStats& s, int64_t in_flight) { metrics->update(s, in_flight); };
  hooks.on_fatal = [&service](const std::string& why) {
    // No new requests and no passing health check in the moment before the exit: the coordinator
    // stops routing here at its next check instead of retrying onto a group that is going away.
    service.fail();
    spdlog::critical("{}; exiting so the group restarts", why);
    spdlog::default_logger()->flush();
    // The failed streams' statuses are on their way to the coordinator; give them a moment.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    std::_Exit(1);
  };
  auto loop = std::make_unique<EngineLoop>(std::move(*loaded), ec, hooks);
  metrics->update(loop->stats(), 0);
  service.serve(loop.get());
  spdlog::info("serving: {} KV blocks of {} tokens, max model length {}", loop->stats().num_blocks, loop->block_size(),
               loop->max_model_len());

  std::optional<RegistrationKeeper> keeper;
  if (o.rank == 0) keeper.emplace(o, req, a);  // followers are known through their rank 0
  wait_for_termination();
  keeper.reset();
  server->GetHealthCheckService()->SetServingStatus(false);
  service.drain(o.shutdown_timeout);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  loop.reset();
  return absl::OkStatus();
}

}  // namespace shardserve
