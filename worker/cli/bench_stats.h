// The arithmetic of `shardserve bench` (bench_cmd.cc), apart from any network so it is unit-tested
// on its own: length distributions for prompts and outputs, per-request timelines as the client
// saw them, percentiles, and the summary that becomes the JSON report.
//
// Conventions (the same as vLLM's benchmark_serving.py where it has one):
// - percentiles interpolate linearly between the two nearest ranks (numpy's default), so p50 of
//   {1, 2, 3, 4} is 2.5 and p50 <= p90 <= p99 always holds;
// - TTFT = first message carrying tokens - send time; E2E = end of the call - send time;
// - ITL: one sample per output token after the first. When one message carries n tokens after a
//   gap g, that is n samples of g / n (the coordinator's shardserve_inter_token_latency_seconds
//   counts the same way); tokens that come with the first token count gaps of 0. So a request
//   has one ITL sample fewer than tokens, and its ITLs add up to last token - first token;
// - TPOT (time per output token) = (E2E - TTFT) / (output tokens - 1), one sample per request of
//   two or more tokens: the per-request mean that genai-perf calls inter-token latency;
// - throughput divides by the measured window: from the start of the measured phase (after the
//   warm-up) to the end of its last request; failed requests add no tokens.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace shardserve::cli::bench {

// A token-length distribution, written "128" (fixed), "uniform:64:256" (integers, both ends
// included) or "normal:128:32" (mean:std, rounded). Every draw is at least 1.
struct LengthDist {
  enum class Kind { kFixed, kUniform, kNormal };
  Kind kind = Kind::kFixed;
  double a = 0;  // fixed: the value; uniform: low; normal: mean
  double b = 0;  // uniform: high; normal: std

  static absl::StatusOr<LengthDist> parse(const std::string& spec);
  int64_t sample(std::mt19937_64& rng) const;
  // The longest draw possible, or mean + 4 std for a normal (what a max-model-len check needs).
  int64_t upper_bound() const;
  std::string to_string() const;  // parse(to_string()) gives the same distribution
};

// Mean and percentiles of one metric over the measured requests; all 0 when there are no values.
struct Summary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};

// q in [0, 100]; `sorted` ascending and non-empty.
double percentile(const std::vector<double>& sorted, double q);
Summary summarize(std::vector<double> values);

// One request as the client saw it. Times are seconds since the start of the measured window.
struct RequestRecord {
  int64_t index = 0;
  double send_s = 0;
  double end_s = 0;
  // Each message that carried tokens: its arrival time and how many tokens it carried.
  std::vector<std::pair<double, int>> chunks;
  int status_code = 0;  // gRPC status code; 0 is OK
  std::string error_message;
  int64_t prompt_tokens = 0;            // as the server reported it (usage), else as sent
  int64_t cached_prompt_tokens = 0;     // of those, served from the server's prefix cache (usage)
  int64_t requested_output_tokens = 0;  // max_tokens of the request

  bool ok() const { return status_code == 0; }
  int64_t output_tokens() const;
  double ttft_s() const;  // 0 when no token arrived
  double e2e_s() const { return end_s - send_s; }
  std::vector<double> itl_s() const;
};

// The results part of the report (settings are added by the caller): completed, errors,
// errors_by_code, error_messages (the first message per code), duration_s, requests_per_s,
// output_tokens_per_s, input_tokens_per_s, total_tokens_per_s, total_input_tokens,
// total_cached_prompt_tokens (prefix-cache hits: they make TTFT look better than fresh prompts
// get), total_output_tokens, requested_output_tokens, output_tokens_mismatched, and for each of ttft,
// itl, tpot and e2e: <metric>_{mean,p50,p90,p99}_s and <metric>_count.
// The window ends with the last record's end.
nlohmann::json summarize_run(const std::vector<RequestRecord>& records);

// One line of the --samples-file: index, start_s, status, input_tokens, cached_tokens, output_tokens, ttft_s,
// e2e_s, itl_s (the list); times in seconds, rounded to 0.1 us.
nlohmann::json sample_json(const RequestRecord& r);

// The name of a gRPC status code ("NOT_FOUND").
std::string status_code_name(int code);

}  // namespace shardserve::cli::bench
