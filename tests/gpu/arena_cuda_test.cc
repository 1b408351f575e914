// The activation arena against the worst steps the scheduler can emit, on the GPU.
//
// The arena is reserved at exactly the scratch peak that warm_up_worst_steps measured (no slack to
// hide behind), then a graph-capturing ModelRunner is driven through every shape the limits allow:
// the whole token budget over max_num_seqs sampling sequences, all-decode at max_num_seqs, chunked
// prefill boundaries with prefix hits, and every decode graph bucket (captured, then replayed).
// None may exhaust it. The planner's prediction (worker/model/memory_plan.cc) must equal the
// measured peak, term by term. Then a served engine at those limits runs a mixed load to the end
// with no failed step. Skipped when no CUDA device is present.
#include <gtest/gtest.h>

#include <random>

#include "worker/engine/engine.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/rank.h"
#include "worker/model/checkpoint.h"
#include "worker/model/memory_plan.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cuda_backend.h"

namespace shardserve {
namespace {

std::string data_dir() {
  const char* env = std::getenv("SHARDSERVE_TEST_DATA_DIR");
  return env != nullptr ? env : SHARDSERVE_TEST_DATA_DIR;
}

constexpr int64_t kTokens = 48;  // max_num_batched_tokens
constexpr int64_t kSeqs = 12;    // max_num_seqs
constexpr int64_t kMaxLen = 256;
constexpr int64_t kBlock = 16;
constexpr int64_t kBlocks = 400;

class ArenaCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto b = CudaBackend::create(0, DType::kBF16);
    if (!b.ok()) GTEST_SKIP() << b.status();
    gpu_ = std::move(*b);
    const std::string dir = data_dir() + "/tiny/llama3-gqa-bf16";
    auto config = load_model_config(dir);
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    auto ckpt = Checkpoint::open(dir);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
    auto model = LlamaModel::load(config_, *ckpt_, *gpu_, comm_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    options_.backend = "cuda";
    options_.max_num_batched_tokens = kTokens;
    options_.max_num_seqs = kSeqs;
    options_.max_model_len = kMaxLen;
    options_.block_size = kBlock;
  }

  // Runs a batch with sampling for every sampling step (greedy), as the engine does.
  void run(ModelRunner& runner, const Batch& batch) {
    std::vector<Sequence> seqs(batch.seqs.size());
    std::vector<const Sequence*> sampled;
    for (size_t i = 0; i < batch.seqs.size(); ++i) {
      seqs[i].tokens = {1};
      seqs[i].num_prompt_tokens = 1;
      seqs[i].params.temperature = 0.0;
      if (batch.seqs[i].sample) sampled.push_back(&seqs[i]);
    }
    const std::vector<SampleResult> out = runner.execute_and_sample(batch, sampled);
    ASSERT_EQ(out.size(), sampled.size());
    for (const SampleResult& r : out) EXPECT_TRUE(r.token_id >= 0 && r.token_id < config_.vocab_size);
  }
  // A sequence's step: `len` query tokens after `cached` cached ones, its own blocks.
  SequenceStep step(int64_t seq, int64_t cached, int64_t len, bool sample = true) {
    SequenceStep s;
    s.token_ids.assign(static_cast<size_t>(len), static_cast<int32_t>(3 + seq));
    s.num_cached = static_cast<int32_t>(cached);
    s.sample = sample;
    const int64_t per_seq = kMaxLen / kBlock;
    for (int64_t b = 0; b < (cached + len + kBlock - 1) / kBlock; ++b) {
      s.block_table.push_back(static_cast<int32_t>(seq * per_seq + b));
    }
    return s;
  }

