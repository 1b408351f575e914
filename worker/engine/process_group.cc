#include "worker/engine/process_group.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "worker/engine/rank.h"
#include "worker/engine/step_message.h"
#include "worker/runtime/socket_communicator.h"
#ifdef SHARDSERVE_WITH_CUDA
#include "worker/runtime/cuda_backend.h"
#include "worker/runtime/custom_all_reduce.h"
#include "worker/runtime/nccl_communicator.h"
#endif

namespace shardserve {
namespace {

constexpr char kHello[] = "SSGROUP1";

std::string encode_i64(int64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff);
  return s;
}
absl::StatusOr<int64_t> decode_i64(const absl::StatusOr<std::string>& s) {
  if (!s.ok()) return s.status();
  if (s->size() != 8) return absl::DataLossError("expected an 8-byte integer");
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>((*s)[i])) << (8 * i);
  return static_cast<int64_t>(v);
}

// This rank's communicator: NCCL on GPUs, the group's connections on CPUs.
absl::Status make_communicator(Rank& rank, const ExecutorOptions& options, const GroupOptions& group,
                               std::vector<FrameSocket*> peers) {
  if (options.backend == "cpu") {
    rank.owned_comm = std::make_unique<SocketCommunicator>(group.rank, group.tp_size, std::move(peers),
                                                           group.collective_timeout);
    rank.comm = rank.owned_comm.get();
    return absl::OkStatus();
  }
#ifdef SHARDSERVE_WITH_CUDA
  if (group.nccl_unique_id.empty()) {
    return absl::FailedPreconditionError("a GPU group needs rank 0's NCCL unique id, and none was given");
  }
  auto& gpu = *static_cast<CudaBackend*>(rank.backend.get());
  auto comm = NcclCommunicator::create(gpu, group.nccl_unique_id, group.rank, group.tp_size, group.collective_timeout);
  if (!comm.ok()) return comm.status();
  // The one-shot all-reduce for decode sizes: its buffers' IPC handles go around the group's
  // connections (rank 0 gathers every rank's and sends the list back), twice: handles, then
  // whether every rank mapped them.
  auto capacity = CustomAllReduce::configured_capacity();
  if (!capacity.ok()) return capacity.status();
  CustomAllReduce::Exchange exchange = [&](const std::string& mine) -> absl::StatusOr<std::vector<std::string>> {
    return exchange_through_leader(group, peers, mine);
  };
  std::string unavailable;
  auto custom = CustomAllReduce::create(gpu, group.rank, group.tp_size, exchange, *capacity, &unavailable);
  if (!custom.ok()) return custom.status();
  if (*custom != nullptr) {
    spdlog::info("group: rank {} takes all-reduces of up to {} bytes through the one-shot kernel, larger ones through NCCL",
                 group.rank, *capacity);
    (*comm)->use_custom_all_reduce(std::move(*custom));
  } else {
    spdlog::info("group: rank {} all-reduces through NCCL only: {}", group.rank, unavailable);
  }
  rank.owned_comm = std::move(*comm);
  rank.comm = rank.owned_comm.get();
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError("this build has no CUDA backend");
#endif
}

absl::StatusOr<std::unique_ptr<Checkpoint>> open_checkpoint(const ExecutorOptions& options) {
  if (!options.synthetic.empty()) return std::unique_ptr<Checkpoint>();
  return Checkpoint::open(options.model_dir);
}

class GroupLeader final : public StepExecutor {
 public:
  ~GroupLeader() override {
    stop_ = true;
    if (monitor_.joinable()) monitor_.join();
    rank_.runner.reset();  // CUDA graphs hold captured collectives: before the communicator
    // Closing the connections ends the followers, which then release their communicators while
    // this rank releases its own: NCCL tears a group down with every rank at once.
    followers_.clear();
    rank_.owned_comm.reset();
  }
  template <typename Fn>
  auto lead(const Batch& batch, Fn&& fn) {
    const std::string message = pack(batch);
    for (size_t i = 0; i < followers_.size(); ++i) {
      if (auto st = followers_[i]->send(message); !st.ok()) {
        rank_.comm->abort(absl::StrCat("rank ", i + 1, " is gone: ", st.message()));
        throw CollectiveError(absl::StrCat("rank 0: rank ", i + 1, " is gone: ", st.message()));
      }
    }
    rank_.backend->bind_thread();
    try {
      return fn(*rank_.runner);
    } catch (const std::exception& e) {
      rank_.comm->abort(absl::StrCat("rank 0: ", e.what()));
      throw;
    }
  }
  std::vector<float> execute(const Batch& batch) override {
    return lead(batch, [&](ModelRunner& runner) { return runner.execute(batch); });
  }
  std::vector<SampleResult> execute_and_sample(const Batch& batch, const std::vector<const Sequence*>& sampled) override {
    return lead(batch, [&](ModelRunner& runner) { return runner.execute_and_sample(batch, sampled); });
  }
  const ModelConfig& config() const override { return rank_.model->config(); }
  int64_t num_blocks() const override { return rank_.runner->num_blocks(); }
  int64_t block_size() const override { return rank_.runner->block_size(); }

