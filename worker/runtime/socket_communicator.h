// SocketCommunicator: the collectives of a tensor-parallel group of CPU ranks in separate
// processes, over the group's TCP connections (FrameSocket): a star through rank 0, which adds
// the ranks' tensors in rank order (bitwise identical results everywhere, as InProcessGroup) and
// sends the result back. The CPU backend's stand-in for NCCL, so the multi-process group (rank 0
// sending step messages, followers following, a rank lost or stuck) runs and is tested anywhere.
//
// The same connections carry the step messages (worker/engine/process_group.h): a follower reads
// the next step's message, then within the step the collectives' results, in the order rank 0
// sends them; rank 0 sends the next step only after finishing this one.
//
// Failure: a rank that sends nothing within `timeout` (stuck, SIGSTOPped) or whose connection
// closes (dead) breaks the collective with CollectiveError naming it; abort() shuts the
// connections down so the peers fail at once too.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "worker/runtime/communicator.h"
#include "worker/runtime/frame_socket.h"

namespace shardserve {

class SocketCommunicator final : public Communicator {
 public:
  // Rank 0: peers[r - 1] is the connection to rank r. Rank r > 0: peers = {connection to rank 0}.
  // The sockets stay owned by the caller and must outlive the communicator.
  SocketCommunicator(int rank, int world_size, std::vector<FrameSocket*> peers, std::chrono::milliseconds timeout);

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  void all_reduce(Tensor& x) override;
  void all_gather(const Tensor& x, Tensor& out) override;
  void abort(const std::string& reason) override;

 private:
  std::string exchange(const char* op, const std::string& mine, bool gather);
  [[noreturn]] void fail(const std::string& reason);

  int rank_;
  int world_size_;
  std::vector<FrameSocket*> peers_;
  std::chrono::milliseconds timeout_;
  std::atomic<bool> broken_{false};
  std::mutex mu_;
  std::string reason_;
};

}  // namespace shardserve
