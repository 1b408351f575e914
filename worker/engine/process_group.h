// A tensor-parallel group of processes, one rank each (one per GPU; CPU ranks too, so the same
// code runs and is tested without GPUs): `shardserve-worker --rank R` for R = 0 .. N-1.
//
// Rendezvous: rank 0 listens on a TCP port (its group address) and, for GPU groups, makes the
// NCCL unique id; the coordinator hands both to the followers when they register. Each follower
// connects, says its rank; then every rank builds itself (rank.h) — GPU ranks join NCCL with the
// id and swap their one-shot all-reduce buffers' CUDA IPC handles through the connections
// (custom_all_reduce.h), CPU ranks talk through the connections (SocketCommunicator) — and the
// group agrees on its KV blocks (followers send theirs, rank 0 answers with the minimum).
//
// Steps: rank 0 (GroupLeader, the engine's StepExecutor) sends each step's packed batch
// (step_message.h) to every follower, then runs its own shard; followers (run_group_follower)
// receive, unpack and run the same step, and drop the logits.
//
// Failure, never a silent hang: a follower that does not arrive within `timeout` fails the
// leader's start; a follower process that dies closes its connection, which the leader notices
// (a monitor for GPU groups, the collective itself for CPU groups) and aborts its communicator; a
// stuck follower (SIGSTOP) makes the leader's collective time out (NCCL watchdog or socket
// deadline). Either way rank 0's execute() throws CollectiveError, and the worker exits saying
// why, so the orchestrator restarts the group. A follower whose leader is gone exits too.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/executor.h"
#include "worker/runtime/frame_socket.h"

namespace shardserve {

struct GroupOptions {
  int rank = 0;
  int tp_size = 1;
  std::string leader_address;   // followers: rank 0's group address, host:port
  std::string nccl_unique_id;   // GPU groups: rank 0's id, the same on every rank
  // How long rank 0 waits for the followers to connect, and how long any collective may take.
  std::chrono::milliseconds join_timeout{300'000};
  std::chrono::milliseconds collective_timeout{60'000};
};

// Rank 0: waits for the followers on `listener`, builds its rank, returns the group's executor.
absl::StatusOr<LoadedModel> start_group_leader(const ExecutorOptions& options, const GroupOptions& group,
                                               FrameListener& listener);

// Rank R > 0: joins the leader and follows its steps until the leader closes the group (OK) or
// something fails (the error).
absl::Status run_group_follower(const ExecutorOptions& options, const GroupOptions& group);

// Every rank's `mine`, index = rank, through the group's connections (a collective of the group's
// control channel, used while it is built): followers send theirs to rank 0 (peers = {rank 0}) and
// receive the list; rank 0 (peers = its followers, by rank) gathers and sends it to each. Errors:
// a lost or silent peer (group.collective_timeout), a malformed answer.
absl::StatusOr<std::vector<std::string>> exchange_through_leader(const GroupOptions& group,
                                                                 const std::vector<FrameSocket*>& peers,
                                                                 const std::string& mine);

// A fresh NCCL unique id where this build has NCCL (empty otherwise, or when NCCL cannot make one).
std::string make_nccl_unique_id();

}  // namespace shardserve
