#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

namespace shardserve {

namespace {

TokenLogprobs logprobs_of(const float* logits, int64_t vocab, int32_t chosen, int64_t top_n) {
  double max = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) max = std::max(max, double(logits[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - max);
  const double log_z = max + std::log(sum);
  TokenLogprobs out;
  out.token_id = chosen;
  out.logprob = static_cast<float>(logits[chosen] - log_z);
  if (top_n > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    const auto n = std::min<int64_t>(top_n, vocab);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
    });
    for (int64_t i = 0; i < n; ++i) out.top.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - log_z));
  }
  return out;
}

}  // namespace

SampleResult sample(const Sequence& seq, const float* raw, int64_t vocab) {
  const SamplingParams& p = seq.params;
  std::vector<double> logits(raw, raw + vocab);

  if (p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) {
    std::unordered_map<int32_t, int64_t> output_counts;
    for (int64_t i = seq.num_prompt_tokens; i < seq.size(); ++i) ++output_counts[seq.tokens[i]];
    if (p.repetition_penalty != 1.0) {
      std::vector<bool> seen(static_cast<size_t>(vocab), false);
      for (int32_t t : seq.tokens) seen[t] = true;
      for (int64_t i = 0; i < vocab; ++i) {
        if (seen[i]) logits[i] = logits[i] > 0 ? logits[i] / p.repetition_penalty : logits[i] * p.repetition_penalty;
      }
    }
    for (const auto& [t, count] : output_counts) {
      logits[t] -= p.frequency_penalty * double(count) + p.presence_penalty;
    }
  }

  int32_t chosen = 0;
  if (p.temperature == 0.0) {
    chosen = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates sorted by logit, best first (ties: lower id first).
    std::vector<int32_t> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
    });
    int64_t keep = vocab;
    if (p.top_k > 0) keep = std::min(keep, p.top_k);
    std::vector<double> probs(static_cast<size_t>(keep));
    const double top = logits[order[0]] / p.temperature;
    double total = 0.0;
    for (int64_t i = 0; i < keep; ++i) total += probs[i] = std::exp(logits[order[i]] / p.temperature - top);
    if (p.top_p < 1.0) {
      // Smallest prefix whose mass reaches top_p (always at least one token).
      double mass = 0.0;
      int64_t n = 0;
      while (n < keep && mass < p.top_p * total) mass += probs[n++];
      keep = std::max<int64_t>(n, 1);
    }
    if (p.min_p > 0.0) {
      // probs[0] is the largest; drop tokens under min_p times it.
      int64_t n = 1;
      while (n < keep && probs[n] >= p.min_p * probs[0]) ++n;
      keep = n;
    }
    total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
    const double target = counter_uniform(seq.seed, static_cast<uint64_t>(seq.num_output_tokens())) * total;
    double cum = 0.0;
    chosen = order[keep - 1];
    for (int64_t i = 0; i < keep; ++i) {
      cum += probs[i];
      if (target < cum) {
        chosen = order[i];
        break;
      }
    }
  }

  SampleResult result;
  result.token_id = chosen;
  if (p.logprobs >= 0) result.logprobs = logprobs_of(raw, vocab, chosen, p.logprobs);
  return result;
}

// The device sampler's row for a sequence, and its penalty entries: every distinct token of the
// sequence with its count in the output (only the output's tokens when repetition_penalty is off,
// since presence/frequency touch only those).
SamplingRow device_sampling_row(const Sequence& seq, std::vector<PenaltyEntry>& entries) {
  const SamplingParams& p = seq.params;
  SamplingRow r;
  r.temperature = p.temperature;
  r.top_p = p.top_p;
  r.min_p = p.min_p;
  r.repetition_penalty = p.repetition_penalty;
  r.presence_penalty = p.presence_penalty;
  r.frequency_penalty = p.frequency_penalty;
  r.seed = seq.seed;
  r.counter = static_cast<uint64_t>(seq.num_output_tokens());
  r.top_k = p.top_k > 0 ? static_cast<int32_t>(std::min<int64_t>(p.top_k, INT32_MAX)) : 0;
  r.num_logprobs = static_cast<int32_t>(std::min<int64_t>(p.logprobs, kMaxSampledLogprobs));
  r.penalty_begin = r.penalty_end = static_cast<int32_t>(entries.size());
  if (p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) {
    std::unordered_map<int32_t, size_t> index;
    const int64_t from = p.repetition_penalty != 1.0 ? 0 : seq.num_prompt_tokens;
    for (int64_t i = from; i < seq.size(); ++i) {
      const int32_t t = seq.tokens[static_cast<size_t>(i)];
      auto [it, added] = index.try_emplace(t, entries.size());
      if (added) entries.push_back({t, 0});
      if (i >= seq.num_prompt_tokens) ++entries[it->second].output_count;
    }
    r.penalty_end = static_cast<int32_t>(entries.size());
  }
  return r;
}

std::vector<SampleResult> sample_results(const std::vector<SamplingRow>& rows, const SampledRows& out) {
  std::vector<SampleResult> results(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    results[i].token_id = out.token_ids[i];
    const int32_t n = rows[i].num_logprobs;
    if (n < 0) continue;
    TokenLogprobs& lp = results[i].logprobs;
    lp.token_id = out.token_ids[i];
    lp.logprob = out.logprobs[i];
    for (int32_t j = 0; j < n; ++j) {
      const size_t k = i * kMaxSampledLogprobs + static_cast<size_t>(j);
      lp.top.emplace_back(out.top_ids[k], out.top_logprobs[k]);
    }
  }
  return results;
}

}  // namespace shardserve