  // GPU groups: a follower process that exits closes its connection; abort at once rather than
  // wait for the collective timeout. (CPU groups see it in the collective itself.)
  void start_monitor() {
    monitor_ = std::thread([this] {
      while (!stop_) {
        for (size_t i = 0; i < followers_.size(); ++i) {
          if (followers_[i]->peer_closed()) {
            rank_.comm->abort(absl::StrCat("rank ", i + 1, "'s process closed its connection (exited?)"));
            return;
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }

  std::vector<std::unique_ptr<FrameSocket>> followers_;  // [r - 1]
  std::unique_ptr<Checkpoint> checkpoint_;
  Rank rank_;
  std::atomic<bool> stop_{false};
  std::thread monitor_;
};

}  // namespace

absl::StatusOr<std::vector<std::string>> exchange_through_leader(const GroupOptions& group,
                                                                 const std::vector<FrameSocket*>& peers,
                                                                 const std::string& mine) {
  std::vector<std::string> all(static_cast<size_t>(group.tp_size));
  if (group.rank != 0) {
    if (peers.size() != 1) return absl::InvalidArgumentError("a follower exchanges through its one connection to rank 0");
    if (auto st = peers[0]->send(mine); !st.ok()) return st;
    auto packed = peers[0]->receive(group.collective_timeout);
    if (!packed.ok()) return packed.status();
    size_t at = 0;
    for (std::string& entry : all) {
      auto size = decode_i64(packed->size() >= at + 8 ? absl::StatusOr<std::string>(packed->substr(at, 8))
                                                      : absl::DataLossError("a truncated exchange"));
      if (!size.ok() || *size < 0 || packed->size() < at + 8 + static_cast<size_t>(*size)) {
        return absl::DataLossError("rank 0 sent a malformed exchange");
      }
      entry = packed->substr(at + 8, static_cast<size_t>(*size));
      at += 8 + static_cast<size_t>(*size);
    }
    if (at != packed->size()) return absl::DataLossError("rank 0 sent a malformed exchange");
    return all;
  }
  if (static_cast<int>(peers.size()) != group.tp_size - 1) {
    return absl::InvalidArgumentError("rank 0 exchanges through one connection per follower");
  }
  all[0] = mine;
  for (size_t i = 0; i < peers.size(); ++i) {
    auto theirs = peers[i]->receive(group.collective_timeout);
    if (!theirs.ok()) {
      return absl::UnavailableError(absl::StrCat("rank 0: rank ", i + 1, " did not take part in an exchange: ",
                                                 theirs.status().message()));
    }
    all[i + 1] = std::move(*theirs);
  }
  std::string packed;
  for (const std::string& entry : all) packed += encode_i64(static_cast<int64_t>(entry.size())) + entry;
  for (FrameSocket* peer : peers) {
    if (auto st = peer->send(packed); !st.ok()) return st;
  }
  return all;
}

std::string make_nccl_unique_id() {
#ifdef SHARDSERVE_WITH_CUDA
  auto id = NcclCommunicator::new_unique_id();
  if (id.ok()) return *id;
#endif
  return "";
}

absl::StatusOr<LoadedModel> start_group_leader(const ExecutorOptions& options, const GroupOptions& group,
                                               FrameListener& listener) {
  auto described = describe_model(options);
  if (!described.ok()) return described.status();
  LoadedModel loaded = std::move(*described);
  auto leader = std::make_unique<GroupLeader>();
  leader->followers_.resize(static_cast<size_t>(group.tp_size - 1));
  // Followers arrive in any order; each says its rank first.
  const auto deadline = std::chrono::steady_clock::now() + group.join_timeout;
  for (int joined = 0; joined < group.tp_size - 1; ++joined) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    auto sock = listener.accept(std::max(left, std::chrono::milliseconds(1)));
    if (!sock.ok()) {
      return absl::DeadlineExceededError(absl::StrCat("rank 0: only ", joined, " of ", group.tp_size - 1,
                                                      " followers joined within ", group.join_timeout.count(), " ms"));
    }
    auto hello = (*sock)->receive(std::chrono::seconds(10));
    const std::string prefix(kHello);
    if (!hello.ok() || hello->size() != prefix.size() + 8 || hello->compare(0, prefix.size(), prefix) != 0) {
      spdlog::warn("group: ignoring a connection from {} that is not a follower", (*sock)->peer());
      --joined;
      continue;
    }
    auto r = decode_i64(hello->substr(prefix.size()));
    if (!r.ok() || *r < 1 || *r >= group.tp_size || leader->followers_[static_cast<size_t>(*r - 1)]) {
      return absl::FailedPreconditionError(absl::StrCat("rank 0: a follower claims rank ", r.value_or(-1),
                                                        ", which is outside the group or taken"));
    }
    spdlog::info("group: rank {} joined from {}", *r, (*sock)->peer());
    leader->followers_[static_cast<size_t>(*r - 1)] = std::move(*sock);
  }
  auto ckpt = open_checkpoint(options);
  if (!ckpt.ok()) return ckpt.status();
  leader->checkpoint_ = std::move(*ckpt);
  auto backend = make_backend(options, loaded.config, 0);
  if (!backend.ok()) return backend.status();
  leader->rank_.backend = std::move(*backend);
  std::vector<FrameSocket*> peers;
  for (auto& f : leader->followers_) peers.push_back(f.get());
  if (auto st = make_communicator(leader->rank_, options, group, peers); !st.ok()) return st;
  GroupLeader* l = leader.get();
  auto agree = [l, &group](int64_t blocks) -> int64_t {
    int64_t agreed = blocks;
    for (auto& f : l->followers_) {
      auto theirs = decode_i64(f->receive(group.collective_timeout));
      if (!theirs.ok()) throw CollectiveError(absl::StrCat("rank 0: a follower did not report its KV capacity: ", theirs.status().message()));
      agreed = std::min(agreed, *theirs);
    }
    for (auto& f : l->followers_) {
      if (auto st = f->send(encode_i64(agreed)); !st.ok()) throw CollectiveError(std::string(st.message()));
    }
    return agreed;
  };
  absl::Status built;
  try {
    built = build_rank(leader->rank_, loaded.config, options, leader->checkpoint_.get(), agree);
  } catch (const std::exception& e) {
    built = absl::UnavailableError(e.what());
  }
  if (!built.ok()) {
    leader->rank_.comm->abort(std::string(built.message()));
    return built;
  }
  if (options.backend != "cpu") leader->start_monitor();
  loaded.executor = std::move(leader);
  return loaded;
}

absl::Status run_group_follower(const ExecutorOptions& options, const GroupOptions& group) {
  auto described = describe_model(options);
  if (!described.ok()) return described.status();
  auto sock = FrameSocket::connect(group.leader_address, group.join_timeout);
  if (!sock.ok()) return sock.status();
  if (auto st = (*sock)->send(std::string(kHello) + encode_i64(group.rank)); !st.ok()) return st;
  auto ckpt = open_checkpoint(options);
  if (!ckpt.ok()) return ckpt.status();
  Rank rank;
  auto backend = make_backend(options, described->config, 0);
  if (!backend.ok()) return backend.status();
  rank.backend = std::move(*backend);
  if (auto st = make_communicator(rank, options, group, {sock->get()}); !st.ok()) return st;
  FrameSocket& leader = **sock;
  auto agree = [&leader, &group](int64_t blocks) -> int64_t {
    if (auto st = leader.send(encode_i64(blocks)); !st.ok()) throw CollectiveError(std::string(st.message()));
    auto agreed = decode_i64(leader.receive(group.collective_timeout));
    if (!agreed.ok()) throw CollectiveError(absl::StrCat("rank 0 did not answer with the group's KV capacity: ", agreed.status().message()));
    return *agreed;
  };
  absl::Status status;
  try {
    status = build_rank(rank, described->config, options, ckpt->get(), agree);
    if (status.ok()) spdlog::info("group: rank {} of {} ready, following rank 0", group.rank, group.tp_size);
    while (status.ok()) {
      auto message = leader.receive(std::chrono::milliseconds(-1));
      if (!message.ok()) {
        if (message.status().code() == absl::StatusCode::kUnavailable) {
          spdlog::info("group: rank 0 closed the group ({})", std::string(message.status().message()));
          break;
        }
        status = message.status();
        break;
      }
      auto batch = unpack(*message);
      if (!batch.ok()) {
        status = batch.status();
        break;
      }
      rank.runner->execute_only(*batch);
    }
  } catch (const std::exception& e) {
    status = absl::UnavailableError(absl::StrCat("rank ", group.rank, ": ", e.what()));
  }
  if (!status.ok() && rank.comm != nullptr) rank.comm->abort(std::string(status.message()));
  rank.runner.reset();  // CUDA graphs hold captured collectives: before the communicator
  return status;
}

}  // namespace shardserve
