// Tensor parallelism on the CPU backend: the in-process communicator, the packed step message,
// and TP=N == TP=1 == transformers on the golden checkpoints, through the model, the engine and
// the command line.
//
// Tolerance on logits: a TP rank sums the same products as TP=1 but in shards (a row-parallel
// layer adds N partial dot products through the all-reduce), so results differ from TP=1 only by
// FP32 summation order, the same kind of difference llama_golden_test.cc allows against
// transformers: 1e-4 x max(1, |logit|max), far below the smallest top-1/top-2 margin (0.023), so
// tokens must match exactly.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "worker/engine/engine.h"
#include "worker/engine/executor.h"
#include "worker/engine/greedy.h"
#include "worker/engine/process_group.h"
#include "worker/engine/step_message.h"
#include "worker/engine/tp_executor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/llama.h"
#include "worker/model/safetensors.h"
#include "worker/runtime/cpu_backend.h"
#include "worker/runtime/inproc_communicator.h"

namespace shardserve {
namespace {

using namespace std::chrono_literals;

// ---- InProcessGroup ---------------------------------------------------------------------------

Tensor host_f32(CpuBackend& backend, const std::vector<float>& v, std::vector<int64_t> shape) {
  return backend.upload(HostTensor{v.data(), DType::kF32, std::move(shape)}, DType::kF32);
}

// Runs fn(rank) on `world` threads at once.
template <typename Fn>
void on_ranks(int world, Fn fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back([&fn, r] { fn(r); });
  for (auto& t : threads) t.join();
}

class CommunicatorTest : public ::testing::TestWithParam<int> {};

TEST_P(CommunicatorTest, AllReduceAndAllGatherAgreeWithASequentialReference) {
  const int world = GetParam();
  InProcessGroup group(world);
  constexpr int kIterations = 200;  // many rendezvous in a row: the barriers are reused
  // inputs[it][r]: rank r's values in iteration it; sizes vary so a stale post would show.
  std::vector<std::vector<std::vector<float>>> inputs(kIterations, std::vector<std::vector<float>>(world));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  for (int it = 0; it < kIterations; ++it) {
    for (int r = 0; r < world; ++r) {
      inputs[it][r].resize(static_cast<size_t>(1 + it % 7) * 3);
      for (float& v : inputs[it][r]) v = dist(rng);
    }
  }
  std::atomic<int> failures{0};
  on_ranks(world, [&](int r) {
    CpuBackend backend(1);
    Communicator& comm = group.comm(r);
    EXPECT_EQ(comm.rank(), r);
    EXPECT_EQ(comm.world_size(), world);
    for (int it = 0; it < kIterations; ++it) {
      const int64_t rows = 1 + it % 7;
      Tensor x = host_f32(backend, inputs[it][r], {rows, 3});
      comm.all_reduce(x);
      for (size_t i = 0; i < inputs[it][r].size(); ++i) {
        float want = 0.0f;  // rank order, from zero: bitwise what every rank computes
        for (int q = 0; q < world; ++q) want += inputs[it][q][i];
        if (x.as<float>()[i] != want) ++failures;
      }
      Tensor mine = host_f32(backend, inputs[it][r], {rows, 3});
      Tensor gathered = backend.empty({world * rows, 3}, DType::kF32);
      comm.all_gather(mine, gathered);
      for (int q = 0; q < world; ++q) {
        for (size_t i = 0; i < inputs[it][q].size(); ++i) {
          if (gathered.as<float>()[q * rows * 3 + static_cast<int64_t>(i)] != inputs[it][q][i]) ++failures;
        }
      }
    }
  });
  EXPECT_EQ(failures, 0);
  EXPECT_FALSE(group.broken());
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommunicatorTest, ::testing::Values(1, 2, 3, 4));

TEST(InProcessGroup, ARankThatNeverArrivesIsATimeoutErrorNamingIt) {
  InProcessGroup group(3, 200ms);
  CpuBackend backend(1);
  std::string error;
  const auto start = std::chrono::steady_clock::now();
  on_ranks(2, [&](int r) {  // ranks 0 and 1 arrive, rank 2 never does
    Tensor x = host_f32(backend, {1.0f, 2.0f}, {2});
    try {
      group.comm(r).all_reduce(x);
      ADD_FAILURE() << "rank " << r << " returned from an all_reduce that rank 2 never joined";
    } catch (const CollectiveError& e) {
      if (r == 0) error = e.what();
    }
  });
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 200ms);
  EXPECT_LT(waited, 10s);
  EXPECT_NE(error.find("rank(s) 2 did not arrive within 200 ms"), std::string::npos) << error;
  EXPECT_TRUE(group.broken());
  // Broken for good: the late rank fails at once with the same reason.
  Tensor x = host_f32(backend, {1.0f}, {1});
  try {
    group.comm(2).all_reduce(x);
    ADD_FAILURE() << "a broken group ran a collective";
  } catch (const CollectiveError& e) {
    EXPECT_EQ(std::string(e.what()), error);
  }
}

TEST(InProcessGroup, MismatchedCollectivesFailOnEveryRank) {
  InProcessGroup group(2);
  std::atomic<int> thrown{0};
  on_ranks(2, [&](int r) {
    CpuBackend backend(1);
    Tensor x = host_f32(backend, std::vector<float>(static_cast<size_t>(4 + r), 1.0f), {4 + r});
    try {
      group.comm(r).all_reduce(x);
    } catch (const CollectiveError& e) {
      EXPECT_NE(std::string(e.what()).find("collective mismatch"), std::string::npos) << e.what();
      ++thrown;
    }
  });
  EXPECT_EQ(thrown, 2);
}

TEST(InProcessGroup, AbortWakesARankWaitingInACollective) {
  InProcessGroup group(2);  // default timeout: only abort() can end the wait quickly
  std::string error;
  std::thread waiter([&] {
    CpuBackend backend(1);
    Tensor x = host_f32(backend, {1.0f}, {1});
    try {
      group.comm(0).all_reduce(x);
    } catch (const CollectiveError& e) {
      error = e.what();
    }
  });
  std::this_thread::sleep_for(50ms);
  group.abort("rank 1: lost");
  waiter.join();
  EXPECT_EQ(error, "rank 1: lost");
}

// ---- Step message -----------------------------------------------------------------------------

Batch sample_batch() {
  Batch b;
  b.seqs.push_back({{11, 12, 13, 14, 15}, 0, {4, 0}, true});                  // prefill
  b.seqs.push_back({{2147483647}, 37, {1, 2, 3}, true});                       // decode
  b.seqs.push_back({{-5, 0}, 16, {9, 8}, false});                             // non-final chunk
  return b;
}

void expect_same(const Batch& a, const Batch& b) {
  ASSERT_EQ(a.seqs.size(), b.seqs.size());
  for (size_t i = 0; i < a.seqs.size(); ++i) {
    EXPECT_EQ(a.seqs[i].token_ids, b.seqs[i].token_ids) << i;
    EXPECT_EQ(a.seqs[i].num_cached, b.seqs[i].num_cached) << i;
    EXPECT_EQ(a.seqs[i].block_table, b.seqs[i].block_table) << i;
    EXPECT_EQ(a.seqs[i].sample, b.seqs[i].sample) << i;
  }
}

TEST(StepMessage, RoundTrips) {
  for (const Batch& b : {Batch{}, sample_batch(), Batch{{{{7}, 0, {}, false}}}}) {
    const std::string bytes = pack(b);
    auto back = unpack(bytes);
    ASSERT_TRUE(back.ok()) << back.status();
    expect_same(b, *back);
  }
  EXPECT_EQ(pack(sample_batch()).size(), 20u + 4 * (4 * 3 + 8 + 7));
}

TEST(StepMessage, WireFormatIsLittleEndianAndFixed) {
  // One decode step: token 0x0102 at position 3 in block 5. Pinned, so a change to the format
  // must come with a new version.
  const std::string bytes = pack(Batch{{{{0x0102}, 3, {5}, true}}});
  const std::vector<uint8_t> want = {
      'S', 'S', 'T', 'P', 1, 0, 0, 0,  // magic, version
      1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0,  // 1 sequence, 1 token, 1 block id
      1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0,  // query_len, num_cached, table len, sample
      0x02, 0x01, 0, 0, 5, 0, 0, 0};  // token ids, block ids
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.end()), want);
}

