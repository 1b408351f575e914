// The coordinator's YAML cluster config from untrusted bytes: parse_cluster_config
// (load_cluster_config reads the file and calls it). A config is either INVALID_ARGUMENT with a
// message or one the coordinator can serve without checking again: at least one model and one
// group, unique names, every group's model listed, sizes and choices in range, paths resolved
// against the config's folder.
#include <cstdint>
#include <set>
#include <string>

#include "coordinator/config.h"
#include "tests/fuzz/fuzz_check.h"

using namespace shardserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = parse_cluster_config(text, "/etc/shardserve");
  if (!config.ok()) {
    FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument, "not INVALID_ARGUMENT");
    FUZZ_CHECK(!config.status().message().empty(), "an error without a message");
    return 0;
  }
  FUZZ_CHECK(!config->models.empty() && !config->groups.empty(), "no model or no group");
  std::set<std::string> models, groups;
  for (const ModelSpec& m : config->models) {
    FUZZ_CHECK(!m.name.empty() && models.insert(m.name).second, "an empty or repeated model name");
    FUZZ_CHECK(!m.checkpoint.empty() && m.checkpoint[0] == '/', "a checkpoint path not resolved");
    FUZZ_CHECK(m.tokenizer.empty() || m.tokenizer[0] == '/', "a tokenizer path not resolved");
  }
  for (const GroupSpec& g : config->groups) {
    FUZZ_CHECK(!g.name.empty() && g.name.find('/') == std::string::npos, "a bad group name");
    FUZZ_CHECK(groups.insert(g.name).second, "a repeated group name");
    FUZZ_CHECK(models.count(g.model) == 1, "a group of an unlisted model");
    FUZZ_CHECK(config->find_model(g.model) != nullptr && config->find_group(g.name) == &g, "lookup broken");
    FUZZ_CHECK(g.tp_size >= 1 && g.replicas >= 1 && g.block_size >= 1, "a size out of range");
    FUZZ_CHECK(g.backend == "cpu" || g.backend == "cuda", "a bad backend");
    FUZZ_CHECK(g.num_kv_blocks >= 0 && g.kv_cache_bytes >= 0 && g.max_num_seqs >= 0 &&
                   g.max_num_batched_tokens >= 0 && g.max_model_len >= 0,
               "a negative engine setting (0 means the worker's default)");
  }
  return 0;
}
