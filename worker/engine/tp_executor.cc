#include "worker/engine/tp_executor.h"

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "worker/engine/step_message.h"

namespace shardserve {

absl::StatusOr<std::unique_ptr<TpExecutor>> TpExecutor::create(const ModelConfig& config,
                                                               const ExecutorOptions& options) {
  if (options.tp_size < 2) {
    return absl::InvalidArgumentError(absl::StrCat("TpExecutor needs tp_size >= 2, got ", options.tp_size));
  }
  auto exec = std::unique_ptr<TpExecutor>(new TpExecutor(options.tp_size));
  exec->num_taken_ = options.tp_size - 1;  // nothing published yet: nothing left to take
  auto ckpt = Checkpoint::open(options.model_dir);
  if (!ckpt.ok()) return ckpt.status();
  exec->checkpoint_ = std::move(*ckpt);

  // The ranks share the machine's cores; each backend spreads its matrix products over its part.
  const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / options.tp_size);
  for (int r = 0; r < options.tp_size; ++r) {
    auto rank = std::make_unique<Rank>();
    rank->backend = std::make_unique<CpuBackend>(threads);
    auto model = LlamaModel::load(config, *exec->checkpoint_, *rank->backend, exec->group_.comm(r));
    if (!model.ok()) return model.status();
    rank->model = std::move(*model);
    exec->ranks_.push_back(std::move(rank));
  }
  // Every rank holds the same number of KV heads, so the same bytes per token and blocks.
  auto blocks = kv_cache_blocks(options, exec->ranks_[0]->model->kv_bytes_per_token());
  if (!blocks.ok()) return blocks.status();
  for (auto& rank : exec->ranks_) {
    rank->runner = std::make_unique<ModelRunner>(*rank->model, *rank->backend, *blocks, options.block_size,
                                                 options.max_model_len);
  }
  for (int r = 1; r < options.tp_size; ++r) {
    exec->ranks_[static_cast<size_t>(r)]->thread = std::thread([e = exec.get(), r] { e->follow(r); });
  }
  return exec;
}

TpExecutor::~TpExecutor() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;  // idle followers exit
  }
  cv_.notify_all();
  group_.abort("the tensor-parallel executor was shut down");  // a follower inside a collective throws
  for (auto& rank : ranks_) {
    if (rank->thread.joinable()) rank->thread.join();
  }
}

std::vector<float> TpExecutor::execute(const Batch& batch) {
  publish(pack(batch));
  try {
    return ranks_[0]->runner->execute(batch);
  } catch (const std::exception& e) {
    group_.abort(absl::StrCat("rank 0: ", e.what()));
    throw;
  }
}

// current step taken by every follower -> step_ + 1 published, taken by none.
void TpExecutor::publish(std::string message) {
  std::unique_lock lock(mu_);
  // A broken group does not wait for followers that have stopped: rank 0's first collective of
  // the step throws the group's error instead.
  cv_.wait(lock, [&] { return num_taken_ == tp_size() - 1 || group_.broken(); });
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
      if (closed_) return;
      message = message_;  // a copy: rank 0 may publish the next step while this one runs
      seen = step_;
      if (++num_taken_ == tp_size() - 1) cv_.notify_all();
    }
    try {
      auto batch = unpack(message);
      if (!batch.ok()) throw std::runtime_error(std::string(batch.status().message()));
      rank.runner->execute(*batch);
    } catch (const std::exception& e) {
      group_.abort(absl::StrCat("rank ", r, ": ", e.what()));
      // Rank 0 may be waiting in publish() for this follower; taking mu_ first means it is either
      // before its predicate check (and sees the group broken) or already waiting (and wakes).
      { std::lock_guard lock(mu_); }
      cv_.notify_all();
      return;
    }
  }
}

}  // namespace shardserve
