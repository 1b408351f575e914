#include "coordinator/config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

namespace fs = std::filesystem;

absl::Status bad(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cluster config: ", where, ": ", what));
}

std::string resolve(const std::string& path, const std::string& base_dir) {
  if (path.empty() || fs::path(path).is_absolute()) return path;
  return (fs::path(base_dir) / path).lexically_normal().string();
}

absl::Status check_keys(const YAML::Node& node, const std::string& where, const std::set<std::string>& allowed) {
  if (!node.IsMap()) return bad(where, "must be a mapping");
  for (const auto& kv : node) {
    if (!kv.first.IsScalar()) return bad(where, "a key is not a plain name");
    const std::string key = kv.first.as<std::string>();
    if (!allowed.count(key)) return bad(where, absl::StrCat("unknown key '", key, "'"));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status read(const YAML::Node& node, const char* key, const std::string& where, T& out) {
  if (!node[key]) return absl::OkStatus();
  try {
    out = node[key].as<T>();
  } catch (const YAML::Exception&) {
    return bad(where, absl::StrCat("'", key, "' has the wrong type"));
  }
  return absl::OkStatus();
}

}  // namespace

const ModelSpec* ClusterConfig::find_model(const std::string& name) const {
  for (const ModelSpec& m : models) if (m.name == name) return &m;
  return nullptr;
}

const GroupSpec* ClusterConfig::find_group(const std::string& name) const {
  for (const GroupSpec& g : groups) if (g.name == name) return &g;
  return nullptr;
}

absl::StatusOr<ClusterConfig> parse_cluster_config(const std::string& yaml_text, const std::string& base_dir) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cluster config: not valid YAML: ", e.what()));
  }
  if (auto st = check_keys(root, "top level", {"models", "groups"}); !st.ok()) return st;
  if (!root["models"] || !root["models"].IsSequence() || root["models"].size() == 0) {
    return bad("models", "needs a list of at least one model");
  }
  if (!root["groups"] || !root["groups"].IsSequence() || root["groups"].size() == 0) {
    return bad("groups", "needs a list of at least one group");
  }
  ClusterConfig config;
  for (size_t i = 0; i < root["models"].size(); ++i) {
    const YAML::Node n = root["models"][i];
    const std::string where = absl::StrCat("models[", i, "]");
    if (auto st = check_keys(n, where, {"name", "checkpoint", "tokenizer", "synthetic"}); !st.ok()) return st;
    ModelSpec m;
    if (auto st = read(n, "name", where, m.name); !st.ok()) return st;
    if (auto st = read(n, "checkpoint", where, m.checkpoint); !st.ok()) return st;
    if (auto st = read(n, "tokenizer", where, m.tokenizer); !st.ok()) return st;
    if (auto st = read(n, "synthetic", where, m.synthetic); !st.ok()) return st;
    if (m.name.empty()) return bad(where, "needs a name");
    if (m.checkpoint.empty() == m.synthetic.empty()) {
      return bad(where, "needs one of checkpoint (a model's files) and synthetic (a preset name or config.json)");
    }
    if (config.find_model(m.name)) return bad(where, absl::StrCat("model '", m.name, "' is listed twice"));
    m.checkpoint = resolve(m.checkpoint, base_dir);
    m.tokenizer = resolve(m.tokenizer, base_dir);
    // A config.json path (it has a '/' or ends in .json) is resolved like a checkpoint; anything
    // else is a preset's name, which the workers know (the coordinator holds no model code).
    if (m.synthetic.find('/') != std::string::npos || m.synthetic.ends_with(".json")) {
      m.synthetic = resolve(m.synthetic, base_dir);
    }
    config.models.push_back(std::move(m));
  }
  for (size_t i = 0; i < root["groups"].size(); ++i) {
    const YAML::Node n = root["groups"][i];
    const std::string where = absl::StrCat("groups[", i, "]");
    if (auto st = check_keys(n, where,
                             {"name", "model", "tp_size", "backend", "dtype", "quantization", "replicas",
                              "num_kv_blocks", "kv_cache_bytes", "block_size", "max_num_seqs",
                              "max_num_batched_tokens", "max_model_len", "enable_prefix_caching", "process_per_rank"});
        !st.ok()) {
      return st;
    }
    GroupSpec g;
    for (absl::Status st : {read(n, "name", where, g.name), read(n, "model", where, g.model),
                            read(n, "tp_size", where, g.tp_size), read(n, "backend", where, g.backend),
                            read(n, "dtype", where, g.dtype), read(n, "quantization", where, g.quantization),
                            read(n, "replicas", where, g.replicas), read(n, "num_kv_blocks", where, g.num_kv_blocks),
                            read(n, "kv_cache_bytes", where, g.kv_cache_bytes),
                            read(n, "block_size", where, g.block_size), read(n, "max_num_seqs", where, g.max_num_seqs),
                            read(n, "max_num_batched_tokens", where, g.max_num_batched_tokens),
                            read(n, "max_model_len", where, g.max_model_len),
                            read(n, "enable_prefix_caching", where, g.enable_prefix_caching),
                            read(n, "process_per_rank", where, g.process_per_rank)}) {
      if (!st.ok()) return st;
    }
    if (g.name.empty()) return bad(where, "needs a name");
    if (g.name.find('/') != std::string::npos) return bad(where, "a group name cannot contain '/'");
    if (config.find_group(g.name)) return bad(where, absl::StrCat("group '", g.name, "' is listed twice"));
    if (!config.find_model(g.model)) return bad(where, absl::StrCat("model '", g.model, "' is not in models"));
    if (g.tp_size < 1) return bad(where, "tp_size must be >= 1");
    if (g.replicas < 1) return bad(where, "replicas must be >= 1");
    if (g.backend != "cpu" && g.backend != "cuda") return bad(where, "backend must be cpu or cuda");
    if (g.backend == "cuda") g.process_per_rank = true;  // one GPU per process
    if (g.dtype != "auto" && g.dtype != "bfloat16" && g.dtype != "float16") {
      return bad(where, "dtype must be auto, bfloat16 or float16");
    }
    static const std::set<std::string> kQuant = {"none", "awq", "gptq", "int8", "fp8"};
    if (!kQuant.count(g.quantization)) return bad(where, "quantization must be none, awq, gptq, int8 or fp8");
    if (g.block_size < 1) return bad(where, "block_size must be >= 1");
    // 0 means the worker's default; a negative value must not silently mean it too.
    for (auto [key, value] : {std::pair{"num_kv_blocks", g.num_kv_blocks}, std::pair{"kv_cache_bytes", g.kv_cache_bytes},
                              std::pair{"max_num_seqs", g.max_num_seqs},
                              std::pair{"max_num_batched_tokens", g.max_num_batched_tokens},
                              std::pair{"max_model_len", g.max_model_len}}) {
      if (value < 0) return bad(where, absl::StrCat(key, " must be >= 0 (0: the worker's default), got ", value));
    }
    config.groups.push_back(std::move(g));
  }
  return config;
}

absl::StatusOr<ClusterConfig> load_cluster_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the cluster config ", path));
  std::stringstream text;
  text << in.rdbuf();
  return parse_cluster_config(text.str(), fs::absolute(path).parent_path().string());
}

}  // namespace shardserve
