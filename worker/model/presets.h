// Model shapes by name, for synthetic weights (`--synthetic llama-3.1-70b`) and the memory
// planner: the published config.json values of each model, no files needed.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/config.h"

namespace shardserve {

// A preset name (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b) or a path to a config.json.
absl::StatusOr<ModelConfig> preset_or_config(const std::string& name_or_path);
std::vector<std::string> preset_names();

}  // namespace shardserve
