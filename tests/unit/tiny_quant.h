// What the tests of the tiny quantized checkpoints (tests/data/tiny-quant) share: the CPU ones
// (tests/unit/quant_test.cc) and the CUDA ones (tests/gpu/quant_cuda_test.cc) run the same
// checkpoints on the same prompts and compare logits the same way.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "worker/engine/greedy.h"

namespace shardserve::tiny_quant {

inline const std::vector<std::string> kCheckpoints = {"awq-gemm-g32", "gptq-g32-sym-actorder", "gptq-v2-g32-asym",
                                                      "fp8-per-tensor-static", "fp8-per-channel-dynamic"};

// One prompt within a KV block, one across a block boundary (and more than 8 tokens: the prompt
// takes the batched path of a GPU's quantized layers, not the GEMV).
inline const std::vector<std::vector<int32_t>> kPrompts = {
    {5, 17, 99, 3, 64}, {120, 7, 33, 33, 81, 2, 44, 90, 100, 11, 12, 13, 127, 0, 56, 78, 91, 23, 45, 67, 89, 101, 6, 8, 10}};

// Greedy, ignoring EOS, with every step's logits.
inline GreedyOptions greedy(int64_t max_tokens) {
  GreedyOptions g;
  g.max_tokens = max_tokens;
  g.ignore_eos = true;
  g.return_logits = true;
  return g;
}

// Max |a - b| / max(1, max |b|) over all steps; infinite when the step counts differ.
inline double logit_error(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (size_t s = 0; s < b.size(); ++s) {
    if (a[s].size() != b[s].size()) return std::numeric_limits<double>::infinity();
    double scale = 1.0;
    for (float v : b[s]) scale = std::max(scale, std::fabs(double(v)));
    for (size_t v = 0; v < b[s].size(); ++v) worst = std::max(worst, std::fabs(double(a[s][v]) - b[s][v]) / scale);
  }
  return worst;
}

// A gtest parameter name for a checkpoint: "awq-gemm-g32" -> "awq_gemm_g32".
inline std::string test_name(std::string checkpoint) {
  std::replace(checkpoint.begin(), checkpoint.end(), '-', '_');
  return checkpoint;
}

}  // namespace shardserve::tiny_quant
