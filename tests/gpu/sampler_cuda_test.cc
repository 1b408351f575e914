// The GPU sampler (kernels/sampling.cu through CudaBackend::sample) against the CPU sampler
// (worker/engine/sampler.cc) on the same FP32 logits: random rows of a Llama-3 sized vocabulary,
// every sampling option, per-request seeds.
//
// What must be identical: greedy ids (an exact argmax, lowest id on a tie), seeded draws with any
// mix of temperature, top-k, top-p, min-p and penalties (both sides compute the same FP64
// probabilities; only the order of the FP64 sums differs, which moves a draw only when its target
// lies within ~1e-16 of a boundary between two tokens: never, at these sizes), the top-N logprob
// ids. Logprob values: both are FP64 log-softmax rounded to FP32; 1e-5 absolute covers the FP64
// exp/log of two libraries. Where the definitions leave room (the draw's distribution itself),
// frequencies over many seeds are checked against the softmax probabilities.
// Skipped when no CUDA device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "worker/engine/sampler.h"
#include "worker/runtime/cuda_backend.h"

namespace shardserve {
namespace {

class SamplerCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto b = CudaBackend::create(0, DType::kBF16);
    if (!b.ok()) GTEST_SKIP() << b.status();
    gpu_ = std::move(*b);
  }

  // Logits of a trained model's scale: most tokens far below a few candidates.
  std::vector<float> random_logits(int64_t rows, int64_t vocab) {
    std::normal_distribution<float> d(0.0f, 2.5f);
    std::vector<float> v(static_cast<size_t>(rows * vocab));
    for (auto& x : v) x = d(rng_);
    for (int64_t r = 0; r < rows; ++r) {  // a handful of likely tokens per row
      for (int j = 0; j < 6; ++j) v[static_cast<size_t>(r * vocab + rng_() % vocab)] += 9.0f + static_cast<float>(j);
    }
    return v;
  }

  std::vector<SampleResult> gpu_sample(const std::vector<float>& logits, int64_t vocab,
                                       const std::vector<Sequence>& seqs) {
    const auto rows = static_cast<int64_t>(seqs.size());
    Tensor t = gpu_->upload(HostTensor{logits.data(), DType::kF32, {rows, vocab}}, DType::kF32);
    std::vector<SamplingRow> params;
    std::vector<PenaltyEntry> entries;
    for (const Sequence& s : seqs) params.push_back(device_sampling_row(s, entries));
    SampledRows out;
    gpu_->sample(t, params, entries, out);
    EXPECT_EQ(out.token_ids.size(), seqs.size());
    return sample_results(params, out);
  }

  Sequence sequence(const SamplingParams& p, uint64_t seed, int64_t prompt, int64_t outputs, int64_t vocab) {
    Sequence s;
    s.params = p;
    s.seed = seed;
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    for (int64_t i = 0; i < prompt + outputs; ++i) s.tokens.push_back(i % 3 == 0 && i > 0 ? s.tokens[i - 1] : tok(rng_));
    s.num_prompt_tokens = prompt;
    return s;
  }

  // GPU vs CPU on the same logits: identical ids, logprobs within 1e-5.
  void expect_same(const std::vector<Sequence>& seqs, int64_t vocab) {
    const std::vector<float> logits = random_logits(static_cast<int64_t>(seqs.size()), vocab);
    const std::vector<SampleResult> gpu = gpu_sample(logits, vocab, seqs);
    for (size_t i = 0; i < seqs.size(); ++i) {
      const SampleResult cpu = sample(seqs[i], logits.data() + i * vocab, vocab);
      EXPECT_EQ(gpu[i].token_id, cpu.token_id) << "row " << i;
      if (seqs[i].params.logprobs < 0) continue;
      EXPECT_NEAR(gpu[i].logprobs.logprob, cpu.logprobs.logprob, 1e-5) << "row " << i;
      ASSERT_EQ(gpu[i].logprobs.top.size(), cpu.logprobs.top.size()) << "row " << i;
      for (size_t j = 0; j < cpu.logprobs.top.size(); ++j) {
        EXPECT_EQ(gpu[i].logprobs.top[j].first, cpu.logprobs.top[j].first) << "row " << i << " top " << j;
        EXPECT_NEAR(gpu[i].logprobs.top[j].second, cpu.logprobs.top[j].second, 1e-5);
      }
    }
  }

  std::unique_ptr<CudaBackend> gpu_;
  std::mt19937 rng_{20261203};
};

constexpr int64_t kVocab = 128256;

TEST_F(SamplerCudaTest, GreedyIsTheCpuArgmax) {
  SamplingParams p;
  p.temperature = 0.0;
  std::vector<Sequence> seqs;
  for (int i = 0; i < 64; ++i) seqs.push_back(sequence(p, i, 5, 3, kVocab));
  expect_same(seqs, kVocab);
}

TEST_F(SamplerCudaTest, GreedyTieGoesToTheLowestId) {
  std::vector<float> logits(1000, -1.0f);
  logits[700] = logits[300] = logits[999] = 4.0f;
  SamplingParams p;
  p.temperature = 0.0;
  const std::vector<SampleResult> r = gpu_sample(logits, 1000, {sequence(p, 1, 2, 0, 1000)});
  EXPECT_EQ(r[0].token_id, 300);
}