void expect_invalid(const std::string& bytes, const std::string& needle) {
  auto b = unpack(bytes);
  ASSERT_FALSE(b.ok()) << "accepted a bad message; wanted an error containing '" << needle << "'";
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(b.status().message()).find(needle), std::string::npos) << b.status();
}

std::string with_word(std::string bytes, size_t word, uint32_t value) {
  for (int i = 0; i < 4; ++i) bytes[word * 4 + i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

TEST(StepMessage, CorruptMessagesAreErrors) {
  const std::string good = pack(sample_batch());
  for (size_t n = 0; n < good.size(); ++n) expect_invalid(good.substr(0, n), "truncated");
  expect_invalid(good + '\0', "trailing bytes");
  expect_invalid(with_word(good, 0, 0x12345678), "bad magic");
  expect_invalid(with_word(good, 1, 2), "version 2 is not supported");
  // Counts that the size cannot hold, up to the largest, fail before anything is allocated.
  expect_invalid(with_word(good, 2, 0xffffffff), "truncated");
  expect_invalid(with_word(good, 3, 0xffffffff), "truncated");
  // Per-sequence fields (arrays start at word 5; S = 3).
  expect_invalid(with_word(good, 5, 4), "add up to");                 // query_len[0] 5 -> 4
  expect_invalid(with_word(good, 5, 0xffffffff), "negative query length");
  expect_invalid(with_word(good, 8, 0x80000000), "negative num_cached");
  expect_invalid(with_word(good, 11, 0xfffffffe), "negative block table length");
  expect_invalid(with_word(good, 12, 1), "add up to");                // table_len[1] 3 -> 1
  expect_invalid(with_word(good, 14, 2), "sample flag 2");
  // Moving a token from one sequence to another keeps the sums: valid, a different batch.
  auto moved = unpack(with_word(with_word(good, 5, 4), 6, 2));
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->seqs[1].token_ids, (std::vector<int32_t>{15, 2147483647}));
}

TEST(StepMessage, RandomCorruptionIsRejectedOrReadsACanonicalBatch) {
  const std::string good = pack(sample_batch());
  std::mt19937 rng(1);
  for (int i = 0; i < 20000; ++i) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
    if (rng() % 4 == 0) bytes.resize(rng() % (bytes.size() + 8), '\0');
    auto b = unpack(bytes);
    if (b.ok()) {
      ASSERT_EQ(pack(*b), bytes) << "a message that unpacks must be what its batch packs to";
    }
  }
}

