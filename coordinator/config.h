// ClusterConfig: which models the cluster serves and which worker groups serve them, read from a
// YAML file:
//
//   models:
//     - name: llama-3.1-70b
//       checkpoint: /models/llama-3.1-70b-instruct   # the workers read it
//       tokenizer: /models/llama-3.1-70b-instruct    # optional; default: the checkpoint
//     - name: bench-70b
//       synthetic: llama-3.1-70b   # instead of a checkpoint: random weights of a preset's (or a
//                                  # config.json's) shape, for benchmarks; token ids in and out
//                                  # unless a tokenizer is given
//   groups:
//     - name: bf16-tp2
//       model: llama-3.1-70b
//       tp_size: 2
//       backend: cuda          # cpu or cuda
//       dtype: auto            # auto, bfloat16 or float16
//       quantization: none     # none, awq, gptq, int8, fp8
//       replicas: 1
//       process_per_rank: false # cpu: one worker process per rank instead of threads (cuda: always)
//       # engine settings, all optional (0: the worker's default)
//       num_kv_blocks: 0
//       kv_cache_bytes: 0
//       block_size: 16
//       max_num_seqs: 0
//       max_num_batched_tokens: 0
//       max_model_len: 0
//       enable_prefix_caching: true
//
// Relative paths are relative to the file's folder. Unknown keys are errors (a typo must not
// silently become a default).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace shardserve {

struct ModelSpec {
  std::string name;
  std::string checkpoint;
  std::string tokenizer;  // empty: the checkpoint folder
  std::string synthetic;  // instead of checkpoint: a preset name or a config.json path
};

struct GroupSpec {
  std::string name;
  std::string model;
  int tp_size = 1;
  std::string backend = "cpu";
  std::string dtype = "auto";
  std::string quantization = "none";
  int replicas = 1;
  bool process_per_rank = false;  // always true for cuda groups
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_bytes = 0;
  int64_t block_size = 16;
  int64_t max_num_seqs = 0;
  int64_t max_num_batched_tokens = 0;
  int64_t max_model_len = 0;
  bool enable_prefix_caching = true;
};

struct ClusterConfig {
  std::vector<ModelSpec> models;
  std::vector<GroupSpec> groups;

  const ModelSpec* find_model(const std::string& name) const;
  const GroupSpec* find_group(const std::string& name) const;
};

// INVALID_ARGUMENT naming the key for anything malformed; NOT_FOUND for a missing file.
absl::StatusOr<ClusterConfig> load_cluster_config(const std::string& path);
absl::StatusOr<ClusterConfig> parse_cluster_config(const std::string& yaml_text, const std::string& base_dir);

}  // namespace shardserve
