#include "worker/engine/scheduler.h"

#include <algorithm>

namespace shardserve {

Scheduler::Scheduler(const SchedulerConfig& config, BlockManager& blocks) : config_(config), blocks_(blocks) {}

void Scheduler::add(Sequence* seq) {
  seq->status = SequenceStatus::kWaiting;
  waiting_.push_back(seq);
}

void Scheduler::abort(Sequence* seq) {
  if (seq->is_finished()) return;
  if (seq->status == SequenceStatus::kWaiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  } else {
    running_.erase(std::find(running_.begin(), running_.end(), seq));
  }
  blocks_.free(*seq);
  seq->status = SequenceStatus::kAborted;  // waiting|running -> aborted
  seq->finish_reason = "abort";
}

void Scheduler::preempt(Sequence* seq) {
  running_.erase(std::find(running_.begin(), running_.end(), seq));
  blocks_.free(*seq);
  seq->status = SequenceStatus::kWaiting;  // running -> waiting (recompute)
  ++seq->num_preemptions;
  ++num_preemptions_;
  waiting_.push_front(seq);
}

std::vector<ScheduledSequence> Scheduler::schedule() {
  std::vector<ScheduledSequence> out;
  int64_t budget = config_.max_num_batched_tokens;
  bool preempted = false;

  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i];
    const int64_t n = std::min(seq->size() - seq->num_computed_tokens, budget);
    const int64_t target = seq->num_computed_tokens + n;
    bool self_preempted = false;
    while (!blocks_.can_grow(*seq, target)) {
      Sequence* victim = running_.back();
      preempt(victim);
      preempted = true;
      if (victim == seq) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;  // seq was the newest: nothing after it is running
    blocks_.grow(*seq, target);
    out.push_back({seq, n, target == seq->size()});
    budget -= n;
    ++i;
  }

  while (!preempted && !waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < config_.max_num_seqs) {
    Sequence* seq = waiting_.front();
    if (!blocks_.can_allocate(*seq)) break;
    waiting_.pop_front();
    blocks_.allocate(*seq);
    seq->status = SequenceStatus::kRunning;  // waiting -> running
    running_.push_back(seq);
    const int64_t n = std::min(seq->size() - seq->num_computed_tokens, budget);
    out.push_back({seq, n, seq->num_computed_tokens + n == seq->size()});
    budget -= n;
  }
  return out;
}

std::vector<Sequence*> Scheduler::update(const std::vector<ScheduledSequence>& scheduled,
                                         const std::vector<int32_t>& sampled,
                                         const std::vector<int64_t>& eos_token_ids, int64_t max_model_len) {
  std::vector<Sequence*> finished;
  size_t next_sample = 0;
  for (const ScheduledSequence& s : scheduled) {
    Sequence* seq = s.seq;
    seq->num_computed_tokens += s.num_tokens;
    blocks_.cache_computed(*seq);
    if (!s.sample) continue;
    const int32_t token = sampled.at(next_sample++);
    seq->tokens.push_back(token);
    const auto& p = seq->params;
    const bool is_eos = !p.ignore_eos && std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end();
    const bool is_stop = std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end();
    if (is_eos || is_stop) {
      seq->finish_reason = "stop";
    } else if (seq->num_output_tokens() >= p.max_tokens || seq->size() >= max_model_len) {
      seq->finish_reason = "length";
    } else {
      continue;
    }
    running_.erase(std::find(running_.begin(), running_.end(), seq));
    blocks_.free(*seq);
    seq->status = SequenceStatus::kFinished;  // running -> finished
    finished.push_back(seq);
  }
  return finished;
}

}  // namespace shardserve
