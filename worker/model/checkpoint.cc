#include "worker/model/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace shardserve {

namespace fs = std::filesystem;

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string& dir) {
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  ckpt->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";

  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    std::stringstream text;
    text << in.rdbuf();
    const auto index = nlohmann::json::parse(text.str(), nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": not a safetensors index (needs a \"weight_map\" object)"));
    }
    std::map<std::string, const SafetensorsFile*> by_file;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map entry '", name, "' is not a file name"));
      }
      const std::string file_name = file.get<std::string>();
      if (file_name.empty() || file_name.find('/') != std::string::npos || file_name == "..") {
        return absl::InvalidArgumentError(absl::StrCat(
            index_path.string(), ": weight_map entry '", name, "' names '", file_name,
            "', which is not a file in the checkpoint directory"));
      }
      auto it = by_file.find(file_name);
      if (it == by_file.end()) {
        auto opened = SafetensorsFile::open((fs::path(dir) / file_name).string());
        if (!opened.ok()) return opened.status();
        ckpt->files_.push_back(std::move(*opened));
        it = by_file.emplace(file_name, ckpt->files_.back().get()).first;
      }
      if (it->second->find(name) == nullptr) {
        return absl::NotFoundError(absl::StrCat(index_path.string(), " places tensor '", name,
                                                "' in ", it->second->path(), ", which does not hold it"));
      }
      ckpt->where_[name] = it->second;
    }
  } else if (fs::exists(single_path)) {
    auto opened = SafetensorsFile::open(single_path.string());
    if (!opened.ok()) return opened.status();
    ckpt->files_.push_back(std::move(*opened));
    for (const auto& [name, _] : ckpt->files_.back()->tensors()) ckpt->where_[name] = ckpt->files_.back().get();
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  return ckpt;
}

absl::StatusOr<TensorInfo> Checkpoint::info(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor '", name, "'"));
  }
  return *it->second->find(name);
}

absl::StatusOr<HostBuffer> Checkpoint::read(const std::string& name,
                                            const std::vector<int64_t>& expected_shape, int dim,
                                            int64_t begin, int64_t end) const {
  auto found = info(name);
  if (!found.ok()) return found.status();
  const SafetensorsFile& file = *where_.at(name);
  if (found->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        file.path(), ": tensor '", name, "' has shape ", shape_string(found->shape),
        " but the model config implies ", shape_string(expected_shape)));
  }
  HostBuffer out;
  out.dtype = found->dtype;
  out.shape = found->shape;
  if (dim < 0) {
    auto whole = file.view(name);
    if (!whole.ok()) return whole.status();
    const auto* p = static_cast<const uint8_t*>(whole->data);
    out.bytes.assign(p, p + (found->end - found->begin));
    return out;
  }
  if (dim >= static_cast<int>(out.shape.size())) {
    return absl::OutOfRangeError(absl::StrCat(file.path(), ": tensor '", name, "' has no dimension ", dim));
  }
  out.shape[dim] = end - begin;
  int64_t numel = 1;
  for (int64_t d : out.shape) numel *= d;
  out.bytes.resize(static_cast<size_t>(numel) * dtype_size(out.dtype));
  if (auto st = file.read_slice(name, dim, begin, end, out.bytes.data()); !st.ok()) return st;
  return out;
}

}  // namespace shardserve
