#include "worker/service/engine_loop.h"

#include <gtest/gtest.h>

#include <chrono>

namespace shardserve {
namespace {

constexpr const char* kModel = SHARDSERVE_TEST_DATA_DIR "/tiny/llama3-gqa-bf16";

LoadedModel load(int64_t num_blocks) {
  ExecutorOptions o;
  o.model_dir = kModel;
  o.num_kv_blocks = num_blocks;
  auto m = load_model(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(*m);
}

Request request(const std::string& id, int64_t max_tokens) {
  Request r;
  r.request_id = id;
  r.prompt_token_ids = {0, 17, 42, 300, 12};
  r.params.temperature = 0;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

// Reads the stream to its end (bounded): all token ids, and its final status.
std::pair<std::vector<int32_t>, absl::Status> drain(RequestStream& s) {
  std::vector<int32_t> ids;
  std::unique_lock lock(s.mu);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (true) {
    s.cv.wait_until(lock, give_up, [&] { return !s.outputs.empty() || s.done; });
    for (const RequestOutput& o : s.outputs) ids.insert(ids.end(), o.new_token_ids.begin(), o.new_token_ids.end());
    s.outputs.clear();
    if (s.done) return {ids, s.status};
    if (std::chrono::steady_clock::now() > give_up) return {ids, absl::DeadlineExceededError("test timeout")};
  }
}

TEST(EngineLoop, GivesTheSameTokensAsRunToCompletion) {
  LoadedModel reference_model = load(64);
  Engine reference(*reference_model.executor, EngineConfig{});
  auto expected = run_to_completion(reference, {request("a", 20), request("b", 7)});
  ASSERT_TRUE(expected.ok());

  EngineLoop loop(load(64), EngineConfig{});
  auto a = loop.submit(request("a", 20));
  auto b = loop.submit(request("b", 7));
  auto [ids_a, st_a] = drain(*a);
  auto [ids_b, st_b] = drain(*b);
  EXPECT_TRUE(st_a.ok()) << st_a;
  EXPECT_TRUE(st_b.ok()) << st_b;
  EXPECT_EQ(ids_a, (*expected)[0].new_token_ids);
  EXPECT_EQ(ids_b, (*expected)[1].new_token_ids);
}

TEST(EngineLoop, RejectionArrivesOnTheStream) {
  EngineLoop loop(load(64), EngineConfig{});
  Request bad = request("bad", 5);
  bad.prompt_token_ids.push_back(100000);
  auto [ids, st] = drain(*loop.submit(std::move(bad)));
  EXPECT_TRUE(ids.empty());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
}

TEST(EngineLoop, AbortFreesEveryBlock) {
  EngineLoop loop(load(64), EngineConfig{});
  auto s = loop.submit(request("long", 240));
  {  // wait for the first token: the request holds blocks now
    std::unique_lock lock(s->mu);
    ASSERT_TRUE(s->cv.wait_for(lock, std::chrono::seconds(30), [&] { return !s->outputs.empty() || s->done; }));
  }
  loop.abort("long");
  auto [ids, st] = drain(*s);
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(ids.size(), 240u);
  // The abort is applied before the loop's next step; stats are published after it.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (loop.num_in_flight() != 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const EngineStats stats = loop.stats();
  EXPECT_EQ(loop.num_in_flight(), 0);
  EXPECT_EQ(stats.num_free_blocks, stats.num_blocks);
}

}  // namespace
}  // namespace shardserve
