// CudaBackend: the Backend ops on one NVIDIA GPU. Kernels live in kernels/ (one per op);
// dense linear layers go through our GEMV at 1-2 tokens and cuBLASLt otherwise (BF16/FP16 in,
// FP32 accumulation), with the algorithm chosen once per shape and cached. Quantized layers run
// kernels/quant_gemm.cu's tensor-core kernel on 16-bit activations (INT4/INT8 repacked at load by
// prepare_linear, up to 128 tokens; FP8 read in place, 3-8 tokens on GPUs with FP8 tensor cores and
// up to 128 on the others), its configuration per shape measured at load; above, INT4/INT8 are
// dequantized into one shared buffer for cuBLASLt and FP8 runs W8A8 on cuBLASLt. FP8 at 1-2 tokens,
// and shapes the kernel does not take, use kernels/quant_linear.cu's GEMV up to 8 tokens.
//
// Memory: empty()/upload() are persistent allocations (weights, KV cache), counted in
// persistent_bytes(). scratch() comes from one arena that begin_step() rewinds, so the same step
// shape always gets the same addresses (CUDA graphs replay them). Until reserve_scratch() fixes
// the arena, scratch allocations are measured instead (measure mode): run a warm-up step at the
// largest batch, read scratch_peak_bytes(), then reserve that.
// All work is queued on one stream; a CUDA or cuBLAS error throws std::runtime_error naming the
// call (a worker cannot continue past a device error).
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "worker/runtime/backend.h"

namespace shardserve::kernels {
enum class QuantFormat : uint8_t;  // kernels/kernels.h
}

namespace shardserve {

struct GemmPlan;
struct GatedPlan;

// The kernels' name for a quantized weight format (kInt4, kInt8 or kFp8; not kDense).
kernels::QuantFormat quant_kernel_format(WeightFormat f);

// How a decode-sized 16-bit GEMM chooses between cuBLASLt and kernels/skinny_gemm.cu, from
// SHARDSERVE_SKINNY_GEMM (cuda_backend.cc says what each means).
enum class SkinnyGemmMode { kTune, kPrefer, kOff };
SkinnyGemmMode skinny_gemm_mode();

// Decode-step fusions, each on when its variable is "1" and off when "0" (cuda_backend.cc says
// what each does and what it defaults to): SHARDSERVE_EARLY_KV (the decode attention reads the
// cache before the kernel ahead of it ends), SHARDSERVE_FUSED_SILU (the gate/up projection
// applies SiLU-and-multiply itself), SHARDSERVE_FUSED_ROPE (the decode attention applies RoPE and
// stores the step's K/V itself).
bool early_kv_enabled();
bool fused_silu_enabled();
bool fused_rope_enabled();

class CudaBackend final : public Backend {
 public:
  // NOT_FOUND when no device is present.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> create(int device, DType activation_dtype);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  DType activation_dtype() const override { return dtype_; }

  Tensor empty(std::vector<int64_t> shape, DType dtype) override;
  Tensor upload(const HostTensor& src, DType dtype) override;
  std::vector<float> download_f32(const Tensor& src) override;
  void synchronize() override;
  Tensor scratch(std::vector<int64_t> shape, DType dtype) override;
  void begin_step() override;
  void copy_from_host(const void* src, Tensor& dst) override;
  void copy_from_host_2d(const void* src, size_t src_pitch, Tensor& dst, size_t dst_pitch, size_t row_bytes,
                         size_t rows) override;
  void fill_uniform(Tensor& t, uint64_t seed, float scale) override;
  void fill_random_bits(Tensor& t, uint64_t seed) override;
  bool supports_graphs() const override { return arena_ != nullptr; }
  std::shared_ptr<void> capture(const std::function<void()>& fn) override;
  void replay(const std::shared_ptr<void>& graph) override;

  bool supports_sampling() const override { return true; }
  void sample(Tensor& logits, const std::vector<SamplingRow>& rows, const std::vector<PenaltyEntry>& entries,
              SampledRows& out) override;

