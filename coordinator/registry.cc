#include "coordinator/registry.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "coordinator/router.h"

namespace shardserve {

namespace wv1 = worker::v1;
using Clock = std::chrono::steady_clock;

Registry::Registry(const ClusterConfig& config, RegistryOptions options, CoordinatorMetrics* metrics)
    : config_(config), options_(options), metrics_(metrics) {
  for (const GroupSpec& g : config_.groups) {
    for (int i = 0; i < g.replicas; ++i) {
      Replica r;
      r.group = &g;
      r.index = i;
      replicas_.push_back(std::move(r));
      if (metrics_) metrics_->group_healthy(g.name, i, g.model, false);
    }
  }
}

Registry::~Registry() { stop_health_checks(); }

const char* Registry::state_name(State s) {
  switch (s) {
    case State::kEmpty: return "empty";
    case State::kLoading: return "loading";
    case State::kServing: return "serving";
    case State::kDraining: return "draining";
    case State::kUnhealthy: return "unhealthy";
  }
  return "?";
}

void Registry::set_state(Replica& r, State s, const std::string& why) {
  if (r.state == s) return;
  spdlog::info("group {}/{}: {} -> {} ({})", r.group->name, r.index, state_name(r.state), state_name(s), why);
  if (s == State::kUnhealthy) r.failing_since = Clock::now();
  r.state = s;
  if (metrics_) metrics_->group_healthy(r.group->name, r.index, r.group->model, s == State::kServing);
}

wv1::Assignment Registry::assignment_for(const Replica& r, int rank) const {
  const GroupSpec& g = *r.group;
  const ModelSpec& m = *config_.find_model(g.model);
  wv1::Assignment a;
  a.set_group(g.name);
  a.set_replica(r.index);
  a.set_model(m.name);
  a.set_checkpoint(m.checkpoint);
  a.set_synthetic(m.synthetic);
  a.set_rank(rank);
  a.set_tp_size(g.tp_size);
  a.set_local_ranks(g.backend == "cpu" && !g.process_per_rank ? g.tp_size : 1);
  a.set_backend(g.backend);
  a.set_dtype(g.dtype);
  a.set_quantization(g.quantization);
  a.set_nccl_unique_id(r.nccl_unique_id);
  a.set_group_address(r.group_address);
  a.set_num_kv_blocks(g.num_kv_blocks);
  a.set_kv_cache_bytes(g.kv_cache_bytes);
  a.set_block_size(g.block_size);
  a.set_max_num_seqs(g.max_num_seqs);
  a.set_max_num_batched_tokens(g.max_num_batched_tokens);
  a.set_max_model_len(g.max_model_len);
  a.set_enable_prefix_caching(g.enable_prefix_caching);
  return a;
}

absl::StatusOr<wv1::Assignment> Registry::register_worker(const wv1::RegisterRequest& req) {
  const GroupSpec* group = config_.find_group(req.group());
  if (!group) {
    std::vector<std::string> names;
    for (const GroupSpec& g : config_.groups) names.push_back(g.name);
    return absl::NotFoundError(absl::StrCat("no group '", req.group(), "' in the cluster config; its groups are: ",
                                            absl::StrJoin(names, ", ")));
  }
  if (req.rank() < 0 || req.rank() >= group->tp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", req.rank(), " is outside group '", group->name, "' (tp_size ", group->tp_size, ")"));
  }
  if (req.rank() > 0 && group->backend == "cpu" && !group->process_per_rank) {
    return absl::FailedPreconditionError(absl::StrCat(
        "group '", group->name, "' runs on the cpu backend: its ", group->tp_size,
        " ranks are threads of the rank-0 worker, so start only rank 0"));
  }
  std::lock_guard lock(mu_);
  if (req.rank() == 0) {
    if (req.address().empty()) return absl::InvalidArgumentError("rank 0 must register the address of its Worker service");
    Replica* slot = nullptr;
    Replica* failing = nullptr;  // failing longest
    for (Replica& r : replicas_) {
      if (r.group != group) continue;
      // A retried call, or the worker's periodic re-registration (worker_service.cc).
      if (!req.worker_id().empty() && r.worker_id == req.worker_id()) return assignment_for(r, 0);
      if (!slot && r.state == State::kEmpty) slot = &r;
      if (r.state == State::kUnhealthy && (!failing || r.failing_since < failing->failing_since)) failing = &r;
    }
    if (!slot && failing) {
      // Most often the same worker restarted (kill -9, an OOM kill, a pod restart) before
      // dead_after freed its slot: waiting would keep a live worker out for that long. If the
      // old one comes back, it finds its slot taken and stays out of routing.
      spdlog::warn("group {}/{}: a new rank 0 at {} replaces the unhealthy worker at {}", group->name, failing->index,
                   req.address(), failing->address);
      slot = failing;
    }
    if (!slot) {
      return absl::FailedPreconditionError(absl::StrCat("all ", group->replicas, " replicas of group '", group->name,
                                                        "' already have a rank 0; raise replicas in the cluster config"));
    }
    grpc::ChannelArguments args;
    // A restarted worker at the same address is found again within a second.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    args.SetMaxReceiveMessageSize(64 << 20);
    auto channel = grpc::CreateCustomChannel(req.address(), grpc::InsecureChannelCredentials(), args);
    slot->stub = wv1::Worker::NewStub(channel);
    slot->address = req.address();
    slot->metrics_address = req.metrics_address();
    slot->worker_id = req.worker_id();
    slot->nccl_unique_id = req.nccl_unique_id();
    slot->group_address = req.group_address();
    slot->follower_ranks.clear();
    slot->has_stats = false;
    slot->outstanding_tokens = 0;
    set_state(*slot, State::kLoading, absl::StrCat("rank 0 registered from ", req.address()));
    health_cv_.notify_all();  // check it now, not a whole interval later
    return assignment_for(*slot, 0);
  }
  for (Replica& r : replicas_) {
    if (r.group != group || r.state == State::kEmpty || r.follower_ranks.count(req.rank())) continue;
    r.follower_ranks.insert(req.rank());
    spdlog::info("group {}/{}: rank {} registered", group->name, r.index, req.rank());
    return assignment_for(r, req.rank());
  }
  return absl::UnavailableError(absl::StrCat("no replica of group '", group->name, "' has a rank 0 waiting for rank ",
                                             req.rank(), " yet; retry"));
}

absl::StatusOr<Registry::Route> Registry::acquire(const std::string& model, const std::vector<int>& excluded,
                                                  int64_t cost) {
  std::lock_guard lock(mu_);
  std::vector<ReplicaLoad> loads(replicas_.size());
  bool any = false;
  for (size_t i = 0; i < replicas_.size(); ++i) {
    const Replica& r = replicas_[i];
    if (r.group->model != model) continue;
    any = true;
    if (r.state != State::kServing || !r.has_stats) continue;
    if (std::find(excluded.begin(), excluded.end(), static_cast<int>(i)) != excluded.end()) continue;
    ReplicaLoad& l = loads[i];
    l.serving = true;
    l.outstanding_tokens = r.outstanding_tokens;
    l.kv_capacity_tokens = r.stats.num_blocks() * r.stats.block_size();
    l.kv_usage = r.stats.num_blocks() > 0
                     ? 1.0 - static_cast<double>(r.stats.num_free_blocks()) / static_cast<double>(r.stats.num_blocks())
                     : 0.0;
    l.num_waiting = r.stats.num_waiting();
  }
  if (!any) return absl::UnavailableError(absl::StrCat("no group of the cluster config serves model '", model, "'"));
  const int i = pick_replica(loads, rotation_.fetch_add(1));
  if (i < 0) {
    return absl::UnavailableError(absl::StrCat("no healthy worker group serves model '", model,
                                               "' right now; retry later"));
  }
  Replica& r = replicas_[i];
  r.outstanding_tokens += cost;
  return Route{i, absl::StrCat(r.group->name, "/", r.index), r.stub, r.stats.vocab_size(), r.stats.max_model_len(),
               cost, r.worker_id};
}

void Registry::release(const Route& route) {
  std::lock_guard lock(mu_);
  Replica& r = replicas_[route.replica];
  // A worker registered in the slot meanwhile started from 0; taking this cost off would
  // understate its load.
  if (r.worker_id == route.worker_id) r.outstanding_tokens -= route.cost;
}

void Registry::report_failure(const Route& route, const std::string& why) {
  std::lock_guard lock(mu_);
  Replica& r = replicas_[route.replica];
  if (r.worker_id != route.worker_id) return;
  if (r.state == State::kServing || r.state == State::kDraining || r.state == State::kLoading) {
    set_state(r, State::kUnhealthy, why);
  }
}

Registry::ModelState Registry::model_state(const std::string& model) const {
  std::lock_guard lock(mu_);
  ModelState s;
  for (const Replica& r : replicas_) {
    if (r.group->model != model) continue;
    ++s.num_groups;
    if (r.state == State::kServing) ++s.num_serving;
    if (r.has_stats && (s.max_model_len == 0 || r.stats.max_model_len() < s.max_model_len)) {
      s.max_model_len = r.stats.max_model_len();  // the strictest, so that any replica can take it
      s.vocab_size = r.stats.vocab_size();
    }
  }
  return s;
}

bool Registry::all_serving() const {
  std::lock_guard lock(mu_);
  return std::all_of(replicas_.begin(), replicas_.end(), [](const Replica& r) {
    return r.state == State::kServing && r.has_stats;
  });
}

nlohmann::json Registry::describe() const {
  std::lock_guard lock(mu_);
  nlohmann::json out = nlohmann::json::array();
  for (const Replica& r : replicas_) {
    out.push_back({{"group", r.group->name},
                   {"replica", r.index},
                   {"model", r.group->model},
                   {"state", state_name(r.state)},
                   {"address", r.address},
                   {"metrics_address", r.metrics_address}});
  }
  return out;
}

void Registry::check_health() {
  struct Probe {
    size_t replica;
    std::string worker_id;
    std::shared_ptr<wv1::Worker::Stub> stub;
    grpc::ClientContext ctx;
    wv1::GetStatsRequest request;
    wv1::WorkerStats response;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Probe>> probes;
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < replicas_.size(); ++i) {
      if (replicas_[i].state == State::kEmpty) continue;
      auto p = std::make_unique<Probe>();
      p->replica = i;
      p->worker_id = replicas_[i].worker_id;
      p->stub = replicas_[i].stub;
      probes.push_back(std::move(p));
    }
  }
  // All probes at once, so that one hung worker delays nobody else's check.
  std::mutex done_mu;
  std::condition_variable done_cv;
  size_t pending = probes.size();
  for (auto& p : probes) {
    p->ctx.set_deadline(std::chrono::system_clock::now() + options_.health_timeout);
    p->stub->async()->GetStats(&p->ctx, &p->request, &p->response, [&, probe = p.get()](grpc::Status s) {
      probe->status = std::move(s);
      std::lock_guard lock(done_mu);
      if (--pending == 0) done_cv.notify_all();
    });
  }
  {
    std::unique_lock lock(done_mu);
    done_cv.wait(lock, [&] { return pending == 0; });
  }
  std::lock_guard lock(mu_);
  for (const auto& p : probes) {
    Replica& r = replicas_[p->replica];
    if (r.worker_id != p->worker_id || r.state == State::kEmpty) continue;  // replaced meanwhile
    if (p->status.ok()) {
      r.stats = p->response;
      r.has_stats = true;
      switch (p->response.state()) {
        case wv1::WORKER_STATE_SERVING: set_state(r, State::kServing, "health check"); break;
        case wv1::WORKER_STATE_DRAINING: set_state(r, State::kDraining, "worker is draining"); break;
        default: set_state(r, State::kLoading, "worker is loading"); break;
      }
      continue;
    }
    if (r.state != State::kUnhealthy) {
      set_state(r, State::kUnhealthy, absl::StrCat("health check: ", p->status.error_message()));
    } else if (Clock::now() - r.failing_since > options_.dead_after) {
      spdlog::warn("group {}/{}: worker at {} failed health checks for {} ms; the slot is free again", r.group->name,
                   r.index, r.address, options_.dead_after.count());
      set_state(r, State::kEmpty, "dead");
      r.stub.reset();
      r.address.clear();
      r.metrics_address.clear();
      r.worker_id.clear();
      r.has_stats = false;
    }
  }
}

void Registry::start_health_checks() {
  health_thread_ = std::thread([this] {
    std::unique_lock lock(health_mu_);
    while (!health_stop_) {
      lock.unlock();
      check_health();
      bool loading = false;
      {
        std::lock_guard registry_lock(mu_);
        for (const Replica& r : replicas_) loading = loading || r.state == State::kLoading;
      }
      lock.lock();
      // A loading worker is polled often, so that it serves as soon as it is ready.
      const auto interval = loading ? std::min<std::chrono::milliseconds>(options_.health_interval,
                                                                          std::chrono::milliseconds(100))
                                    : options_.health_interval;
      health_cv_.wait_for(lock, interval);
    }
  });
}

void Registry::stop_health_checks() {
  {
    std::lock_guard lock(health_mu_);
    health_stop_ = true;
  }
  health_cv_.notify_all();
  if (health_thread_.joinable()) health_thread_.join();
}

}  // namespace shardserve
