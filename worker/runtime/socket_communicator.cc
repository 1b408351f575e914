#include "worker/runtime/socket_communicator.h"

#include <sys/socket.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

void require_f32(const Tensor& t, const char* what) {
  if (t.dtype != DType::kF32) throw std::logic_error(std::string("SocketCommunicator: ") + what + " must be F32 (CPU ranks)");
}

}  // namespace

SocketCommunicator::SocketCommunicator(int rank, int world_size, std::vector<FrameSocket*> peers,
                                       std::chrono::milliseconds timeout)
    : rank_(rank), world_size_(world_size), peers_(std::move(peers)), timeout_(timeout) {}

void SocketCommunicator::fail(const std::string& reason) {
  abort(reason);
  std::lock_guard lock(mu_);
  throw CollectiveError(reason_);
}

void SocketCommunicator::abort(const std::string& reason) {
  std::lock_guard lock(mu_);
  if (broken_.exchange(true)) return;
  reason_ = reason;
  for (FrameSocket* p : peers_) shutdown(p->fd(), SHUT_RDWR);  // peers blocked on us fail at once
}

// Rank 0 receives every rank's bytes (in rank order), combines them and sends the result to all;
// a follower sends its bytes and receives the result.
std::string SocketCommunicator::exchange(const char* op, const std::string& mine, bool gather) {
  if (broken_.load()) {
    std::lock_guard lock(mu_);
    throw CollectiveError(reason_);
  }
  if (rank_ > 0) {
    if (auto st = peers_[0]->send(mine); !st.ok()) fail(absl::StrCat("rank ", rank_, ": ", op, ": ", st.message()));
    auto result = peers_[0]->receive(timeout_);
    if (!result.ok()) fail(absl::StrCat("rank ", rank_, ": ", op, ": rank 0: ", result.status().message()));
    return *result;
  }
  std::string result = mine;
  std::vector<float> sum;
  if (!gather) {
    sum.resize(mine.size() / 4);
    std::memcpy(sum.data(), mine.data(), mine.size());
  }
  for (size_t i = 0; i < peers_.size(); ++i) {
    auto theirs = peers_[i]->receive(timeout_);
    if (!theirs.ok()) {
      fail(absl::StrCat("rank 0: ", op, ": rank ", i + 1, " is stuck or gone (", theirs.status().message(), ")"));
    }
    if (theirs->size() != mine.size()) {
      fail(absl::StrCat("rank 0: ", op, ": rank ", i + 1, " sent ", theirs->size(), " bytes, expected ", mine.size(),
                        " (ranks out of step)"));
    }
    if (gather) {
      result += *theirs;
    } else {
      const float* t = reinterpret_cast<const float*>(theirs->data());
      for (size_t k = 0; k < sum.size(); ++k) sum[k] += t[k];
    }
  }
  if (!gather) std::memcpy(result.data(), sum.data(), result.size());
  for (size_t i = 0; i < peers_.size(); ++i) {
    if (auto st = peers_[i]->send(result); !st.ok()) fail(absl::StrCat("rank 0: ", op, ": rank ", i + 1, ": ", st.message()));
  }
  return result;
}

void SocketCommunicator::all_reduce(Tensor& x) {
  require_f32(x, "all_reduce");
  const std::string mine(static_cast<const char*>(x.data), x.nbytes());
  const std::string sum = exchange("all_reduce", mine, false);
  std::memcpy(x.data, sum.data(), x.nbytes());
}

void SocketCommunicator::all_gather(const Tensor& x, Tensor& out) {
  require_f32(x, "all_gather input");
  require_f32(out, "all_gather output");
  if (out.numel() != x.numel() * world_size_) throw std::logic_error("all_gather: out must hold world_size copies of x");
  const std::string mine(static_cast<const char*>(x.data), x.nbytes());
  const std::string all = exchange("all_gather", mine, true);
  std::memcpy(out.data, all.data(), out.nbytes());
}

}  // namespace shardserve
