#include "worker/cli/bench_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace shardserve::cli::bench {

namespace {

std::string fmt_number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", v);
  return text;
}

bool is_integer(double v) { return std::floor(v) == v; }

}  // namespace

absl::StatusOr<LengthDist> LengthDist::parse(const std::string& spec) {
  const std::vector<absl::string_view> parts = absl::StrSplit(spec, ':');
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("length '", spec, "': ", why,
                                                   " (write N, uniform:LOW:HIGH or normal:MEAN:STD)"));
  };
  std::vector<double> numbers;
  for (size_t i = parts.size() == 1 ? 0 : 1; i < parts.size(); ++i) {
    double v = 0;
    if (!absl::SimpleAtod(parts[i], &v) || !std::isfinite(v)) return bad(absl::StrCat("'", parts[i], "' is not a number"));
    numbers.push_back(v);
  }
  LengthDist d;
  if (parts.size() == 1) {
    if (!is_integer(numbers[0]) || numbers[0] < 1) return bad("a fixed length is an integer >= 1");
    d.kind = Kind::kFixed;
    d.a = numbers[0];
    return d;
  }
  if (parts.size() != 3) return bad("a distribution takes two numbers");
  d.a = numbers[0];
  d.b = numbers[1];
  if (parts[0] == "uniform") {
    if (!is_integer(d.a) || !is_integer(d.b) || d.a < 1 || d.b < d.a) return bad("uniform needs integers 1 <= LOW <= HIGH");
    d.kind = Kind::kUniform;
  } else if (parts[0] == "normal") {
    if (d.a < 1 || d.b < 0) return bad("normal needs MEAN >= 1 and STD >= 0");
    d.kind = Kind::kNormal;
  } else {
    return bad(absl::StrCat("unknown distribution '", parts[0], "'"));
  }
  return d;
}

int64_t LengthDist::sample(std::mt19937_64& rng) const {
  switch (kind) {
    case Kind::kFixed:
      return static_cast<int64_t>(a);
    case Kind::kUniform:
      return std::uniform_int_distribution<int64_t>(static_cast<int64_t>(a), static_cast<int64_t>(b))(rng);
    case Kind::kNormal:
      return std::max<int64_t>(1, std::llround(std::normal_distribution<double>(a, b)(rng)));
  }
  return 1;
}

int64_t LengthDist::upper_bound() const {
  switch (kind) {
    case Kind::kFixed:
      return static_cast<int64_t>(a);
    case Kind::kUniform:
      return static_cast<int64_t>(b);
    case Kind::kNormal:
      return std::llround(a + 4 * b);
  }
  return 1;
}

std::string LengthDist::to_string() const {
  switch (kind) {
    case Kind::kFixed:
      return fmt_number(a);
    case Kind::kUniform:
      return absl::StrCat("uniform:", fmt_number(a), ":", fmt_number(b));
    case Kind::kNormal:
      return absl::StrCat("normal:", fmt_number(a), ":", fmt_number(b));
  }
  return "";
}

double percentile(const std::vector<double>& sorted, double q) {
  const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

Summary summarize(std::vector<double> values) {
  Summary s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = static_cast<int64_t>(values.size());
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  s.p50 = percentile(values, 50);
  s.p90 = percentile(values, 90);
  s.p99 = percentile(values, 99);
  return s;
}

int64_t RequestRecord::output_tokens() const {
  int64_t n = 0;
  for (const auto& [t, count] : chunks) n += count;
  return n;
}

double RequestRecord::ttft_s() const { return chunks.empty() ? 0.0 : chunks.front().first - send_s; }

std::vector<double> RequestRecord::itl_s() const {
  std::vector<double> out;
  if (chunks.empty()) return out;
  // The first message's extra tokens arrived together with the first token: gaps of 0.
  out.assign(static_cast<size_t>(chunks.front().second - 1), 0.0);
  for (size_t i = 1; i < chunks.size(); ++i) {
    const double gap = chunks[i].first - chunks[i - 1].first;
    out.insert(out.end(), static_cast<size_t>(chunks[i].second), gap / chunks[i].second);
  }
  return out;
}

std::string status_code_name(int code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

nlohmann::json summarize_run(const std::vector<RequestRecord>& records) {
  int64_t completed = 0, errors = 0, input_tokens = 0, cached_tokens = 0, output_tokens = 0, requested = 0,
          mismatched = 0;
  double window_end = 0;
  std::map<std::string, int64_t> errors_by_code;
  std::map<std::string, std::string> error_messages;
  std::vector<double> ttft, itl, tpot, e2e;
  for (const RequestRecord& r : records) {
    window_end = std::max(window_end, r.end_s);
    if (!r.ok()) {
      ++errors;
      const std::string name = status_code_name(r.status_code);
      ++errors_by_code[name];
      error_messages.emplace(name, r.error_message);
      continue;
    }
    ++completed;
    const int64_t out = r.output_tokens();
    input_tokens += r.prompt_tokens;
    cached_tokens += r.cached_prompt_tokens;
    output_tokens += out;
    requested += r.requested_output_tokens;
    if (out != r.requested_output_tokens) ++mismatched;
    if (out > 0) ttft.push_back(r.ttft_s());
    const std::vector<double> gaps = r.itl_s();
    itl.insert(itl.end(), gaps.begin(), gaps.end());
    if (out > 1) tpot.push_back((r.e2e_s() - r.ttft_s()) / static_cast<double>(out - 1));
    e2e.push_back(r.e2e_s());
  }
  const auto per_s = [&](double v) { return window_end > 0 ? v / window_end : 0.0; };
  nlohmann::json j = {
      {"completed", completed},
      {"errors", errors},
      {"errors_by_code", errors_by_code},
      {"error_messages", error_messages},
      {"duration_s", window_end},
      {"requests_per_s", per_s(static_cast<double>(completed))},
      {"output_tokens_per_s", per_s(static_cast<double>(output_tokens))},
      {"input_tokens_per_s", per_s(static_cast<double>(input_tokens))},
      {"total_tokens_per_s", per_s(static_cast<double>(input_tokens + output_tokens))},
      {"total_input_tokens", input_tokens},
      {"total_cached_prompt_tokens", cached_tokens},
      {"total_output_tokens", output_tokens},
      {"requested_output_tokens", requested},
      {"output_tokens_mismatched", mismatched},
  };
  for (auto& [name, values] : {std::pair{"ttft", &ttft}, {"itl", &itl}, {"tpot", &tpot}, {"e2e", &e2e}}) {
    const Summary s = summarize(std::move(*values));
    const std::string n = name;
    j[n + "_count"] = s.count;
    j[n + "_mean_s"] = s.mean;
    j[n + "_p50_s"] = s.p50;
    j[n + "_p90_s"] = s.p90;
    j[n + "_p99_s"] = s.p99;
  }
  return j;
}

nlohmann::json sample_json(const RequestRecord& r) {
  // Rounded to 0.1 us, well below what a network call can resolve: a long run's file is then a
  // third of the size it is with every digit of a double.
  const auto round = [](double s) { return std::round(s * 1e7) / 1e7; };
  std::vector<double> itl = r.itl_s();
  for (double& v : itl) v = round(v);
  return {{"index", r.index},
          {"start_s", round(r.send_s)},
          {"status", status_code_name(r.status_code)},
          {"input_tokens", r.prompt_tokens},
          {"cached_tokens", r.cached_prompt_tokens},
          {"output_tokens", r.output_tokens()},
          {"ttft_s", round(r.ttft_s())},
          {"e2e_s", round(r.e2e_s())},
          {"itl_s", itl}};
}

}  // namespace shardserve::cli::bench
