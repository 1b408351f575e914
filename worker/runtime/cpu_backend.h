// CpuBackend: the reference implementation of every op. FP32 math in plain loops over the paged
// layout, so the CUDA kernels have an oracle and the whole system runs without a GPU.
// Only the matrix product is spread over threads; everything else is single-threaded and
// written for the reader. Quantized linear layers are dequantized exactly (LinearWeight's
// definition of W, one row at a time as the product needs it) and multiplied in FP32 like a
// dense layer, so a quantized checkpoint and its dequantized FP32 twin give the same bits.
#pragma once

#include "worker/runtime/backend.h"

namespace shardserve {

class CpuBackend final : public Backend {
 public:
  // num_threads 0 = one per hardware thread.
  explicit CpuBackend(int num_threads = 0);

  std::string name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::kF32; }

  Tensor empty(std::vector<int64_t> shape, DType dtype) override;
  Tensor upload(const HostTensor& src, DType dtype) override;
  std::vector<float> download_f32(const Tensor& src) override;
  void synchronize() override {}
  void copy_from_host(const void* src, Tensor& dst) override;
  void fill_uniform(Tensor& t, uint64_t seed, float scale) override;
  void fill_random_bits(Tensor& t, uint64_t seed) override;

  void embedding(const Tensor& ids, const Tensor& table, int64_t vocab_start,
                 Tensor& out) override;
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  void add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps,
                   Tensor& out) override;
  void linear(const Tensor& x, const LinearWeight& w, Tensor& out) override;
  void rope_and_store_kv(Tensor& qkv, int64_t num_q_heads, const Tensor& positions,
                         const Tensor& cos_sin, const Tensor& slot_mapping, KvLayer& cache) override;
  void attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache,
                 const AttentionMetadata& meta, float scale, Tensor& out) override;
  void silu_mul(const Tensor& gate_up, Tensor& out) override;
  void gather_rows(const Tensor& x, const Tensor& indices, Tensor& out) override;
  void join_column_shards(const Tensor& shards, int64_t num_shards, Tensor& out) override;

  // FP8 layers quantize their activations as the CUDA backend's W8A8 path does (backend.h,
  // kW8A8MinTokens) instead of computing the dequantized model on 32-bit activations.
  void emulate_w8a8(bool on) { emulate_w8a8_ = on; }

 private:
  int num_threads_;
  bool emulate_w8a8_ = false;
};

// Row n of W (LinearWeight's definition, any format) as FP32, for a weight in host memory.
void dequantize_row(const LinearWeight& w, int64_t n, float* out);
// All of W [N, K] as FP32.
std::vector<float> dequantize(const LinearWeight& w);

}  // namespace shardserve
