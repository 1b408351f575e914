// The arithmetic of `shardserve bench` (worker/cli/bench_stats.h): length distributions,
// percentiles, per-request timelines and the summary the JSON report is made of.
#include "worker/cli/bench_stats.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace shardserve::cli::bench {
namespace {

TEST(LengthDist, ParsesTheThreeForms) {
  auto fixed = LengthDist::parse("128");
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->kind, LengthDist::Kind::kFixed);
  EXPECT_EQ(fixed->to_string(), "128");
  auto uniform = LengthDist::parse("uniform:64:256");
  ASSERT_TRUE(uniform.ok()) << uniform.status();
  EXPECT_EQ(uniform->kind, LengthDist::Kind::kUniform);
  EXPECT_EQ(uniform->to_string(), "uniform:64:256");
  EXPECT_EQ(uniform->upper_bound(), 256);
  auto normal = LengthDist::parse("normal:128:32");
  ASSERT_TRUE(normal.ok()) << normal.status();
  EXPECT_EQ(normal->kind, LengthDist::Kind::kNormal);
  EXPECT_EQ(normal->to_string(), "normal:128:32");
  EXPECT_EQ(normal->upper_bound(), 128 + 4 * 32);
}

TEST(LengthDist, RejectsWhatIsNotALength) {
  for (const char* spec : {"", "0", "-3", "1.5", "abc", "uniform:64", "uniform:256:64", "uniform:0:4", "uniform:1.5:4",
                           "normal:0:1", "normal:128:-1", "gamma:1:2", "uniform:1:2:3", "normal:nan:1"}) {
    EXPECT_FALSE(LengthDist::parse(spec).ok()) << spec;
  }
}

TEST(LengthDist, SamplesStayInRangeAndFollowTheSeed) {
  const LengthDist uniform = *LengthDist::parse("uniform:3:7");
  std::mt19937_64 rng(42);
  std::vector<int> seen(8, 0);
  for (int i = 0; i < 5000; ++i) {
    const int64_t v = uniform.sample(rng);
    ASSERT_GE(v, 3);
    ASSERT_LE(v, 7);
    ++seen[v];
  }
  for (int v = 3; v <= 7; ++v) EXPECT_GT(seen[v], 800) << "both ends are included and drawn evenly: " << v;

  // A normal with a large std is clipped at 1, never below; its mean stays near MEAN.
  const LengthDist normal = *LengthDist::parse("normal:100:20");
  double sum = 0;
  for (int i = 0; i < 20000; ++i) sum += static_cast<double>(normal.sample(rng));
  EXPECT_NEAR(sum / 20000, 100.0, 1.0);
  const LengthDist wide = *LengthDist::parse("normal:2:50");
  for (int i = 0; i < 1000; ++i) ASSERT_GE(wide.sample(rng), 1);

  std::mt19937_64 a(7), b(7);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(normal.sample(a), normal.sample(b));
  EXPECT_EQ(LengthDist::parse("128")->sample(rng), 128);
}

