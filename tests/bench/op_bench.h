// Micro-benchmarks of single CUDA backend ops at a model's decode shapes (engine_bench --micro).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "worker/model/config.h"

namespace shardserve {

// Times each op with CUDA events (median of 50 after warm-up) and prints its achieved fraction of
// the copy bandwidth `bw` (bytes/s). Returns one JSON record per op.
std::vector<nlohmann::json> run_op_benchmarks(const ModelConfig& config, double bw, int context, const std::string& device);

}  // namespace shardserve
