// Shared by the tokenizer tests: the vendored Llama 3.1 tokenizer, loaded once per process
// (loading parses a 9 MB JSON), and the JSONL test data.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"

namespace shardserve::testing {

inline const std::string kDataDir = SHARDSERVE_TEST_DATA_DIR;
inline const std::string kLlamaDir = kDataDir + "/llama-3.1-tokenizer";

inline const Tokenizer& llama() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    auto loaded = Tokenizer::load(kLlamaDir);
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return *std::move(loaded);
  }();
  return *tokenizer;
}

// The records of a JSONL file; an empty vector and a test failure when the file is missing.
inline std::vector<nlohmann::json> read_jsonl(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << what << " missing: " << path
                  << " (make it with scripts/make_tokenizer_golden.py on a machine with transformers)";
    return {};
  }
  std::vector<nlohmann::json> records;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) records.push_back(nlohmann::json::parse(line));
  }
  return records;
}

inline std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

inline std::vector<int32_t> encode_or_die(std::string_view text, EncodeOptions options = {}) {
  auto ids = llama().encode(text, options);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

inline std::string decode_or_die(const std::vector<int32_t>& ids, bool skip_special = false) {
  auto text = llama().decode(ids, skip_special);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : std::string();
}

}  // namespace shardserve::testing