  std::unique_ptr<CudaBackend> gpu_;
  SingleRankCommunicator comm_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<LlamaModel> model_;
  ExecutorOptions options_;
};

TEST_F(ArenaCudaTest, NoStepTheLimitsAllowExhaustsTheMeasuredArena) {
  warm_up_worst_steps(*model_, *gpu_, options_);
  const size_t peak = gpu_->scratch_peak_bytes();
  ASSERT_GT(peak, 0u);

  PlanOptions po;
  po.max_model_len = kMaxLen;
  po.activation_dtype = DType::kBF16;
  po.block_size = kBlock;
  po.max_num_batched_tokens = kTokens;
  po.max_num_seqs = kSeqs;
  EXPECT_EQ(activation_arena_bytes(config_, po, gpu_->num_sms()),
            static_cast<int64_t>(peak + peak / 16 + (size_t{16} << 20)))
      << "the planner no longer follows the worker's scratch (measured peak " << peak << ")";

  gpu_->reserve_scratch(peak);  // exactly the peak
  ModelRunner runner(*model_, *gpu_, kBlocks, kBlock, kMaxLen, /*use_graphs=*/true);
  std::mt19937 rng(5);

  // The whole budget over max_num_seqs sequences, every one sampling: one prefill chunk, the rest
  // decodes at scattered context lengths.
  Batch mixed;
  mixed.seqs.push_back(step(0, 0, kTokens - (kSeqs - 1)));
  for (int64_t i = 1; i < kSeqs; ++i) mixed.seqs.push_back(step(i, 1 + rng() % (kMaxLen - 2), 1));
  EXPECT_NO_THROW(run(runner, mixed));

  // Chunked prefill: a non-final chunk (samples nothing) after a prefix hit, a chunk ending on a
  // block boundary, the final chunk, each beside decodes.
  Batch chunks;
  chunks.seqs.push_back(step(0, 16, 20, /*sample=*/false));
  chunks.seqs.push_back(step(1, 36, 12, /*sample=*/true));  // ends at 48, a block boundary
  chunks.seqs.push_back(step(2, 100, 1));
  EXPECT_NO_THROW(run(runner, chunks));
  Batch single_chunk;
  single_chunk.seqs.push_back(step(3, kMaxLen - kTokens, kTokens));  // the budget, up to max_model_len
  EXPECT_NO_THROW(run(runner, single_chunk));

  // Every decode bucket up to max_num_seqs: the first step runs, the second is captured, the
  // third replays; contexts up to max_model_len.
  for (int64_t n = 1; n <= kSeqs; ++n) {
    for (int rep = 0; rep < 3; ++rep) {
      Batch decode;
      for (int64_t i = 0; i < n; ++i) decode.seqs.push_back(step(i, (rep * 37 + i * 19) % (kMaxLen - 1), 1));
      EXPECT_NO_THROW(run(runner, decode)) << n << " sequences, run " << rep;
    }
  }
  EXPECT_EQ(runner.num_graphs(), 5u);  // buckets 1, 2, 4, 8, 16
}

TEST_F(ArenaCudaTest, AStepBeyondTheArenaFailsAloneAndTheRunnerGoesOn) {
  // Half the worst step's arena: the worst step (12 sampled rows of 128k FP32 logits) throws
  // StepError, nothing fatal; a one-sequence decode fits and runs afterwards, also captured and
  // replayed as a graph.
  warm_up_worst_steps(*model_, *gpu_, options_);
  gpu_->reserve_scratch(gpu_->scratch_peak_bytes() / 2);
  ModelRunner runner(*model_, *gpu_, kBlocks, kBlock, kMaxLen, /*use_graphs=*/true);
  std::vector<Sequence> seqs(kSeqs);
  std::vector<const Sequence*> sampled;
  Batch big;
  for (int64_t i = 0; i < kSeqs; ++i) {
    big.seqs.push_back(step(i, 0, i == 0 ? kTokens - (kSeqs - 1) : 1));
    seqs[i].tokens = {1};
    seqs[i].num_prompt_tokens = 1;
    seqs[i].params.temperature = 0.0;
    sampled.push_back(&seqs[i]);
  }
  EXPECT_THROW(runner.execute_and_sample(big, sampled), StepError);
  Batch small;
  small.seqs.push_back(step(1, 5, 1));
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<SampleResult> out;
    EXPECT_NO_THROW(out = runner.execute_and_sample(small, {&seqs[0]})) << rep;
    EXPECT_EQ(out.size(), 1u);
  }
  EXPECT_EQ(runner.num_graphs(), 1u);
}

TEST_F(ArenaCudaTest, AServedEngineAtTheLimitsFinishesEveryRequest) {
  ExecutorOptions o = options_;
  o.model_dir = data_dir() + "/tiny/llama3-gqa-bf16";
  o.num_kv_blocks = 160;
  auto loaded = load_model(o);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  Engine engine(*loaded->executor, {.scheduler = {.max_num_seqs = kSeqs, .max_num_batched_tokens = kTokens},
                                    .max_model_len = kMaxLen});
  std::mt19937 rng(11);
  std::vector<Request> reqs;
  for (int i = 0; i < 40; ++i) {
    Request r;
    r.request_id = "r" + std::to_string(i);
    const int64_t prompt = 1 + rng() % 120;
    for (int64_t j = 0; j < prompt; ++j) r.prompt_token_ids.push_back(static_cast<int32_t>(3 + rng() % 200));
    r.params.temperature = i % 3 == 0 ? 0.0 : 0.8;
    r.params.top_p = i % 2 == 0 ? 0.9 : 1.0;
    r.params.seed = i;
    r.params.max_tokens = 1 + rng() % 60;
    r.params.ignore_eos = true;
    r.params.logprobs = i % 5 == 0 ? 3 : -1;
    reqs.push_back(std::move(r));
  }
  auto out = run_to_completion(engine, reqs);
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t i = 0; i < out->size(); ++i) {
    const RequestOutput& o2 = (*out)[i];
    EXPECT_EQ(o2.finish_reason, "length") << o2.request_id << ": " << o2.error;
    EXPECT_EQ(static_cast<int64_t>(o2.new_token_ids.size()), reqs[i].params.max_tokens) << o2.request_id;
    if (reqs[i].params.logprobs >= 0) EXPECT_EQ(o2.new_logprobs.size(), o2.new_token_ids.size());
  }
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_blocks);
}

}  // namespace
}  // namespace shardserve
