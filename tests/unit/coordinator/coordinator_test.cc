#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "coordinator/config.h"
#include "coordinator/router.h"
#include "coordinator/text_stream.h"

namespace shardserve {
namespace {

TEST(ClusterConfig, ParsesModelsAndGroupsAndResolvesPaths) {
  auto c = parse_cluster_config(R"(
models:
  - name: tiny
    checkpoint: ckpt/tiny
groups:
  - name: tp2
    model: tiny
    tp_size: 2
    replicas: 3
    num_kv_blocks: 64
  - name: one
    model: tiny
    enable_prefix_caching: false
)", "/base");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->models.size(), 1u);
  EXPECT_EQ(c->models[0].checkpoint, "/base/ckpt/tiny");
  ASSERT_EQ(c->groups.size(), 2u);
  EXPECT_EQ(c->groups[0].tp_size, 2);
  EXPECT_EQ(c->groups[0].replicas, 3);
  EXPECT_EQ(c->groups[0].num_kv_blocks, 64);
  EXPECT_EQ(c->groups[0].backend, "cpu");
  EXPECT_FALSE(c->groups[1].enable_prefix_caching);
}

TEST(ClusterConfig, RejectsTyposAndDanglingReferences) {
  auto typo = parse_cluster_config("models: [{name: a, checkpoint: x}]\ngroups: [{name: g, model: a, tp_sise: 2}]", "/");
  ASSERT_FALSE(typo.ok());
  EXPECT_NE(typo.status().message().find("tp_sise"), std::string::npos) << typo.status();
  auto dangling = parse_cluster_config("models: [{name: a, checkpoint: x}]\ngroups: [{name: g, model: b}]", "/");
  ASSERT_FALSE(dangling.ok());
  EXPECT_NE(dangling.status().message().find("'b'"), std::string::npos) << dangling.status();
  auto backend = parse_cluster_config("models: [{name: a, checkpoint: x}]\ngroups: [{name: g, model: a, backend: tpu}]", "/");
  EXPECT_FALSE(backend.ok());
  EXPECT_FALSE(parse_cluster_config("models: [", "/").ok());
  // Found by fuzzing: a negative engine setting silently meant the worker's default, like 0.
  auto negative = parse_cluster_config("models: [{name: a, checkpoint: x}]\ngroups: [{name: g, model: a, max_model_len: -1}]", "/");
  ASSERT_FALSE(negative.ok());
  EXPECT_NE(negative.status().message().find("max_model_len must be >= 0"), std::string::npos) << negative.status();
}

// Found by fuzzing (tests/fuzz/cluster_config_fuzz.cc): a key that is not a name (a YAML complex
// key) made yaml-cpp throw out of the parser, which ended the coordinator.
TEST(ClusterConfig, KeysThatAreNotNamesAreErrors) {
  auto c = parse_cluster_config("models:\n  - ? {checkpoint: x}\n    : y\ngroups: [{name: g, model: a}]\n", "/");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("models[0]"), std::string::npos) << c.status();
}

TEST(ClusterConfig, SyntheticModelsNameAPresetOrAConfigFile) {
  auto c = parse_cluster_config(R"(
models:
  - name: big
    synthetic: llama-3.1-70b
  - name: small
    synthetic: shapes/tiny.json
    tokenizer: tok
groups:
  - name: g
    model: big
)", "/base");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->models[0].synthetic, "llama-3.1-70b");  // a preset's name stays a name
  EXPECT_TRUE(c->models[0].checkpoint.empty());
  EXPECT_EQ(c->models[1].synthetic, "/base/shapes/tiny.json");  // a path is resolved like a checkpoint
  EXPECT_EQ(c->models[1].tokenizer, "/base/tok");
  for (const char* both_or_neither : {"models: [{name: a, checkpoint: x, synthetic: llama-3.1-8b}]\ngroups: [{name: g, model: a}]",
                                      "models: [{name: a}]\ngroups: [{name: g, model: a}]"}) {
    auto bad = parse_cluster_config(both_or_neither, "/");
    ASSERT_FALSE(bad.ok()) << both_or_neither;
    EXPECT_NE(bad.status().message().find("needs one of checkpoint"), std::string::npos) << bad.status();
  }
}

TEST(Router, PicksTheLeastLoadedServingReplica) {
  std::vector<ReplicaLoad> r(3);
  r[0] = {true, 800, 1000, 0.0, 0};
  r[1] = {false, 0, 1000, 0.0, 0};  // not serving: never picked, however idle
  r[2] = {true, 100, 1000, 0.0, 0};
  EXPECT_EQ(pick_replica(r, 0), 2);
  r[2].kv_usage = 0.9;  // nearly full cache outweighs fewer outstanding tokens
  EXPECT_EQ(pick_replica(r, 0), 0);
  r[0].serving = r[2].serving = false;
  EXPECT_EQ(pick_replica(r, 0), -1);
}

TEST(Router, SizeMattersAndTiesRotate) {
  std::vector<ReplicaLoad> r(2);
  r[0] = {true, 500, 1000, 0.0, 0};
  r[1] = {true, 800, 4000, 0.0, 0};  // more tokens, but a 4x larger cache
  EXPECT_EQ(pick_replica(r, 0), 1);
  r[0] = r[1] = {true, 0, 1000, 0.0, 0};
  EXPECT_EQ(pick_replica(r, 0), 0);
  EXPECT_EQ(pick_replica(r, 1), 1);
}

class TextStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = Tokenizer::load(SHARDSERVE_TEST_DATA_DIR "/llama-3.1-tokenizer");
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::move(*t);
  }
  std::vector<int32_t> ids(const std::string& text) { return *tokenizer_->encode(text); }
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(TextStreamTest, WithoutStopStringsEqualsDecode) {
  const std::string text = "Hello world, this is 🦙 streaming.";
  TextStream s(tokenizer_.get(), {}, true);
  std::string out;
  for (int32_t id : ids(text)) out += s.push(std::span<const int32_t>(&id, 1))->text;
  out += s.finish();
  EXPECT_EQ(out, text);
}

