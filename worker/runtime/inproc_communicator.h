// InProcessGroup: a tensor-parallel group whose N ranks are threads of one process, for the CPU
// backend. The group makes one Communicator per rank; each rank's thread calls the collectives
// on its own communicator, on host FP32 tensors.
//
// A collective is a rendezvous: every rank copies its tensor into its slot (memory the group
// owns, so a rank that leaves early frees nothing the others read), waits at a barrier, reads
// what it needs from all slots into its own output, and waits at a second barrier before the next
// collective may overwrite the slots. The last rank to arrive at the first barrier checks that
// all ranks called the same collective on the same size before anyone reads. Reductions add the
// ranks' tensors in rank order on every rank, so all ranks get bitwise identical results and
// their residual streams never drift apart. The extra copy is nothing next to the matmuls of
// the CPU reference.
//
// Failure: a rank that waits longer than `timeout` at a barrier breaks the group, as does a
// mismatch between ranks (different collectives or sizes called at the same point). A broken
// group throws CollectiveError from the collective that detects it and from every collective
// after it, on every rank, naming what went wrong (for a timeout: the ranks that never arrived).
// Throwing rather than aborting lets the rank's thread stop cleanly and lets tests check the
// message; a caller that does not catch it ends the process with that message, which is what a
// group that lost a rank must do anyway (its KV caches are no longer in step).
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "worker/runtime/communicator.h"

namespace shardserve {

class InProcessGroup {
 public:
  // Long enough that a slow rank on a loaded CI machine is never mistaken for a lost one (ranks
  // run the same work between collectives), short enough that a hang becomes an error.
  static constexpr std::chrono::milliseconds kDefaultTimeout{60'000};

  explicit InProcessGroup(int world_size, std::chrono::milliseconds timeout = kDefaultTimeout);
  InProcessGroup(const InProcessGroup&) = delete;
  InProcessGroup& operator=(const InProcessGroup&) = delete;
  ~InProcessGroup();

  int world_size() const { return world_size_; }
  // Rank r's communicator, owned by the group; 0 <= rank < world_size.
  Communicator& comm(int rank);

  // ok -> broken: every waiting and later collective throws CollectiveError(reason). The first
  // reason is kept. Used by a rank that fails outside a collective, so the others stop at once
  // instead of waiting out the timeout.
  void abort(const std::string& reason);
  bool broken() const;

 private:
  class Rank;
  friend class Rank;

  // What a rank posts at the first barrier of a collective.
  struct Slot {
    const char* op = nullptr;
    std::vector<float> data;
  };
  // Copies `data` into rank's slot (when op is set: the first barrier of a collective) and waits
  // until all ranks have arrived. Throws CollectiveError when the group is or becomes broken.
  void barrier(int rank, const char* op, const float* data, int64_t numel, const char* name);
  // Breaks the group (keeping the first reason) and throws; fail_locked with mu_ held.
  [[noreturn]] void fail_locked(const std::string& reason);
  [[noreturn]] void fail(const std::string& reason);
  // Valid on every rank between the two barriers of a collective.
  const std::vector<Slot>& slots() const { return slots_; }

  const int world_size_;
  const std::chrono::milliseconds timeout_;
  std::vector<std::unique_ptr<Rank>> ranks_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  int num_arrived_ = 0;        // at the current barrier
  uint64_t generation_ = 0;    // barriers completed
  std::vector<char> arrived_;  // per rank, at the current barrier
  std::vector<Slot> slots_;    // written at a collective's first barrier, read between its two
  bool broken_ = false;
  std::string reason_;
};

}  // namespace shardserve