// ---- TP on the golden checkpoints -------------------------------------------------------------

constexpr double kRelTolerance = 1e-4;

struct GoldenPrompt {
  std::vector<int32_t> prompt;
  std::vector<int32_t> tokens;
  std::vector<float> logits;  // [steps, vocab]
};

struct Golden {
  std::string dir;
  ModelConfig config;
  int64_t steps = 0;
  std::vector<GoldenPrompt> prompts;
};

Golden read_golden(const std::string& name) {
  Golden g;
  g.dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/" + name;
  g.config = *load_model_config(g.dir);
  const auto j = nlohmann::json::parse(std::ifstream(g.dir + "/golden.json"));
  g.steps = j["steps"].get<int64_t>();
  auto logits_file = SafetensorsFile::open(g.dir + "/golden_logits.safetensors");
  EXPECT_TRUE(logits_file.ok()) << logits_file.status();
  for (size_t i = 0; i < j["prompts"].size(); ++i) {
    GoldenPrompt p;
    p.prompt = j["prompts"][i]["prompt_ids"].get<std::vector<int32_t>>();
    p.tokens = j["prompts"][i]["token_ids"].get<std::vector<int32_t>>();
    auto view = (*logits_file)->view("prompt" + std::to_string(i));
    const auto* f = static_cast<const float*>(view->data);
    p.logits.assign(f, f + view->numel());
    g.prompts.push_back(std::move(p));
  }
  return g;
}

