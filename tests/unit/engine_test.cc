// The engine on the golden checkpoints: N requests at once must each get exactly what they get
// alone (transformers' greedy tokens), also when a tiny cache forces preemption, a small token
// budget forces chunked prefill, and shared prompts hit the prefix cache. Plus the block
// manager's state changes, scheduling decisions and a random submit/abort/step property test.
#include "worker/engine/engine.h"
#include "worker/engine/model_runner.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/llama.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cpu_backend.h"

namespace shardserve {
namespace {

// ---- BlockManager ----------------------------------------------------------------------------

Sequence make_seq(int64_t id, std::vector<int32_t> tokens) {
  Sequence s;
  s.id = id;
  s.request_id = std::to_string(id);
  s.tokens = std::move(tokens);
  s.num_prompt_tokens = s.size();
  return s;
}

std::vector<int32_t> iota_tokens(int n, int start = 0) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

TEST(BlockManager, AllocateFreeAndRefCounts) {
  BlockManager bm(8, 4, /*enable_prefix_caching=*/false);
  Sequence a = make_seq(0, iota_tokens(9));
  ASSERT_TRUE(bm.can_allocate(a));
  bm.allocate(a);
  EXPECT_EQ(a.block_table.size(), 3u);  // 9 tokens / 4 per block
  EXPECT_EQ(bm.num_free_blocks(), 5);
  EXPECT_EQ(a.num_computed_tokens, 0);
  EXPECT_TRUE(bm.can_grow(a, 12));
  EXPECT_TRUE(bm.can_grow(a, 32));
  EXPECT_FALSE(bm.can_grow(a, 33));
  bm.grow(a, 13);
  EXPECT_EQ(a.block_table.size(), 4u);
  bm.free(a);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  EXPECT_TRUE(a.block_table.empty());
  Sequence big = make_seq(1, iota_tokens(33));
  EXPECT_FALSE(bm.can_allocate(big));
}

TEST(BlockManager, PrefixHitsOnlyAfterBlocksAreComputed) {
  BlockManager bm(8, 4, true);
  Sequence a = make_seq(0, iota_tokens(10));
  bm.allocate(a);
  Sequence early = make_seq(1, iota_tokens(10));
  bm.allocate(early);  // a has computed nothing yet: no hit
  EXPECT_EQ(early.num_computed_tokens, 0);
  bm.free(early);

  a.num_computed_tokens = 10;
  bm.cache_computed(a);  // two full blocks hashed
  EXPECT_EQ(a.num_hashed_blocks, 2);
  Sequence b = make_seq(2, iota_tokens(11));
  bm.allocate(b);
  EXPECT_EQ(b.num_computed_tokens, 8);
  EXPECT_EQ(b.block_table[0], a.block_table[0]);  // shared
  EXPECT_EQ(b.block_table[1], a.block_table[1]);
  EXPECT_NE(b.block_table[2], a.block_table[2]);
  EXPECT_EQ(bm.prefix_cache_hits(), 2);

  // A different second block breaks the chain after the first block.
  std::vector<int32_t> t = iota_tokens(10);
  t[5] = 99;
  Sequence c = make_seq(3, t);
  bm.allocate(c);
  EXPECT_EQ(c.num_computed_tokens, 4);

  // Fully cached prompt: the last token is still computed.
  Sequence d = make_seq(4, iota_tokens(8));
  bm.allocate(d);
  EXPECT_EQ(d.num_computed_tokens, 7);

  const int64_t free_before = bm.num_free_blocks();
  bm.free(a);  // blocks still used by b, c, d stay active
  EXPECT_EQ(bm.num_free_blocks(), free_before + 1);  // only a's private third block
  bm.free(b);
  bm.free(c);
  bm.free(d);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  // Cached blocks survive freeing and serve a later request...
  Sequence e = make_seq(5, iota_tokens(9));
  bm.allocate(e);
  EXPECT_EQ(e.num_computed_tokens, 8);
  bm.free(e);
  // ...until allocation pressure evicts them.
  Sequence filler = make_seq(6, iota_tokens(32, 1000));
  bm.allocate(filler);
  bm.free(filler);
  Sequence f = make_seq(7, iota_tokens(9));
  bm.allocate(f);
  EXPECT_EQ(f.num_computed_tokens, 0);
}

// ---- Scheduler -------------------------------------------------------------------------------

TEST(Scheduler, ChunkedPrefillUnderTheTokenBudgetMixedWithDecodes) {
  BlockManager bm(64, 4, false);
  Scheduler s({.max_num_seqs = 8, .max_num_batched_tokens = 10}, bm);
  Sequence a = make_seq(0, iota_tokens(6));
  Sequence b = make_seq(1, iota_tokens(25));
  a.params.max_tokens = b.params.max_tokens = 50;
  s.add(&a);
  s.add(&b);
  auto step1 = s.schedule();
  ASSERT_EQ(step1.size(), 2u);
  EXPECT_EQ(step1[0].num_tokens, 6);
  EXPECT_TRUE(step1[0].sample);
  EXPECT_EQ(step1[1].num_tokens, 4);  // the rest of the budget
  EXPECT_FALSE(step1[1].sample);
  s.update(step1, {7}, {}, 1000);
  auto step2 = s.schedule();  // a decodes 1, b prefills 9 more
  ASSERT_EQ(step2.size(), 2u);
  EXPECT_EQ(step2[0].num_tokens, 1);
  EXPECT_EQ(step2[1].num_tokens, 9);
  s.update(step2, {8}, {}, 1000);
  auto step3 = s.schedule();
  EXPECT_EQ(step3[1].num_tokens, 9);
  s.update(step3, {9}, {}, 1000);
  auto step4 = s.schedule();
  EXPECT_EQ(step4[1].num_tokens, 3);
  EXPECT_TRUE(step4[1].sample);
}

TEST(Scheduler, MaxNumSeqsAndFcfs) {
  BlockManager bm(64, 4, false);
  Scheduler s({.max_num_seqs = 2, .max_num_batched_tokens = 100}, bm);
  Sequence seqs[3] = {make_seq(0, iota_tokens(3)), make_seq(1, iota_tokens(3)), make_seq(2, iota_tokens(3))};
  for (auto& q : seqs) s.add(&q);
  auto step = s.schedule();
  ASSERT_EQ(step.size(), 2u);
  EXPECT_EQ(step[0].seq, &seqs[0]);
  EXPECT_EQ(step[1].seq, &seqs[1]);
  EXPECT_EQ(s.num_waiting(), 1u);
}

TEST(Scheduler, PreemptsTheNewestWhenBlocksRunOut) {
  BlockManager bm(4, 4, false);
  Scheduler s({.max_num_seqs = 8, .max_num_batched_tokens = 100}, bm);
  Sequence a = make_seq(0, iota_tokens(8));  // 2 blocks
  Sequence b = make_seq(1, iota_tokens(8));  // 2 blocks: cache full
  a.params.max_tokens = b.params.max_tokens = 8;
  s.add(&a);
  s.add(&b);
  auto step = s.schedule();
  ASSERT_EQ(step.size(), 2u);
  s.update(step, {1, 2}, {}, 1000);  // both now have 9 tokens: the 9th needs a third block
  step = s.schedule();
  ASSERT_EQ(step.size(), 1u);
  EXPECT_EQ(step[0].seq, &a);
  EXPECT_EQ(b.status, SequenceStatus::kWaiting);
  EXPECT_EQ(b.num_preemptions, 1);
  EXPECT_TRUE(b.block_table.empty());
  EXPECT_EQ(s.num_preemptions(), 1);
}

TEST(Scheduler, AbortFreesBlocksAtOnce) {
  BlockManager bm(8, 4, false);
  Scheduler s({}, bm);
  Sequence a = make_seq(0, iota_tokens(10));
  s.add(&a);
  s.schedule();
  EXPECT_EQ(bm.num_free_blocks(), 5);
  s.abort(&a);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  EXPECT_EQ(a.status, SequenceStatus::kAborted);
  EXPECT_TRUE(s.schedule().empty());
}

// ---- Engine on the golden checkpoints ---------------------------------------------------------

struct Golden {
  std::vector<int32_t> prompt, tokens;
};

class EngineGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/" + GetParam();
    config_ = *load_model_config(dir_);
    ckpt_ = std::move(*Checkpoint::open(dir_));
    model_ = std::move(*LlamaModel::load(config_, *ckpt_, backend_, comm_));
    const auto j = nlohmann::json::parse(std::ifstream(dir_ + "/golden.json"));
    for (const auto& p : j["prompts"]) {
      golden_.push_back({p["prompt_ids"].get<std::vector<int32_t>>(), p["token_ids"].get<std::vector<int32_t>>()});
    }
  }
  Request greedy(const Golden& g, const std::string& id, int64_t max_tokens = 24) {
    Request r{id, g.prompt, {}};
    r.params.temperature = 0;
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = true;
    return r;
  }
  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  CpuBackend backend_{2};
  SingleRankCommunicator comm_;
  std::unique_ptr<LlamaModel> model_;
  std::vector<Golden> golden_;
};

