#include "worker/engine/tp_executor.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "worker/engine/step_message.h"
#ifdef SHARDSERVE_WITH_CUDA
#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/custom_all_reduce.h"
#include "worker/runtime/nccl_communicator.h"
#endif

namespace shardserve {

TpExecutor::TpExecutor(int tp_size)
    : setup_status_(static_cast<size_t>(tp_size)), setup_blocks_(static_cast<size_t>(tp_size), 0) {
  num_taken_ = tp_size - 1;  // nothing published yet: nothing left to take
  for (int r = 0; r < tp_size; ++r) ranks_.push_back(std::make_unique<Rank>());
}

absl::StatusOr<std::unique_ptr<TpExecutor>> TpExecutor::create(const ModelConfig& config,
                                                               const ExecutorOptions& options) {
  const int n = options.tp_size;
  if (n < 2) return absl::InvalidArgumentError(absl::StrCat("TpExecutor needs tp_size >= 2, got ", n));
  auto exec = std::unique_ptr<TpExecutor>(new TpExecutor(n));
  if (options.synthetic.empty()) {
    auto ckpt = Checkpoint::open(options.model_dir);
    if (!ckpt.ok()) return ckpt.status();
    exec->checkpoint_ = std::move(*ckpt);
  }
  // Backends and communicators first, on this thread: a failure here leaves no rank waiting.
  // CPU ranks share the machine's cores; each backend spreads its matrix products over its part.
  const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / n);
  for (int r = 0; r < n; ++r) {
    auto backend = make_backend(options, config, r, threads);
    if (!backend.ok()) return backend.status();
    exec->ranks_[static_cast<size_t>(r)]->backend = std::move(*backend);
  }
  if (options.backend == "cpu") {
    exec->cpu_group_ = std::make_unique<InProcessGroup>(n);
    for (int r = 0; r < n; ++r) exec->ranks_[static_cast<size_t>(r)]->comm = &exec->cpu_group_->comm(r);
  } else {
#ifdef SHARDSERVE_WITH_CUDA
    std::vector<CudaBackend*> gpus;
    for (auto& rank : exec->ranks_) gpus.push_back(static_cast<CudaBackend*>(rank->backend.get()));
    auto comms = NcclCommunicator::create_local_group(gpus);
    if (!comms.ok()) return comms.status();
    auto capacity = CustomAllReduce::configured_capacity();
    if (!capacity.ok()) return capacity.status();
    if (*capacity > 0) {
      std::string unavailable;
      auto custom = CustomAllReduce::create_local(gpus, *capacity, &unavailable);
      if (!custom.ok()) return custom.status();
      if (custom->empty()) {
        spdlog::info("tensor parallel: all-reduces through NCCL only: {}", unavailable);
      } else {
        for (int r = 0; r < n; ++r) (*comms)[static_cast<size_t>(r)]->use_custom_all_reduce(std::move((*custom)[static_cast<size_t>(r)]));
      }
    }
    for (int r = 0; r < n; ++r) {
      Rank& rank = *exec->ranks_[static_cast<size_t>(r)];
      rank.owned_comm = std::move((*comms)[static_cast<size_t>(r)]);
      rank.comm = rank.owned_comm.get();
    }
#endif
  }
  // Every rank builds itself on its own thread; followers stay there to follow.
  for (int r = 0; r < n; ++r) {
    exec->threads_.emplace_back([e = exec.get(), r, config, options] { e->run_rank(r, config, options); });
  }
  absl::Status status;
  {
    std::unique_lock lock(exec->mu_);
    exec->cv_.wait(lock, [&] { return exec->setup_done_ == n; });
    for (const absl::Status& st : exec->setup_status_) {
      if (!st.ok()) {
        status = st;
        break;
      }
    }
  }
  if (!status.ok()) return status;  // the destructor stops and joins the followers
  return exec;
}