// Max |ours - reference| / max(1, max |reference|) over every step and vocabulary entry.
double logit_error(const std::vector<std::vector<float>>& ours, const std::vector<float>& reference, int64_t vocab) {
  double worst = 0.0;
  for (size_t s = 0; s < ours.size(); ++s) {
    double scale = 1.0;
    for (int64_t v = 0; v < vocab; ++v) scale = std::max(scale, std::fabs(double(reference[s * vocab + v])));
    for (int64_t v = 0; v < vocab; ++v) {
      worst = std::max(worst, std::fabs(double(ours[s][v]) - reference[s * vocab + v]) / scale);
    }
  }
  return worst;
}

std::unique_ptr<StepExecutor> load_executor(const std::string& dir, int tp_size, int64_t num_kv_blocks = 64) {
  ExecutorOptions options;
  options.model_dir = dir;
  options.tp_size = tp_size;
  options.num_kv_blocks = num_kv_blocks;
  auto loaded = load_model(options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? std::move(loaded->executor) : nullptr;
}

struct TpCase {
  std::string checkpoint;
  int tp_size;
};
void PrintTo(const TpCase& c, std::ostream* os) { *os << c.checkpoint << " tp_size " << c.tp_size; }

class TpGoldenTest : public ::testing::TestWithParam<TpCase> {
 protected:
  void SetUp() override { golden_ = read_golden(GetParam().checkpoint); }
  Golden golden_;
};

TEST_P(TpGoldenTest, GreedyTokensAndLogitsMatchTransformersAndTp1) {
  auto tp1 = load_executor(golden_.dir, 1);
  auto tpn = load_executor(golden_.dir, GetParam().tp_size);
  ASSERT_TRUE(tp1 && tpn);
  EXPECT_EQ(dynamic_cast<TpExecutor*>(tpn.get())->tp_size(), GetParam().tp_size);
  const int64_t vocab = golden_.config.vocab_size;
  for (const GoldenPrompt& p : golden_.prompts) {
    GreedyOptions options{.max_tokens = golden_.steps, .ignore_eos = true, .stop_token_ids = {}, .prefill_chunk = 0, .return_logits = true};
    auto one = generate_greedy(*tp1, p.prompt, options);
    auto out = generate_greedy(*tpn, p.prompt, options);
    ASSERT_TRUE(one.ok() && out.ok()) << one.status() << out.status();
    EXPECT_EQ(out->token_ids, p.tokens) << "prompt of " << p.prompt.size() << " tokens";
    const double vs_golden = logit_error(out->logits, p.logits, vocab);
    std::vector<float> tp1_logits;
    for (const auto& row : one->logits) tp1_logits.insert(tp1_logits.end(), row.begin(), row.end());
    const double vs_tp1 = logit_error(out->logits, tp1_logits, vocab);
    EXPECT_LT(vs_golden, kRelTolerance);
    EXPECT_LT(vs_tp1, kRelTolerance);
    std::printf("[ tp ] %s tp=%d prompt %zu: max relative logit error %.3g vs transformers, %.3g vs tp=1\n",
                GetParam().checkpoint.c_str(), GetParam().tp_size, p.prompt.size(), vs_golden, vs_tp1);
  }
  // Chunked prefill (chunks of 7 cross block boundaries mid-chunk).
  const GoldenPrompt& p = golden_.prompts.back();
  auto out = generate_greedy(*tpn, p.prompt,
                             {.max_tokens = golden_.steps, .ignore_eos = true, .stop_token_ids = {}, .prefill_chunk = 7, .return_logits = true});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->token_ids, p.tokens);
  EXPECT_LT(logit_error(out->logits, p.logits, vocab), kRelTolerance);
}