TEST_P(EngineGoldenTest, ConcurrentRequestsMatchGoldenUnderPressure) {
  struct Setting {
    int64_t blocks, budget;
    bool prefix;
  };
  // Roomy; small budget (chunked prefill); tiny cache (preemption) with prefix caching.
  for (const Setting& st : {Setting{64, 2048, false}, Setting{64, 13, true}, Setting{12, 40, true}}) {
    ModelRunner runner(*model_, backend_, st.blocks, 16);
    Engine engine(runner, {.scheduler = {.max_num_seqs = 8, .max_num_batched_tokens = st.budget},
                           .enable_prefix_caching = st.prefix});
    std::vector<Request> reqs;
    // Each golden prompt twice (the second copy hits the prefix cache), plus a prefix-sharing
    // prompt: golden[2]'s first 40 tokens.
    for (int copy = 0; copy < 2; ++copy) {
      for (size_t i = 0; i < golden_.size(); ++i) reqs.push_back(greedy(golden_[i], std::to_string(copy) + "-" + std::to_string(i)));
    }
    auto results = run_to_completion(engine, reqs);
    ASSERT_TRUE(results.ok()) << results.status();
    for (size_t k = 0; k < results->size(); ++k) {
      EXPECT_EQ((*results)[k].new_token_ids, golden_[k % golden_.size()].tokens)
          << "request " << k << " blocks " << st.blocks << " budget " << st.budget;
      EXPECT_EQ((*results)[k].finish_reason, "length");
    }
    const EngineStats s = engine.stats();
    EXPECT_EQ(s.num_free_blocks, s.num_blocks) << "blocks leaked";
    if (st.blocks == 12) EXPECT_GT(s.num_preemptions, 0);
    if (st.prefix) EXPECT_GT(s.prefix_cache_hits, 0);
  }
}

