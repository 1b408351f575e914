// The CPU reference backend against Hugging Face transformers (FP32, eager attention, CPU),
// whose greedy continuations and logits scripts/make_golden.py wrote into tests/data/tiny/*.
//
// Tolerance on logits: both sides compute in FP32 from identical weights (BF16/FP16 widen to FP32
// exactly) and differ only in summation order and in exp/cos/sin implementations. Each op adds
// relative rounding of order 1e-7 x sqrt(reduction length); through 2-3 layers with O(1)
// activations that reaches logits (|logit| up to ~40 for the tied checkpoint) at ~1e-5 absolute.
// We allow 1e-4 x max(1, |logit|max) — measured worst case is reported by the test — which is far
// below the smallest top-1/top-2 margin in the goldens (0.023), so tokens must match exactly.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <string>

#include "tests/unit/cli_util.h"
#include "worker/engine/greedy.h"
#include "worker/engine/model_runner.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/llama.h"
#include "worker/model/safetensors.h"
#include "worker/runtime/communicator.h"
#include "worker/runtime/cpu_backend.h"

namespace shardserve {
namespace {

using testing::run_cli;

constexpr double kRelTolerance = 1e-4;

struct GoldenPrompt {
  std::vector<int32_t> prompt;
  std::vector<int32_t> tokens;
  std::vector<float> logits;  // [steps, vocab]
};

class GoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/" + GetParam();
    auto config = load_model_config(dir_);
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    auto ckpt = Checkpoint::open(dir_);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
    auto model = LlamaModel::load(config_, *ckpt_, backend_, comm_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);

    std::ifstream in(dir_ + "/golden.json");
    ASSERT_TRUE(in) << "missing " << dir_ << "/golden.json (run scripts/make_golden.py)";
    const auto golden = nlohmann::json::parse(in);
    steps_ = golden["steps"].get<int64_t>();
    auto logits_file = SafetensorsFile::open(dir_ + "/golden_logits.safetensors");
    ASSERT_TRUE(logits_file.ok()) << logits_file.status();
    for (size_t i = 0; i < golden["prompts"].size(); ++i) {
      GoldenPrompt p;
      p.prompt = golden["prompts"][i]["prompt_ids"].get<std::vector<int32_t>>();
      p.tokens = golden["prompts"][i]["token_ids"].get<std::vector<int32_t>>();
      auto view = (*logits_file)->view("prompt" + std::to_string(i));
      ASSERT_TRUE(view.ok()) << view.status();
      ASSERT_EQ(view->dtype, DType::kF32);
      ASSERT_EQ(view->shape, (std::vector<int64_t>{steps_, config_.vocab_size}));
      const auto* f = static_cast<const float*>(view->data);
      p.logits.assign(f, f + view->numel());
      prompts_.push_back(std::move(p));
    }
  }

  std::unique_ptr<ModelRunner> runner() {
    const int64_t blocks = 2 * ((config_.max_position_embeddings + 15) / 16);
    return std::make_unique<ModelRunner>(*model_, backend_, blocks, 16);
  }

  // Max |ours - golden| / max(1, max |golden|) over every step and vocabulary entry.
  double logit_error(const GreedyOutput& out, const GoldenPrompt& p) {
    double worst = 0.0;
    for (size_t s = 0; s < out.logits.size(); ++s) {
      double scale = 1.0;
      for (int64_t v = 0; v < config_.vocab_size; ++v) scale = std::max(scale, std::fabs(double(p.logits[s * config_.vocab_size + v])));
      for (int64_t v = 0; v < config_.vocab_size; ++v) {
        worst = std::max(worst, std::fabs(double(out.logits[s][v]) - p.logits[s * config_.vocab_size + v]) / scale);
      }
    }
    return worst;
  }

  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  CpuBackend backend_{2};
  SingleRankCommunicator comm_;
  std::unique_ptr<LlamaModel> model_;
  int64_t steps_ = 0;
  std::vector<GoldenPrompt> prompts_;
};

TEST_P(GoldenTest, GreedyTokensAndLogitsMatchTransformers) {
  ASSERT_EQ(prompts_.size(), 3u);
  for (const GoldenPrompt& p : prompts_) {
    auto r = runner();
    GreedyOptions options{.max_tokens = steps_, .ignore_eos = true, .return_logits = true};
    auto out = generate_greedy(*r, p.prompt, options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->token_ids, p.tokens) << "prompt of " << p.prompt.size() << " tokens";
    EXPECT_EQ(out->finish_reason, "length");
    const double err = logit_error(*out, p);
    EXPECT_LT(err, kRelTolerance) << "prompt of " << p.prompt.size() << " tokens";
    RecordProperty("max_rel_logit_error_prompt_" + std::to_string(p.prompt.size()), std::to_string(err));
    std::printf("[ golden ] %s prompt %zu: %zu/%zu tokens match, max relative logit error %.3g\n",
                GetParam().c_str(), p.prompt.size(),
                static_cast<size_t>(std::inner_product(out->token_ids.begin(), out->token_ids.end(), p.tokens.begin(), 0,
                                                       std::plus<>(), std::equal_to<>())),
                p.tokens.size(), err);
  }
}

