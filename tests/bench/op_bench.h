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

// The quantized linear layers (INT4 group 128, INT8, FP8) at the model's projection shapes and
// each batch size, beside the BF16 weight through cuBLASLt: time, bytes of the packed weight read,
// bandwidth fraction and speed-up over BF16 cuBLASLt. One JSON record per (format, shape, batch).
std::vector<nlohmann::json> run_quant_op_benchmarks(const ModelConfig& config, double bw, const std::vector<int>& batches,
                                                    const std::string& device);

}  // namespace shardserve