TEST_P(EngineGoldenTest, SeededSamplingIsTheSameAloneAndInABatch) {
  auto sampled = [&](const Golden& g, const std::string& id) {
    Request r{id, g.prompt, {}};
    r.params.temperature = 0.9;
    r.params.top_p = 0.95;
    r.params.top_k = 50;
    r.params.seed = 1234;
    r.params.max_tokens = 16;
    r.params.logprobs = 3;
    return r;
  };
  ModelRunner runner1(*model_, backend_, 64, 16);
  Engine alone(runner1, {});
  auto one = run_to_completion(alone, {sampled(golden_[1], "x")});
  ASSERT_TRUE(one.ok());
  ModelRunner runner2(*model_, backend_, 20, 16);
  Engine batched(runner2, {.scheduler = {.max_num_seqs = 4, .max_num_batched_tokens = 24}});
  auto many = run_to_completion(batched, {greedy(golden_[0], "a"), sampled(golden_[1], "x"), greedy(golden_[2], "b")});
  ASSERT_TRUE(many.ok());
  EXPECT_EQ((*one)[0].new_token_ids, (*many)[1].new_token_ids);
  EXPECT_NE((*one)[0].new_token_ids, golden_[1].tokens);  // it really sampled
  ASSERT_EQ((*one)[0].new_logprobs.size(), 16u);
  for (const TokenLogprobs& lp : (*one)[0].new_logprobs) {
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_LE(lp.logprob, 0.0f);
    EXPECT_GE(lp.top[0].second, lp.top[1].second);
    EXPECT_GE(lp.top[0].second, lp.logprob - 1e-6f);
  }
}