// Every golden prompt twice at once in a cache of 12 blocks (preemption), a token budget of 40
// (chunked prefill mixed with decodes) and prefix caching.
TEST_P(TpGoldenTest, EngineWithManyRequestsPreemptionAndPrefixCachingMatchesGolden) {
  auto exec = load_executor(golden_.dir, GetParam().tp_size, 12);
  ASSERT_TRUE(exec);
  Engine engine(*exec, {.scheduler = {.max_num_seqs = 8, .max_num_batched_tokens = 40}, .max_model_len = 0, .enable_prefix_caching = true, .eos_token_ids = {}});
  std::vector<Request> requests;
  for (int copy = 0; copy < 2; ++copy) {
    for (const GoldenPrompt& p : golden_.prompts) {
      Request r{"", p.prompt, {}};
      r.params.temperature = 0;
      r.params.max_tokens = golden_.steps;
      r.params.ignore_eos = true;
      requests.push_back(std::move(r));
    }
  }
  auto results = run_to_completion(engine, requests);
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t k = 0; k < results->size(); ++k) {
    EXPECT_EQ((*results)[k].new_token_ids, golden_.prompts[k % golden_.prompts.size()].tokens) << "request " << k;
  }
  const EngineStats s = engine.stats();
  EXPECT_GT(s.num_preemptions, 0);
  EXPECT_GT(s.prefix_cache_hits, 0);
  EXPECT_EQ(s.num_free_blocks, s.num_blocks) << "blocks leaked";
}