TEST_F(TextStreamTest, HoldsBackAPossibleStopAndCutsBeforeIt) {
  TextStream s(tokenizer_.get(), {"\nUser:"}, true);
  std::string out;
  std::optional<std::string> stop;
  for (int32_t id : ids("The answer is 42.\nUser: and then")) {
    auto d = s.push(std::span<const int32_t>(&id, 1));
    ASSERT_TRUE(d.ok());
    // Nothing of the stop string ever reaches the client, not even its first character.
    EXPECT_EQ(d->text.find('\n'), std::string::npos) << d->text;
    out += d->text;
    if (d->stop) stop = d->stop;
  }
  EXPECT_EQ(out, "The answer is 42.");
  EXPECT_EQ(stop, "\nUser:");
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(s.finish(), "");
}

TEST_F(TextStreamTest, ReleasesHeldTextThatDidNotBecomeAStop) {
  TextStream s(tokenizer_.get(), {"STOP"}, true);
  std::string out;
  for (int32_t id : ids("a ST b STO")) out += s.push(std::span<const int32_t>(&id, 1))->text;
  EXPECT_EQ(out, "a ST b ");  // "STO" could still become "STOP"
  EXPECT_EQ(s.finish(), "STO");
}

// Found by fuzzing (tests/fuzz/detokenizer_fuzz.cc): finish() flushes an unfinished character as
// U+FFFD, and that text must be checked for stop strings like any other.
TEST_F(TextStreamTest, AStopStringCompletedByTheFlushedEndStillStops) {
  std::vector<int32_t> prompt = ids("Hi ");
  prompt.push_back(*tokenizer_->token_to_id("\xC3\xB0"));  // the byte 0xF0: the start of a 4-byte character
  TextStream s(tokenizer_.get(), {"\xEF\xBF\xBD"}, true);       // U+FFFD
  auto d = s.push(prompt);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->text, "Hi ");
  EXPECT_FALSE(s.stopped());
  EXPECT_EQ(s.finish(), "");
  EXPECT_TRUE(s.stopped());
}

TEST(TextStreamNoTokenizer, GivesNoText) {
  TextStream s(nullptr, {}, true);
  const std::vector<int32_t> ids = {1, 2, 3};
  EXPECT_EQ(s.push(ids)->text, "");
  EXPECT_EQ(s.finish(), "");
}

}  // namespace
}  // namespace shardserve