TEST_P(EngineGoldenTest, StopTokensEosAndAbort) {
  ModelRunner runner(*model_, backend_, 64, 16);
  const int32_t stop = golden_[1].tokens[3];
  const auto first = std::find(golden_[1].tokens.begin(), golden_[1].tokens.end(), stop) - golden_[1].tokens.begin();
  Engine engine(runner, {.eos_token_ids = {stop}});
  Request eos = greedy(golden_[1], "eos");
  eos.params.ignore_eos = false;
  Request ignored = greedy(golden_[1], "ignored");
  Request stopped = greedy(golden_[1], "stop-ids");
  stopped.params.stop_token_ids = {stop};
  auto out = run_to_completion(engine, {eos, ignored, stopped});
  ASSERT_TRUE(out.ok());
  const std::vector<int32_t> until_stop(golden_[1].tokens.begin(), golden_[1].tokens.begin() + first + 1);
  EXPECT_EQ((*out)[0].new_token_ids, until_stop);
  EXPECT_EQ((*out)[0].finish_reason, "stop");
  EXPECT_EQ((*out)[1].new_token_ids, golden_[1].tokens);
  EXPECT_EQ((*out)[2].new_token_ids, until_stop);  // stop_token_ids apply despite ignore_eos

  ASSERT_TRUE(engine.submit(greedy(golden_[2], "abort-me")).ok());
  engine.step();
  EXPECT_LT(engine.stats().num_free_blocks, engine.stats().num_blocks);
  ASSERT_TRUE(engine.abort("abort-me").ok());
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_blocks);  // freed at once
  auto last = engine.step();
  ASSERT_EQ(last.size(), 1u);
  EXPECT_TRUE(last[0].finished);
  EXPECT_EQ(last[0].finish_reason, "abort");
  EXPECT_FALSE(engine.has_unfinished());
  EXPECT_EQ(engine.abort("abort-me").code(), absl::StatusCode::kNotFound);
}

TEST_P(EngineGoldenTest, RejectsBadRequestsWithClearErrors) {
  ModelRunner runner(*model_, backend_, 4, 16);
  Engine engine(runner, {});
  auto expect = [&](Request r, absl::StatusCode code, const std::string& fragment) {
    const absl::Status st = engine.submit(std::move(r));
    EXPECT_EQ(st.code(), code) << st;
    EXPECT_NE(st.message().find(fragment), std::string::npos) << st;
  };
  Request r = greedy(golden_[0], "r");
  r.params.temperature = -1;
  expect(r, absl::StatusCode::kInvalidArgument, "temperature");
  r = greedy(golden_[0], "r");
  r.params.top_p = 0;
  expect(r, absl::StatusCode::kInvalidArgument, "top_p");
  r.params.top_p = 1.5;
  expect(r, absl::StatusCode::kInvalidArgument, "top_p");
  r = greedy(golden_[0], "r", 0);
  expect(r, absl::StatusCode::kInvalidArgument, "max_tokens");
  r = greedy(golden_[0], "r", config_.max_position_embeddings);
  expect(r, absl::StatusCode::kInvalidArgument, "exceeds the maximum model length");
  r = greedy(golden_[0], "r");
  r.params.logprobs = 21;
  expect(r, absl::StatusCode::kInvalidArgument, "logprobs");
  r = greedy(golden_[0], "r");
  r.prompt_token_ids[2] = static_cast<int32_t>(config_.vocab_size);
  expect(r, absl::StatusCode::kInvalidArgument, "outside the vocabulary");
  r = greedy(golden_[0], "r");
  r.prompt_token_ids.clear();
  expect(r, absl::StatusCode::kInvalidArgument, "no tokens");
  r = greedy(golden_[2], "r", 24);  // 84 tokens need 6 blocks of 16; the cache has 4
  expect(r, absl::StatusCode::kResourceExhausted, "the whole cache has 4");
  ASSERT_TRUE(engine.submit(greedy(golden_[0], "dup")).ok());
  expect(greedy(golden_[0], "dup"), absl::StatusCode::kAlreadyExists, "already in flight");
}