INSTANTIATE_TEST_SUITE_P(TinyCheckpoints, TpGoldenTest,
                         ::testing::Values(TpCase{"llama3-gqa-bf16", 2}, TpCase{"llama3-gqa-bf16", 4},  // KV split, replicated
                                           TpCase{"llama3-tied-mqa-fp16", 2}, TpCase{"llama3-tied-mqa-fp16", 3},
                                           TpCase{"llama2-mha-bf16", 2}, TpCase{"llama2-mha-bf16", 4}),
                         [](const auto& info) {
                           std::string name = info.param.checkpoint + "_tp" + std::to_string(info.param.tp_size);
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(TpModel, EachRankHoldsItsHeads) {
  struct Want {
    std::string checkpoint;
    int tp_size;
    int64_t q_heads, kv_heads;
  };
  for (const Want& w : {Want{"llama3-gqa-bf16", 2, 2, 1}, Want{"llama3-gqa-bf16", 4, 1, 1},
                        Want{"llama3-tied-mqa-fp16", 2, 3, 1}, Want{"llama2-mha-bf16", 4, 1, 1},
                        Want{"llama2-mha-bf16", 2, 2, 2}}) {
    const std::string dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/" + w.checkpoint;
    const ModelConfig config = *load_model_config(dir);
    auto ckpt = Checkpoint::open(dir);
    ASSERT_TRUE(ckpt.ok());
    InProcessGroup group(w.tp_size);
    for (int r = 0; r < w.tp_size; ++r) {
      CpuBackend backend(1);
      auto model = LlamaModel::load(config, **ckpt, backend, group.comm(r));
      ASSERT_TRUE(model.ok()) << model.status();
      EXPECT_EQ((*model)->num_local_q_heads(), w.q_heads) << w.checkpoint << " tp " << w.tp_size;
      EXPECT_EQ((*model)->num_local_kv_heads(), w.kv_heads) << w.checkpoint << " tp " << w.tp_size;
      EXPECT_EQ((*model)->kv_bytes_per_token(), 2 * config.num_hidden_layers * w.kv_heads * config.head_dim * 4);
    }
  }
}

TEST(TpModel, TpSizesThatDoNotDivideAreClearErrorsAtLoad) {
  auto expect_error = [](const ModelConfig& config, int tp_size, const std::string& needle) {
    const std::string dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-gqa-bf16";
    auto ckpt = Checkpoint::open(dir);
    InProcessGroup group(tp_size);
    CpuBackend backend(1);
    auto model = LlamaModel::load(config, **ckpt, backend, group.comm(0));
    ASSERT_FALSE(model.ok()) << needle;
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(model.status().message()).find(needle), std::string::npos) << model.status();
  };
  const ModelConfig gqa = *load_model_config(std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-gqa-bf16");
  expect_error(gqa, 3, "tp_size 3 does not divide num_attention_heads (4)");
  ModelConfig c = gqa;
  c.num_attention_heads = 12;
  c.num_key_value_heads = 3;
  expect_error(c, 2, "tp_size 2 and num_key_value_heads (3) must divide one another");
  c = gqa;
  c.intermediate_size = 162;
  expect_error(c, 4, "does not divide intermediate_size (162)");
  c = gqa;
  c.vocab_size = 510;
  expect_error(c, 4, "does not divide vocab_size (510)");

  // Through load_model, as the CLI reaches it: the tied MQA checkpoint has 6 heads.
  ExecutorOptions options;
  options.model_dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-tied-mqa-fp16";
  options.tp_size = 4;
  auto loaded = load_model(options);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(loaded.status().message()).find("tp_size 4 does not divide num_attention_heads (6)"),
            std::string::npos)
      << loaded.status();
  options.tp_size = 0;
  EXPECT_EQ(load_model(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// A failure on one rank breaks the whole group: the failing step throws on rank 0, every later
// step throws the group's error at once, and destruction still joins the followers.
TEST(TpExecutor, AFailedStepBreaksTheGroupAndShutdownStillJoins) {
  auto exec = load_executor(std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama2-mha-bf16", 2, 8);
  ASSERT_TRUE(exec);
  const Batch good{{{{1, 2, 3}, 0, {0}, true}}};
  EXPECT_EQ(exec->execute(good).size(), static_cast<size_t>(exec->vocab_size()));
  const Batch bad{{{{1, 2, 3}, 0, {99}, true}}};  // block 99 of 8
  EXPECT_THROW(exec->execute(bad), std::logic_error);
  EXPECT_THROW(exec->execute(good), CollectiveError);
  exec.reset();  // must not hang
}

// ---- Command line -----------------------------------------------------------------------------

// Runs `shardserve ARGS` with stderr merged into the output; returns {exit status, output}.
std::pair<int, std::string> run_cli(const std::string& args) {
  const std::string cmd = std::string(SHARDSERVE_BIN_DIR) + "/shardserve " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return {-1, ""};
  std::string output;
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), pipe) != nullptr) output += buf.data();
  return {pclose(pipe), output};
}

class TpCommandLineTest : public ::testing::TestWithParam<TpCase> {};

// All golden prompts at once through --prompts-jsonl in a cache small enough to force preemption.
TEST_P(TpCommandLineTest, GenerateWithTpSizeReproducesTheGoldenTokens) {
  const Golden golden = read_golden(GetParam().checkpoint);
  const std::string path = ::testing::TempDir() + "/tp_prompts_" + GetParam().checkpoint + ".jsonl";
  {
    std::ofstream out(path);
    for (const GoldenPrompt& p : golden.prompts) out << nlohmann::json{{"prompt_ids", p.prompt}, {"ignore_eos", true}}.dump() << "\n";
  }
  const auto [status, output] =
      run_cli("generate --backend cpu --tp-size " + std::to_string(GetParam().tp_size) + " --model " + golden.dir +
              " --prompts-jsonl " + path + " --max-tokens " + std::to_string(golden.steps) +
              " --num-kv-blocks 7 --max-num-batched-tokens 32 --output json");
  ASSERT_EQ(status, 0) << output;
  std::istringstream lines(output);
  std::string line;
  size_t i = 0;
  for (; std::getline(lines, line); ++i) {
    ASSERT_LT(i, golden.prompts.size()) << output;
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), golden.prompts[i].tokens) << "line " << i;
  }
  EXPECT_EQ(i, golden.prompts.size());
}

