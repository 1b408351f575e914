// Statistical checks of the reference sampler with fixed seeds: filters never let a token through
// that they should drop, and the empirical distribution matches softmax(logits / T).
#include "worker/engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

namespace shardserve {
namespace {

Sequence seq_with(SamplingParams p, uint64_t seed, std::vector<int32_t> tokens = {0}, int64_t prompt = 1) {
  Sequence s;
  s.tokens = std::move(tokens);
  s.num_prompt_tokens = prompt;
  s.params = p;
  s.seed = seed;
  return s;
}

std::vector<float> log_probs(std::vector<double> p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

std::map<int32_t, int> histogram(const SamplingParams& p, const std::vector<float>& logits, int n) {
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[sample(seq_with(p, 1000 + i), logits.data(), logits.size()).token_id];
  return h;
}

TEST(Sampler, CounterUniformIsUniform) {
  double sum = 0;
  int below_tenth = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    const double u = counter_uniform(42, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    below_tenth += u < 0.1;
  }
  EXPECT_NEAR(sum / 100000, 0.5, 0.005);
  EXPECT_NEAR(below_tenth / 100000.0, 0.1, 0.005);
  EXPECT_NE(counter_uniform(1, 0), counter_uniform(2, 0));
}

TEST(Sampler, GreedyTakesTheArgmaxAndTheLowestIdOnATie) {
  SamplingParams p;
  p.temperature = 0;
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(sample(seq_with(p, 1), logits.data(), 4).token_id, 1);
}

TEST(Sampler, TemperatureOneFollowsSoftmax) {
  SamplingParams p;
  const auto h = histogram(p, log_probs({0.6, 0.3, 0.1}), 20000);
  EXPECT_NEAR(h.at(0) / 20000.0, 0.6, 0.015);
  EXPECT_NEAR(h.at(1) / 20000.0, 0.3, 0.015);
  EXPECT_NEAR(h.at(2) / 20000.0, 0.1, 0.01);
}

TEST(Sampler, LowTemperatureSharpens) {
  SamplingParams p;
  p.temperature = 0.5;  // p^2 renormalised: 0.783, 0.196, 0.022
  const auto h = histogram(p, log_probs({0.6, 0.3, 0.1}), 20000);
  EXPECT_NEAR(h.at(0) / 20000.0, 0.36 / 0.46, 0.015);
  EXPECT_NEAR(h.at(2) / 20000.0, 0.01 / 0.46, 0.006);
}

TEST(Sampler, TopKNeverLeavesTheKBest) {
  SamplingParams p;
  p.top_k = 3;
  const std::vector<float> logits = {0.0f, 1.0f, 0.9f, -2.0f, 0.95f, 0.2f};  // best: 1, 4, 2
  const auto h = histogram(p, logits, 5000);
  for (const auto& [tok, n] : h) EXPECT_TRUE(tok == 1 || tok == 4 || tok == 2) << tok;
  EXPECT_EQ(h.size(), 3u);
  p.top_k = -1;  // off
  EXPECT_EQ(histogram(p, logits, 5000).size(), 6u);
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  SamplingParams p;
  p.top_p = 0.79;  // 0.5 + 0.3 covers it
  const auto h = histogram(p, log_probs({0.5, 0.3, 0.15, 0.05}), 10000);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_NEAR(h.at(0) / 10000.0, 0.5 / 0.8, 0.02);
}

TEST(Sampler, MinPDropsUnlikelyTokens) {
  SamplingParams p;
  p.min_p = 0.2;  // threshold 0.1: keeps 0.5, 0.3, 0.15
  const auto h = histogram(p, log_probs({0.5, 0.3, 0.15, 0.05}), 10000);
  EXPECT_EQ(h.size(), 3u);
  EXPECT_EQ(h.count(3), 0u);
}

TEST(Sampler, PenaltiesChangeTheGreedyChoice) {
  const std::vector<float> logits = {2.0f, 1.9f, 1.0f};
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 1.1;  // token 0 seen in the prompt: 2.0 / 1.1 < 1.9
  EXPECT_EQ(sample(seq_with(p, 1, {0}, 1), logits.data(), 3).token_id, 1);
  p.repetition_penalty = 1.0;
  p.frequency_penalty = 0.06;  // output has token 0 twice: 2.0 - 0.12 < 1.9
  EXPECT_EQ(sample(seq_with(p, 1, {2, 0, 0}, 1), logits.data(), 3).token_id, 1);
  p.frequency_penalty = 0.0;
  p.presence_penalty = 0.2;  // only output tokens count: token 0 in the prompt is not penalised
  EXPECT_EQ(sample(seq_with(p, 1, {0}, 1), logits.data(), 3).token_id, 0);
  EXPECT_EQ(sample(seq_with(p, 1, {2, 0}, 1), logits.data(), 3).token_id, 1);
}

TEST(Sampler, LogprobsAreRawLogSoftmax) {
  SamplingParams p;
  p.temperature = 0;
  p.logprobs = 2;
  p.repetition_penalty = 2.0;  // log 0.5 * 2 < log 0.3: changes the choice, not the logprobs
  const std::vector<float> logits = log_probs({0.5, 0.3, 0.2});
  const SampleResult r = sample(seq_with(p, 1, {0}, 1), logits.data(), 3);
  EXPECT_EQ(r.token_id, 1);  // penalty moved the choice
  EXPECT_NEAR(r.logprobs.logprob, std::log(0.3), 1e-6);
  ASSERT_EQ(r.logprobs.top.size(), 2u);
  EXPECT_EQ(r.logprobs.top[0].first, 0);
  EXPECT_NEAR(r.logprobs.top[0].second, std::log(0.5), 1e-6);
}

// The device sampler's output read back as the CPU sampler's results: each row's top list is its
// first num_logprobs entries of a kMaxSampledLogprobs-wide row; rows that asked for none get none.
TEST(Sampler, DeviceResultsReadLikeTheCpuSamplers) {
  std::vector<SamplingRow> rows(3);
  rows[0].num_logprobs = -1;
  rows[1].num_logprobs = 2;
  rows[2].num_logprobs = 0;
  SampledRows out;
  out.token_ids = {7, 8, 9};
  out.logprobs = {-0.1f, -0.2f, -0.3f};
  for (int r = 0; r < 3; ++r) {
    for (int j = 0; j < kMaxSampledLogprobs; ++j) {
      out.top_ids.push_back(100 * r + j);
      out.top_logprobs.push_back(-static_cast<float>(r + j));
    }
  }
  const std::vector<SampleResult> results = sample_results(rows, out);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].token_id, 7);
  EXPECT_TRUE(results[0].logprobs.top.empty());
  EXPECT_EQ(results[1].token_id, 8);
  EXPECT_EQ(results[1].logprobs.token_id, 8);
  EXPECT_FLOAT_EQ(results[1].logprobs.logprob, -0.2f);
  ASSERT_EQ(results[1].logprobs.top.size(), 2u);
  EXPECT_EQ(results[1].logprobs.top[1].first, 101);
  EXPECT_FLOAT_EQ(results[1].logprobs.top[1].second, -2.0f);
  EXPECT_EQ(results[2].logprobs.token_id, 9);
  EXPECT_FLOAT_EQ(results[2].logprobs.logprob, -0.3f);
  EXPECT_TRUE(results[2].logprobs.top.empty());
}

}  // namespace
}  // namespace shardserve