TEST_P(GoldenTest, ChunkedPrefillGivesTheSameContinuation) {
  const GoldenPrompt& p = prompts_.back();  // 60 tokens: chunks of 7 cross block boundaries mid-chunk
  auto r = runner();
  GreedyOptions options{.max_tokens = steps_, .ignore_eos = true, .prefill_chunk = 7, .return_logits = true};
  auto out = generate_greedy(*r, p.prompt, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->token_ids, p.tokens);
  EXPECT_LT(logit_error(*out, p), kRelTolerance);
}

TEST_P(GoldenTest, StopsAfterTheFirstEosToken) {
  const GoldenPrompt& p = prompts_[1];
  const int32_t eos = p.tokens[5];
  const auto first = std::find(p.tokens.begin(), p.tokens.end(), eos) - p.tokens.begin();
  auto r = runner();
  GreedyOptions options{.max_tokens = steps_, .stop_token_ids = {eos}};
  auto out = generate_greedy(*r, p.prompt, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->finish_reason, "stop");
  EXPECT_EQ(out->token_ids, std::vector<int32_t>(p.tokens.begin(), p.tokens.begin() + first + 1));
}

TEST_P(GoldenTest, BatchedPrefillOfTwoSequencesMatchesEachAlone) {
  // Two prompts in one step, with interleaved, out-of-order cache blocks.
  auto r = runner();
  Batch batch;
  batch.seqs.push_back({prompts_[1].prompt, 0, {5, 1}, true});
  batch.seqs.push_back({prompts_[2].prompt, 0, {0, 7, 3, 2}, true});
  const std::vector<float> logits = r->execute(batch);
  ASSERT_EQ(logits.size(), static_cast<size_t>(2 * config_.vocab_size));
  for (int s = 0; s < 2; ++s) {
    const GoldenPrompt& p = prompts_[1 + s];
    for (int64_t v = 0; v < config_.vocab_size; ++v) {
      ASSERT_NEAR(logits[s * config_.vocab_size + v], p.logits[v], 1e-3) << "sequence " << s << " vocab " << v;
    }
  }
}

TEST_P(GoldenTest, CommandLineReproducesTheGoldenContinuation) {
  const GoldenPrompt& p = prompts_[2];
  std::string ids;
  for (int32_t id : p.prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const auto j = nlohmann::json::parse(run_cli("generate --model " + dir_ + " --prompt-ids " + ids + " --max-tokens " +
                                               std::to_string(steps_) + " --temperature 0 --ignore-eos --backend cpu --output json"));
  EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), p.tokens);
  EXPECT_EQ(j["finish_reason"], "length");
}

// All golden prompts at once through --prompts-jsonl, in a cache so small (7 blocks of 16 for
// three requests of up to 84 tokens) that the engine must preempt; results stay in input order.
TEST_P(GoldenTest, CommandLinePromptsJsonlRunsAllAtOnce) {
  const std::string path = ::testing::TempDir() + "/prompts_" + GetParam() + ".jsonl";
  {
    std::ofstream out(path);
    for (const GoldenPrompt& p : prompts_) out << nlohmann::json{{"prompt_ids", p.prompt}, {"ignore_eos", true}}.dump() << "\n";
  }
  const std::string output = run_cli("generate --model " + dir_ + " --prompts-jsonl " + path + " --max-tokens " +
                                     std::to_string(steps_) + " --num-kv-blocks 7 --max-num-batched-tokens 32 --output json");
  std::istringstream lines(output);
  std::string line;
  size_t i = 0;
  for (; std::getline(lines, line); ++i) {
    ASSERT_LT(i, prompts_.size()) << output;
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), prompts_[i].tokens) << "line " << i;
    EXPECT_EQ(j["prompt_tokens"], prompts_[i].prompt.size());
  }
  EXPECT_EQ(i, prompts_.size());
}

INSTANTIATE_TEST_SUITE_P(TinyCheckpoints, GoldenTest,
                         ::testing::Values("llama3-gqa-bf16", "llama3-tied-mqa-fp16", "llama2-mha-bf16"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace shardserve