TEST_F(SamplerCudaTest, SeededSamplingMatchesTheCpuDrawForEveryOption) {
  std::vector<Sequence> seqs;
  uint64_t seed = 7;
  for (double t : {0.3, 0.8, 1.0, 1.7}) {
    for (int64_t k : {0, 1, 5, 50}) {
      for (double top_p : {1.0, 0.9, 0.5}) {
        for (double min_p : {0.0, 0.05}) {
          SamplingParams p;
          p.temperature = t;
          p.top_k = k;
          p.top_p = top_p;
          p.min_p = min_p;
          seqs.push_back(sequence(p, seed++, 4, static_cast<int64_t>(seed % 7), kVocab));
        }
      }
    }
  }
  expect_same(seqs, kVocab);  // 96 rows, one CTA each
}

TEST_F(SamplerCudaTest, PenaltiesMatchTheCpu) {
  std::vector<Sequence> seqs;
  uint64_t seed = 100;
  for (double rep : {1.0, 1.3, 0.7}) {
    for (double presence : {0.0, 1.5, -0.5}) {
      for (double frequency : {0.0, 0.8}) {
        for (double t : {0.0, 1.0}) {
          SamplingParams p;
          p.temperature = t;
          p.repetition_penalty = rep;
          p.presence_penalty = presence;
          p.frequency_penalty = frequency;
          seqs.push_back(sequence(p, seed++, 40, 60, kVocab));
        }
      }
    }
  }
  // Make the penalties decide: the sequence's own tokens are the likeliest ones.
  const auto rows = static_cast<int64_t>(seqs.size());
  std::vector<float> logits = random_logits(rows, kVocab);
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t t : seqs[r].tokens) logits[r * kVocab + t] += 8.0f;
  }
  const std::vector<SampleResult> gpu = gpu_sample(logits, kVocab, seqs);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(gpu[r].token_id, sample(seqs[r], logits.data() + r * kVocab, kVocab).token_id) << "row " << r;
  }
}

TEST_F(SamplerCudaTest, LogprobsComeFromTheRawLogits) {
  std::vector<Sequence> seqs;
  for (int n : {0, 1, 5, 20}) {
    for (double rep : {1.0, 1.5}) {
      SamplingParams p;
      p.temperature = n % 2 == 0 ? 0.0 : 0.9;
      p.logprobs = n;
      p.repetition_penalty = rep;
      seqs.push_back(sequence(p, 30 + n, 10, 10, kVocab));
    }
  }
  SamplingParams none;  // rows that ask for none beside rows that do
  none.temperature = 0.0;
  seqs.push_back(sequence(none, 3, 3, 3, kVocab));
  expect_same(seqs, kVocab);
}

TEST_F(SamplerCudaTest, PenaltiesOnlyTouchTheirOwnRow) {
  // Two rows with the same logits: one penalizes its history, the other must still see the raw row.
  const int64_t vocab = 4096;
  std::vector<float> row = random_logits(1, vocab);
  std::vector<float> logits(row);
  logits.insert(logits.end(), row.begin(), row.end());
  SamplingParams pen, plain;
  pen.temperature = plain.temperature = 0.0;
  pen.presence_penalty = 2.0;
  Sequence a = sequence(pen, 1, 0, 0, vocab), b = sequence(plain, 1, 0, 0, vocab);
  const int32_t best = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
  a.tokens = {best};
  a.num_prompt_tokens = 0;  // the best token was generated: penalized
  b.tokens = {best};
  b.num_prompt_tokens = 0;
  const std::vector<SampleResult> r = gpu_sample(logits, vocab, {a, b});
  EXPECT_EQ(r[0].token_id, sample(a, row.data(), vocab).token_id);
  EXPECT_EQ(r[1].token_id, best);
}

TEST_F(SamplerCudaTest, DrawsFollowTheSoftmax) {
  // 16 tokens, 20,000 draws (one per seed): each token's frequency within 5 standard deviations of
  // its probability under temperature 0.7, and top_k 3 never leaves the best three.
  const int64_t vocab = 16;
  std::vector<float> row(vocab);
  for (int64_t i = 0; i < vocab; ++i) row[i] = 0.25f * static_cast<float>((i * 7) % vocab);
  const int draws = 20000;
  for (int64_t k : {0, 3}) {
    SamplingParams p;
    p.temperature = 0.7;
    p.top_k = k;
    std::vector<Sequence> seqs;
    std::vector<float> logits;
    for (int i = 0; i < draws; ++i) {
      seqs.push_back(sequence(p, 1000 + i, 1, 0, vocab));
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const std::vector<SampleResult> r = gpu_sample(logits, vocab, seqs);
    std::vector<int> count(vocab, 0);
    for (const SampleResult& s : r) ++count[s.token_id];
    std::vector<int64_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    const int64_t keep = k > 0 ? k : vocab;
    double z = 0.0;
    for (int64_t i = 0; i < keep; ++i) z += std::exp(row[order[i]] / 0.7);
    for (int64_t i = 0; i < vocab; ++i) {
      const int64_t t = order[i];
      const double prob = i < keep ? std::exp(row[t] / 0.7) / z : 0.0;
      const double sd = std::sqrt(draws * prob * (1 - prob)) + 1e-9;
      EXPECT_LE(std::fabs(count[t] - draws * prob), 5 * sd + 1) << "token " << t << " top_k " << k;
    }
  }
}

}  // namespace
}  // namespace shardserve