  void embedding(const Tensor& ids, const Tensor& table, int64_t vocab_start, Tensor& out) override;
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  void add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor& out) override;
  // INT4 and INT8 weights whose shapes the tensor-core kernels take (N % 16, K % 64, INT4 groups
  // of a multiple of 16, act-order whose groups can be made contiguous) are repacked into their
  // layout (kernels/quant_gemm.cu), in place of the canonical one: no extra memory once loaded.
  void prepare_linear(LinearWeight& w) override;
  void linear(const Tensor& x, const LinearWeight& w, Tensor& out) override;
  void rope_and_store_kv(Tensor& qkv, int64_t num_q_heads, const Tensor& positions, const Tensor& cos_sin,
                         const Tensor& slot_mapping, KvLayer& cache) override;
  void attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache, const AttentionMetadata& meta,
                 float scale, Tensor& out) override;
  void silu_mul(const Tensor& gate_up, Tensor& out) override;
  void linear_silu_mul(const Tensor& x, const LinearWeight& w, Tensor& gate_up, Tensor& out) override;
  void rope_store_attention(Tensor& qkv, int64_t num_q_heads, const Tensor& positions, const Tensor& cos_sin,
                            KvLayer& cache, const AttentionMetadata& meta, float scale, Tensor& out) override;
  void gather_rows(const Tensor& x, const Tensor& indices, Tensor& out) override;
  void join_column_shards(const Tensor& shards, int64_t num_shards, Tensor& out) override;

  // Linear layers with at most this many tokens use the decode GEMV, others cuBLASLt (0: never
  // the GEMV; for comparisons).
  void set_gemv_max_tokens(int64_t n) { gemv_max_tokens_ = n; }
  // The decode-step fusions of SHARDSERVE_EARLY_KV and SHARDSERVE_FUSED_SILU, for tests that run
  // both ways.
  void set_early_kv(bool on) { kv_before_wait_ = on; }
  void set_fused_silu(bool on) { fused_silu_ = on; }
  void set_fused_rope(bool on) { fused_rope_ = on; }
  // Fixes the scratch arena at `bytes` (leaving measure mode).
  void reserve_scratch(size_t bytes);
  size_t scratch_peak_bytes() const { return scratch_peak_; }
  size_t persistent_bytes() const { return persistent_bytes_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  void bind_thread() const override;
  // While the host waits for the stream (synchronize, downloads, uploads), `poll(waited)` is
  // called every ~50 us; a non-empty result ends the wait with CollectiveError(result). Set by a
  // communicator whose collectives run on this stream (see NcclCommunicator).
  using Watchdog = std::function<std::string(std::chrono::steady_clock::duration waited)>;
  void set_watchdog(Watchdog poll) { watchdog_ = std::move(poll); }
  int num_sms() const { return num_sms_; }
  std::string device_name() const { return device_name_; }


 private:
  // Whether linear() takes kernels/quant_gemm.cu's tensor-core kernel for this weight and step.
  bool runs_on_quant_mma(const LinearWeight& w, int64_t tokens, DType x) const;
  CudaBackend() = default;
  void wait_stream();
  GemmPlan& gemm_plan(int64_t m, int64_t n, int64_t k, DType ab, DType c, bool allow_missing = false);
  // out [T, N] = x [T, K] * W^T through cuBLASLt, W [N, K] of w_dtype (x the same, or E4M3 with W).
  void gemm(const void* w, DType w_dtype, const void* x, int64_t tokens, int64_t n, int64_t k, void* out,
            DType out_dtype);
  void tune_gemm(GemmPlan& plan, const void* w, const void* x, void* out, DType ab, DType c);
  // The load-time trials' timing at decode shapes: one call to warm up (INFINITY if it fails),
  // then the best of 5, each after `flush` (an L2's worth and more) is overwritten.
  float best_cold_ms(const std::function<bool()>& call, void* flush, size_t flush_bytes, cudaEvent_t start,
                     cudaEvent_t stop);
  // Decode-sized gate/up projections with SiLU-and-multiply in the skinny GEMM's epilogue
  // (SHARDSERVE_FUSED_SILU), per (tokens, F, K, dtype): timed at the first call outside a graph
  // capture against the GEMM then silu_mul, the fused kernel kept when it is faster.
  std::unordered_map<std::string, std::unique_ptr<GatedPlan>> gated_plans_;
  void tune_gated(GatedPlan& plan, const Tensor& x, const LinearWeight& w, Tensor& gate_up, Tensor& out);
  void add_split_k_variants(GemmPlan& plan, int64_t k);
  void quantized_gemm(const Tensor& x, const LinearWeight& w, int64_t tokens, Tensor& out);

  int device_ = 0;
  int num_sms_ = 0;
  std::string device_name_;
  DType dtype_ = DType::kBF16;
  cudaStream_t stream_ = nullptr;
  void* cublaslt_ = nullptr;  // cublasLtHandle_t
  void* gemm_workspace_ = nullptr;
  size_t gemm_workspace_bytes_ = 0;
  // One per (sequence, KV head) of a split decode attention (kernels.h AttentionParams), kept zero
  // between launches; in the workspace's allocation, past its end.
  static constexpr int64_t kSplitCounters = 65536;
  int32_t* split_counters_ = nullptr;
  // The decode-sized GEMM's, one per 64-output tile (kernels::kSkinnyGemmCounters), after those.
  int32_t* skinny_counters_ = nullptr;
  // The quantized layers' tiled kernel keeps its split-K partials and counters there too (one
  // layer at a time on the stream).
  kernels::QuantMmaWorkspace quant_workspace() const {
    return {static_cast<float*>(gemm_workspace_), gemm_workspace_bytes_, skinny_counters_};
  }
  std::unordered_map<std::string, std::unique_ptr<GemmPlan>> gemm_plans_;
  size_t persistent_bytes_ = 0;
  // Above 2 tokens the GEMV turns issue-bound (every weight is converted and multiplied per token
  // on CUDA cores) and cuBLASLt's tensor cores win; measured with engine_bench --micro.
  int64_t gemv_max_tokens_ = 2;
  bool kv_before_wait_ = early_kv_enabled();
  bool fused_silu_ = fused_silu_enabled();
  bool fused_rope_ = fused_rope_enabled();
  // attention(), and with positions and cos_sin (a decode step the kernel takes with RoPE fused)
  // rope_store_attention()'s fused form; false when the fused form does not apply (nothing run).
  bool run_attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache, const AttentionMetadata& meta,
                     float scale, Tensor& out, const Tensor* positions, const Tensor* cos_sin);
  bool fp8_tensor_cores_ = false;
  // Quantized layers at larger batches: the dequantized weight of the layer being multiplied.
  void* dequant_ = nullptr;
  size_t dequant_bytes_ = 0;
  Watchdog watchdog_;
  // The sampler's inputs and outputs (outside the arena: sampling runs after the step, never in a
  // graph), on the device and pinned on the host; both grow to the largest step seen.
  void* sample_dev_ = nullptr;
  void* sample_host_ = nullptr;
  size_t sample_bytes_ = 0;

  // Scratch arena (fixed) or measure mode (arena_ == nullptr).
  char* arena_ = nullptr;
  size_t arena_bytes_ = 0;
  size_t arena_used_ = 0;
  size_t scratch_peak_ = 0;
  std::vector<void*> measured_;  // measure mode: this step's scratch allocations
};

}  // namespace shardserve