void TpExecutor::run_rank(int r, const ModelConfig& config, const ExecutorOptions& options) {
  Rank& rank = *ranks_[static_cast<size_t>(r)];
  const int n = tp_size();
  // The group's KV capacity: the smallest of the ranks' (a setup barrier).
  auto agree = [this, r, n](int64_t blocks) -> int64_t {
    std::unique_lock lock(mu_);
    setup_blocks_[static_cast<size_t>(r)] = blocks;
    if (++setup_posted_ == n) cv_.notify_all();
    cv_.wait(lock, [&] { return setup_posted_ == n || broken_; });
    if (broken_) throw CollectiveError("another rank failed while the group was being built");
    return *std::min_element(setup_blocks_.begin(), setup_blocks_.end());
  };
  absl::Status st;
  try {
    st = build_rank(rank, config, options, checkpoint_.get(), agree);
  } catch (const std::exception& e) {
    st = absl::InternalError(absl::StrCat("rank ", r, ": ", e.what()));
  }
  {
    std::lock_guard lock(mu_);
    setup_status_[static_cast<size_t>(r)] = st;
    if (!st.ok()) broken_ = true;
    ++setup_done_;
  }
  cv_.notify_all();
  if (!st.ok()) {
    abort(absl::StrCat("rank ", r, " failed to load: ", st.message()));
    return;
  }
  if (r > 0) follow(r);
}

TpExecutor::~TpExecutor() {
  bool broken;
  {
    std::lock_guard lock(mu_);
    closed_ = true;  // idle followers leave their loop and release their communicators
    broken = broken_;
  }
  cv_.notify_all();
  if (broken) {
    abort("the tensor-parallel executor was shut down");  // a follower inside a collective throws
  } else {
    // A healthy group: every follower has finished or will finish the step it is in (rank 0 took
    // part in all of them). NCCL tears a group down collectively, so rank 0 releases its
    // communicator here while the followers release theirs on their own threads. The runner goes
    // first: its CUDA graphs hold captured collectives, which NCCL waits for before it lets go.
    ranks_[0]->backend->bind_thread();
    ranks_[0]->runner.reset();
    ranks_[0]->owned_comm.reset();
  }
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

void TpExecutor::abort(const std::string& reason) {
  {
    std::lock_guard lock(mu_);
    broken_ = true;
  }
  for (auto& rank : ranks_) {
    if (rank->comm != nullptr) rank->comm->abort(reason);
  }
  // Rank 0 may be waiting in publish() for a follower that stopped; taking mu_ first means it is
  // either before its predicate check (and sees the group broken) or already waiting (and wakes).
  { std::lock_guard lock(mu_); }
  cv_.notify_all();
}

bool TpExecutor::broken() const { return broken_; }

template <typename Fn>
auto TpExecutor::lead(const Batch& batch, Fn&& fn) {
  publish(pack(batch));
  Rank& rank = *ranks_[0];
  try {
    rank.backend->bind_thread();
    return fn(*rank.runner);
  } catch (const std::exception& e) {
    abort(absl::StrCat("rank 0: ", e.what()));
    throw;
  }
}

std::vector<float> TpExecutor::execute(const Batch& batch) {
  return lead(batch, [&](ModelRunner& runner) { return runner.execute(batch); });
}

std::vector<SampleResult> TpExecutor::execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) {
  return lead(batch, [&](ModelRunner& runner) { return runner.execute_and_sample(batch, sampled); });
}

// current step taken by every follower -> step_ + 1 published, taken by none.
void TpExecutor::publish(std::string message) {
  std::unique_lock lock(mu_);
  // A broken group does not wait for followers that have stopped: rank 0's first collective of
  // the step throws the group's error instead.
  cv_.wait(lock, [&] { return num_taken_ == tp_size() - 1 || broken(); });
  message_ = std::move(message);
  ++step_;
  num_taken_ = 0;
  cv_.notify_all();
}

void TpExecutor::follow(int r) {
  Rank& rank = *ranks_[static_cast<size_t>(r)];
  uint64_t seen = 0;
  while (true) {
    std::string message;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return closed_ || step_ != seen; });
      if (closed_) {
        lock.unlock();
        if (!broken()) {
          rank.backend->bind_thread();
          rank.runner.reset();  // see ~TpExecutor
          rank.owned_comm.reset();
        }
        return;
      }
      message = message_;  // a copy: rank 0 may publish the next step while this one runs
      seen = step_;
      if (++num_taken_ == tp_size() - 1) cv_.notify_all();
    }
    try {
      auto batch = unpack(message);
      if (!batch.ok()) throw std::runtime_error(std::string(batch.status().message()));
      rank.runner->execute_only(*batch);
    } catch (const std::exception& e) {
      abort(absl::StrCat("rank ", r, ": ", e.what()));
      return;
    }
  }
}

}  // namespace shardserve
