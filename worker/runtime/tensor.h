// Tensor: a typed, shaped view of memory that a Backend owns.
//
// Tensors are row-major and contiguous. `storage` keeps the allocation alive, so views made by
// slicing stay valid as long as any of them lives. Whether `data` points to host or device memory
// is the owning backend's business: model code never dereferences it, only backends do.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "worker/runtime/dtype.h"

namespace shardserve {

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::shared_ptr<void> storage;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(size_t i) const { return shape.at(i); }
  bool empty() const { return data == nullptr; }

  template <typename T>
  T* as() const { return static_cast<T*>(data); }

  // Rows [begin, end) along dimension 0, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const {
    Tensor t = *this;
    t.shape[0] = end - begin;
    t.data = static_cast<char*>(data) + begin * (nbytes() / static_cast<size_t>(shape[0]));
    return t;
  }
  // The same memory seen with another shape of equal element count.
  Tensor reshaped(std::vector<int64_t> new_shape) const {
    Tensor t = *this;
    t.shape = std::move(new_shape);
    return t;
  }
};

std::string shape_string(const std::vector<int64_t>& shape);

// Host memory that a Backend can upload from: a view of bytes with a dtype and a shape.
struct HostTensor {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

}  // namespace shardserve