TEST(Percentile, InterpolatesLinearlyBetweenRanksAsNumpyDoes) {
  // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) == [2.5, 3.7, 3.97]
  const std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(percentile(v, 50), 2.5);
  EXPECT_NEAR(percentile(v, 90), 3.7, 1e-12);
  EXPECT_NEAR(percentile(v, 99), 3.97, 1e-12);
  EXPECT_DOUBLE_EQ(percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(percentile({5}, 99), 5);
}

TEST(Summary, SortsItsInputAndOrdersItsPercentiles) {
  std::vector<double> values;
  std::mt19937_64 rng(1);
  std::exponential_distribution<double> d(3.0);
  for (int i = 0; i < 1001; ++i) values.push_back(d(rng));
  std::vector<double> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  const Summary s = summarize(values);  // unsorted input
  EXPECT_EQ(s.count, 1001);
  EXPECT_DOUBLE_EQ(s.p50, sorted[500]);
  EXPECT_DOUBLE_EQ(s.p90, sorted[900]);
  EXPECT_DOUBLE_EQ(s.p99, sorted[990]);
  EXPECT_LE(s.p50, s.p90);
  EXPECT_LE(s.p90, s.p99);
  EXPECT_EQ(summarize({}).count, 0);
  EXPECT_EQ(summarize({}).p99, 0);
}

RequestRecord record(double send, std::vector<std::pair<double, int>> chunks, double end, int64_t requested) {
  RequestRecord r;
  r.send_s = send;
  r.chunks = std::move(chunks);
  r.end_s = end;
  r.prompt_tokens = 10;
  r.requested_output_tokens = requested;
  return r;
}

TEST(RequestRecord, SplitsAMessageOfSeveralTokensIntoEqualGaps) {
  // Sent at 1.0; 1 token at 1.5, 1 at 1.6, then 4 in one message at 2.0, 1 more at 2.1.
  const RequestRecord r = record(1.0, {{1.5, 1}, {1.6, 1}, {2.0, 4}, {2.1, 1}}, 2.2, 7);
  EXPECT_EQ(r.output_tokens(), 7);
  EXPECT_DOUBLE_EQ(r.ttft_s(), 0.5);
  EXPECT_DOUBLE_EQ(r.e2e_s(), 1.2);
  const std::vector<double> itl = r.itl_s();
  ASSERT_EQ(itl.size(), 6u);  // one fewer than tokens
  const std::vector<double> want = {0.1, 0.1, 0.1, 0.1, 0.1, 0.1};
  for (size_t i = 0; i < itl.size(); ++i) EXPECT_NEAR(itl[i], want[i], 1e-12) << i;

  // Tokens that come with the first one add gaps of 0; the gaps add up to last - first token.
  const RequestRecord burst = record(0.0, {{0.2, 3}, {0.5, 1}}, 0.5, 4);
  const std::vector<double> burst_itl = burst.itl_s();
  ASSERT_EQ(burst_itl.size(), 3u);
  EXPECT_DOUBLE_EQ(burst_itl[0], 0.0);
  EXPECT_DOUBLE_EQ(burst_itl[1], 0.0);
  EXPECT_NEAR(burst_itl[2], 0.3, 1e-12);
}

TEST(SummarizeRun, CountsTokensErrorsAndThroughputOverTheWindow) {
  std::vector<RequestRecord> records;
  records.push_back(record(0.0, {{0.5, 1}, {1.0, 1}, {1.5, 1}}, 1.5, 3));
  records.push_back(record(0.5, {{1.0, 1}, {2.0, 2}}, 2.0, 3));
  RequestRecord failed = record(1.0, {}, 4.0, 3);
  failed.status_code = 5;  // NOT_FOUND
  failed.error_message = "no model 'x'";
  records.push_back(failed);
  RequestRecord short_one = record(1.0, {{1.2, 1}}, 1.2, 3);  // ended early: counted as mismatched
  short_one.cached_prompt_tokens = 8;
  records.push_back(short_one);

  const nlohmann::json j = summarize_run(records);
  EXPECT_EQ(j["completed"], 3);
  EXPECT_EQ(j["errors"], 1);
  EXPECT_EQ(j["errors_by_code"]["NOT_FOUND"], 1);
  EXPECT_EQ(j["error_messages"]["NOT_FOUND"], "no model 'x'");
  EXPECT_DOUBLE_EQ(j["duration_s"].get<double>(), 4.0);  // the window includes the failed request
  EXPECT_EQ(j["total_output_tokens"], 7);
  EXPECT_EQ(j["requested_output_tokens"], 9);
  EXPECT_EQ(j["output_tokens_mismatched"], 1);
  EXPECT_EQ(j["total_input_tokens"], 30);
  EXPECT_EQ(j["total_cached_prompt_tokens"], 8);
  EXPECT_DOUBLE_EQ(j["output_tokens_per_s"].get<double>(), 7 / 4.0);
  EXPECT_DOUBLE_EQ(j["requests_per_s"].get<double>(), 3 / 4.0);
  EXPECT_DOUBLE_EQ(j["input_tokens_per_s"].get<double>(), 30 / 4.0);
  EXPECT_EQ(j["ttft_count"], 3);
  EXPECT_EQ(j["itl_count"], 4);   // 2 + 2 + 0
  EXPECT_EQ(j["tpot_count"], 2);  // requests of 2+ tokens
  EXPECT_EQ(j["e2e_count"], 3);
  // TTFTs 0.5, 0.5, 0.2: p50 0.5, mean 0.4.
  EXPECT_DOUBLE_EQ(j["ttft_p50_s"].get<double>(), 0.5);
  EXPECT_NEAR(j["ttft_mean_s"].get<double>(), 0.4, 1e-12);
  // TPOT of request 2: (2.0 - 0.5 - 0.5) / 2 = 0.5; of request 1: (1.5 - 0.5) / 2 = 0.5.
  EXPECT_NEAR(j["tpot_p99_s"].get<double>(), 0.5, 1e-12);
  for (const char* m : {"ttft", "itl", "tpot", "e2e"}) {
    const std::string k = m;
    EXPECT_LE(j[k + "_p50_s"].get<double>(), j[k + "_p90_s"].get<double>()) << m;
    EXPECT_LE(j[k + "_p90_s"].get<double>(), j[k + "_p99_s"].get<double>()) << m;
  }
}

TEST(SummarizeRun, AnEmptyRunHasZerosNotNaNs) {
  const nlohmann::json j = summarize_run({});
  EXPECT_EQ(j["completed"], 0);
  EXPECT_EQ(j["output_tokens_per_s"].get<double>(), 0.0);
  EXPECT_FALSE(std::isnan(j["ttft_p99_s"].get<double>()));
}

TEST(SampleJson, CarriesTheTimelineOfOneRequest) {
  RequestRecord r = record(0.25, {{0.5, 1}, {0.75, 1}}, 0.8, 2);
  r.index = 9;
  const nlohmann::json j = sample_json(r);
  EXPECT_EQ(j["index"], 9);
  EXPECT_EQ(j["status"], "OK");
  EXPECT_EQ(j["output_tokens"], 2);
  EXPECT_DOUBLE_EQ(j["ttft_s"].get<double>(), 0.25);
  ASSERT_EQ(j["itl_s"].size(), 1u);
  EXPECT_DOUBLE_EQ(j["itl_s"][0].get<double>(), 0.25);
  EXPECT_EQ(status_code_name(5), "NOT_FOUND");
  EXPECT_EQ(status_code_name(4), "DEADLINE_EXCEEDED");
}

}  // namespace
}  // namespace shardserve::cli::bench