INSTANTIATE_TEST_SUITE_P(TinyCheckpoints, TpCommandLineTest,
                         ::testing::Values(TpCase{"llama3-gqa-bf16", 2}, TpCase{"llama3-gqa-bf16", 4},
                                           TpCase{"llama3-tied-mqa-fp16", 2}, TpCase{"llama2-mha-bf16", 4}),
                         [](const auto& info) {
                           std::string name = info.param.checkpoint + "_tp" + std::to_string(info.param.tp_size);
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(TpCommandLine, ATpSizeThatDoesNotDivideTheModelFailsAtStartUp) {
  const std::string dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-tied-mqa-fp16";
  const auto [status, output] = run_cli("generate --backend cpu --tp-size 4 --model " + dir + " --prompt-ids 1,2,3");
  EXPECT_NE(status, 0);
  EXPECT_NE(output.find("tp_size 4 does not divide num_attention_heads (6)"), std::string::npos) << output;
}

// The group's control-channel exchange (how GPU ranks swap their all-reduce buffers' IPC handles):
// every rank gets every rank's bytes in rank order, binary and empty entries included, over real
// loopback connections; a follower that is gone or silent fails rank 0's exchange, naming it.
struct LoopbackGroup {
  std::unique_ptr<FrameListener> listener;
  std::vector<std::unique_ptr<FrameSocket>> at_leader;  // [r - 1]: rank 0's end of rank r
  std::vector<std::unique_ptr<FrameSocket>> at_follower;  // [r - 1]: rank r's end
};
LoopbackGroup make_loopback_group(int tp_size) {
  LoopbackGroup g;
  auto listener = FrameListener::listen("127.0.0.1", 0);
  EXPECT_TRUE(listener.ok()) << listener.status();
  g.listener = std::move(*listener);
  for (int r = 1; r < tp_size; ++r) {
    auto c = FrameSocket::connect("127.0.0.1:" + std::to_string(g.listener->port()), 5s);
    EXPECT_TRUE(c.ok()) << c.status();
    auto a = g.listener->accept(5s);
    EXPECT_TRUE(a.ok()) << a.status();
    g.at_follower.push_back(std::move(*c));
    g.at_leader.push_back(std::move(*a));
  }
  return g;
}

TEST(GroupExchange, EveryRankGetsEveryRanksBytesInRankOrder) {
  constexpr int kRanks = 4;
  LoopbackGroup g = make_loopback_group(kRanks);
  const std::vector<std::string> mine = {"rank zero", std::string("\0\1\2 binary\xff", 12), "", std::string(70000, 'x')};
  std::vector<absl::StatusOr<std::vector<std::string>>> got(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      GroupOptions o;
      o.rank = r;
      o.tp_size = kRanks;
      o.collective_timeout = 10s;
      std::vector<FrameSocket*> peers;
      if (r == 0) {
        for (auto& s : g.at_leader) peers.push_back(s.get());
      } else {
        peers.push_back(g.at_follower[static_cast<size_t>(r - 1)].get());
      }
      got[static_cast<size_t>(r)] = exchange_through_leader(o, peers, mine[static_cast<size_t>(r)]);
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(got[static_cast<size_t>(r)].ok()) << "rank " << r << ": " << got[static_cast<size_t>(r)].status();
    EXPECT_EQ(*got[static_cast<size_t>(r)], mine) << "rank " << r;
  }
}

TEST(GroupExchange, AFollowerThatIsGoneOrSilentFailsRankZerosExchange) {
  for (bool gone : {true, false}) {
    LoopbackGroup g = make_loopback_group(3);
    GroupOptions o;
    o.rank = 0;
    o.tp_size = 3;
    o.collective_timeout = 300ms;
    // Rank 1 takes part; rank 2 closes its connection or never sends.
    std::thread one([&] {
      GroupOptions f = o;
      f.rank = 1;
      (void)exchange_through_leader(f, {g.at_follower[0].get()}, "one");
    });
    if (gone) g.at_follower[1].reset();
    const auto start = std::chrono::steady_clock::now();
    auto all = exchange_through_leader(o, {g.at_leader[0].get(), g.at_leader[1].get()}, "zero");
    ASSERT_FALSE(all.ok()) << (gone ? "gone" : "silent");
    EXPECT_NE(std::string(all.status().message()).find("rank 2"), std::string::npos) << all.status();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
    g.at_leader.clear();  // rank 1 is waiting for the list: its connection closes
    one.join();
  }
}

}  // namespace
}  // namespace shardserve
