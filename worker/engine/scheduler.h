// Scheduler: iteration-level continuous batching over a BlockManager. Pure CPU logic.
//
// Each step it first serves the running sequences, oldest first: a decode token each, or the
// next chunk of a prompt still being prefilled, all within the token budget
// (max_num_batched_tokens). A running sequence that needs a block when none is free preempts the
// newest running sequence (blocks freed, back to the front of the waiting queue, recomputed
// later; with prefix caching most of it comes back as hits), possibly itself. Then, if nothing was
// preempted, it admits waiting sequences in FCFS order while the budget, max_num_seqs and the free
// blocks allow; a prompt longer than the remaining budget is prefilled in chunks over several steps.
// Admission gives a sequence blocks for all its tokens, and requests whose prompt + max_tokens could
// never fit in the whole cache are refused by the engine before they get here, so one sequence
// always fits alone: preemption always makes progress and never deadlocks.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "worker/engine/block_manager.h"
#include "worker/engine/sequence.h"

namespace shardserve {

struct SchedulerConfig {
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 2048;
};

struct ScheduledSequence {
  Sequence* seq = nullptr;
  int64_t num_tokens = 0;  // tokens [num_computed_tokens, + num_tokens) run this step
  bool sample = false;     // this step reaches the sequence's end: it samples a token
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, BlockManager& blocks);

  // (new) -> waiting, at the back of the queue.
  void add(Sequence* seq);
  // waiting|running -> aborted; frees its blocks at once. No-op for finished sequences.
  void abort(Sequence* seq);
  // Chooses this step's work; see the class comment. Empty when there is nothing to run.
  std::vector<ScheduledSequence> schedule();
  // After the step ran: advances computed tokens, appends sampled tokens (one per sampling
  // sequence, in order) and finishes sequences that hit EOS, a stop token, max_tokens or
  // max_model_len (running -> finished, blocks freed). Returns the sequences that finished.
  std::vector<Sequence*> update(const std::vector<ScheduledSequence>& scheduled,
                                const std::vector<int32_t>& sampled,
                                const std::vector<int64_t>& eos_token_ids, int64_t max_model_len);

  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  void preempt(Sequence* seq);

  SchedulerConfig config_;
  BlockManager& blocks_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // in admission order: the back is the newest
  int64_t num_preemptions_ = 0;
};

}  // namespace shardserve