// Random submits, aborts and steps on a small cache: nothing crashes and, once everything has
// finished or been aborted, every block is free again.
TEST_P(EngineGoldenTest, RandomSubmitAbortStepLeaksNoBlocks) {
  std::mt19937 rng(99);
  ModelRunner runner(*model_, backend_, 14, 16);
  Engine engine(runner, {.scheduler = {.max_num_seqs = 5, .max_num_batched_tokens = 32}});
  std::vector<std::string> live;
  for (int op = 0; op < 120; ++op) {
    const int what = rng() % 6;
    if (what < 2) {
      Golden g = golden_[rng() % golden_.size()];
      g.prompt.resize(1 + rng() % g.prompt.size());
      Request r{"r" + std::to_string(op), g.prompt, {}};
      r.params.max_tokens = 1 + rng() % 20;
      r.params.temperature = (rng() % 2) ? 0.0 : 1.0;
      r.params.seed = op;
      if (engine.submit(r).ok()) live.push_back(r.request_id);
    } else if (what == 2 && !live.empty()) {
      (void)engine.abort(live[rng() % live.size()]);
    } else {
      for (const auto& o : engine.step()) {
        if (o.finished) std::erase(live, o.request_id);
      }
    }
  }
  while (engine.has_unfinished()) engine.step();
  engine.step();
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_blocks);
}

INSTANTIATE_TEST_SUITE_P(TinyCheckpoints, EngineGoldenTest,
                         ::testing::Values("llama3-gqa-bf16", "llama3-tied-mqa-fp16", "llama2-mha-bf16"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace shardserve

// ---- A step that fails (StepError) -------------------------------------------------------------

namespace shardserve {
namespace {

// A model of vocabulary 8 whose logits favour token (position % 8); fails the steps it is told to.
class FlakyExecutor final : public StepExecutor {
 public:
  FlakyExecutor() {
    config_.vocab_size = 8;
    config_.max_position_embeddings = 64;
  }
  std::vector<float> execute(const Batch& batch) override {
    ++steps;
    if (fail_next) {
      fail_next = false;
      throw StepError("scratch arena exhausted (test)");
    }
    std::vector<float> logits;
    for (const SequenceStep& s : batch.seqs) {
      if (!s.sample) continue;
      const int32_t pos = s.num_cached + static_cast<int32_t>(s.token_ids.size());
      for (int v = 0; v < 8; ++v) logits.push_back(v == pos % 8 ? 5.0f : 0.0f);
    }
    return logits;
  }
  const ModelConfig& config() const override { return config_; }
  int64_t num_blocks() const override { return 32; }
  int64_t block_size() const override { return 4; }

  bool fail_next = false;
  int steps = 0;
  ModelConfig config_;
};

TEST(EngineStepError, FailsThatStepsRequestsAndKeepsServing) {
  FlakyExecutor exec;
  Engine engine(exec, {});
  auto request = [](const std::string& id, int prompt) {
    Request r{id, std::vector<int32_t>(static_cast<size_t>(prompt), 1), {}};
    r.params.temperature = 0;
    r.params.max_tokens = 4;
    r.params.ignore_eos = true;
    return r;
  };
  ASSERT_TRUE(engine.submit(request("a", 3)).ok());
  ASSERT_TRUE(engine.submit(request("b", 5)).ok());
  exec.fail_next = true;
  const std::vector<RequestOutput> failed = engine.step();
  ASSERT_EQ(failed.size(), 2u);
  for (const RequestOutput& o : failed) {
    EXPECT_TRUE(o.finished);
    EXPECT_EQ(o.finish_reason, "error");
    EXPECT_NE(o.error.find("arena"), std::string::npos) << o.error;
    EXPECT_TRUE(o.new_token_ids.empty());
  }
  EXPECT_FALSE(engine.has_unfinished());
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_blocks);  // their blocks are back
  EXPECT_TRUE(engine.step().empty());                                   // reported once only
  // The same ids can be submitted again, and now they run to the end.
  auto out = run_to_completion(engine, {request("a", 3), request("b", 5)});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].new_token_ids, (std::vector<int32_t>{3, 4, 5, 6}));
  EXPECT_EQ((*out)[1].new_token_ids, (std::vector<int32_t>{5, 6, 7, 0}));
  EXPECT_EQ((*out)[0].finish_reason, "length");
}

}  // namespace
}  // namespace shardserve
