// Backend: the ops a Llama forward pass is made of, on one device.
//
// The model is written once against this interface; `CpuBackend` is the FP32 reference and the
// oracle for every CUDA kernel. Contracts shared by all backends:
// - Tensors are contiguous and row-major. T is the number of tokens in a step (all sequences'
//   query tokens concatenated), S the number of sequences, H the hidden size, D the head dim.
// - Ops write only `out` (and the tensors documented as in/out); inputs are never aliased with
//   outputs unless stated.
// - Paged KV cache: layer cache tensors are [num_blocks, block_size, num_kv_heads, D]. Token t is
//   stored at slot `slot_mapping[t]` = block * block_size + offset; sequence s reads block
//   `block_tables[s][i]` for its positions [i * block_size, (i + 1) * block_size).
#pragma once

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "worker/runtime/sampling_row.h"
#include "worker/runtime/synthetic_uniform.h"
#include "worker/runtime/tensor.h"

namespace shardserve {

// How a linear layer's weight is stored (worker/model/quantization.h says how each published
// checkpoint format becomes one of these).
enum class WeightFormat : uint8_t {
  kDense,  // 16/32-bit, the activation dtype
  kInt4,   // AWQ / GPTQ: 4-bit integers in groups along K, each group with a scale and a zero point
  kInt8,   // weight-only INT8, one scale per output channel
  kFp8,    // FP8 E4M3 (W8A8), one scale per output channel
};

// A linear layer's weight as the backend executes it: y[T, N] = x[T, K] * W^T with the logical
// W [N, K] (the Hugging Face layout). Whatever the format, every element of W is defined exactly,
// so the CPU backend (the oracle) computes with these values in FP32:
//   kDense: W = weight.
//   kInt4:  W[n, k] = (q(n, k) - zeros[n, g]) * scales[n, g], g = g_idx[k] (or k / group_size
//           when g_idx is empty), q(n, k) = (weight[n][k / 8] >> 4 * (k % 8)) & 0xF.
//   kInt8:  W[n, k] = weight[n, k] * scales[n].
//   kFp8:   W[n, k] = fp8(weight[n, k]) * scales[n]; input_scale, when present, is the static
//           scale the activations are quantized with (W8A8); empty means per-token dynamic
//           scales. The CPU reference is the dequantized model (16-bit activations), unless told
//           to quantize activations as the CUDA backend's W8A8 path does (kW8A8MinTokens).
// Invariants: K keeps the checkpoint's order (GPTQ act-order lives in g_idx, not in a
// permutation of the columns), so a tensor-parallel shard is rows of everything (column-parallel)
// or a K slice of weight and g_idx (row-parallel); with g_idx empty, K is a whole number of
// groups. Fused layers (q|k|v, gate|up) are their parts concatenated along N.
// On GPUs with FP8 tensor cores, an FP8 layer whose N and K are multiples of 16 runs as W8A8 for
// steps of at least this many tokens (fewer take the weight-only kernels on 16-bit activations):
// each token's activations are quantized to E4M3 with scale max|x| / 448 (or input_scale),
// saturating. The CPU backend reproduces it when asked (CpuBackend::emulate_w8a8), the oracle the
// GPU's FP8 is held to.
constexpr int64_t kW8A8MinTokens = 9;
inline bool fp8_runs_as_w8a8(int64_t tokens, int64_t n, int64_t k) {
  return tokens >= kW8A8MinTokens && n % 16 == 0 && k % 16 == 0;
}

struct LinearWeight {
  LinearWeight() = default;
  // A dense weight [N, K] (what every call site of the 16-bit model makes).
  LinearWeight(Tensor dense) : weight(std::move(dense)) {}  // NOLINT(google-explicit-constructor)

  WeightFormat format = WeightFormat::kDense;
  Tensor weight;  // kDense: [N, K] activation dtype; kInt8: I8 [N, K]; kFp8: F8E4M3 [N, K];
                  // kInt4: I32 [N, K / 8], input feature k in bits 4 * (k % 8) of word k / 8
  Tensor scales;  // kInt4: [N, num_groups] F16 (the checkpoint's) or F32; kInt8/kFp8: F32 [N]
  Tensor zeros;   // kInt4: U8 [N, num_groups], values 0..15 (symmetric formats store 8)
  Tensor g_idx;   // kInt4: I32 [K] group of each input feature, or empty: group = k / group_size
  int64_t group_size = 0;  // kInt4: input features per group (K when there is one group)
  Tensor input_scale;      // kFp8: F32 [1] static activation scale, or empty (dynamic per token)
  // Set by a backend's prepare_linear when it keeps the weight in a layout of its own (the CUDA
  // backend: kernels/quant_gemm.cu's tensor-core layout for INT4 and INT8). `weight` then holds
  // that layout (same dtype, shape and bytes), INT4 `scales` its U8 [num_groups, 3 N] scale and
  // zero-point pairs, `zeros` and `g_idx` are released and `mma_perm` (I32 [K]) is the input order
  // of an act-order weight. Only that backend reads such a weight.
  bool mma_layout = false;
  Tensor mma_perm;

  int64_t in_features() const { return format == WeightFormat::kInt4 ? weight.dim(1) * 8 : weight.dim(1); }
  int64_t out_features() const { return weight.dim(0); }
};

// The K and V cache of one layer.
struct KvLayer {
  Tensor k;  // [num_blocks, block_size, num_kv_heads, D]
  Tensor v;
};

// Where each query token sits and which cache blocks each sequence reads, for one step.
// Sequence s owns query tokens [query_start_loc[s], query_start_loc[s + 1]); after this step's
// cache write it has seq_lens[s] tokens in the cache, so its query tokens are positions
// [seq_lens[s] - q_len, seq_lens[s]) and attend causally to positions <= their own.
struct AttentionMetadata {
  int num_seqs = 0;
  int max_query_len = 0;
  int max_seq_len = 0;
  int block_size = 16;
  Tensor query_start_loc;  // I32 [S + 1]
  Tensor seq_lens;         // I32 [S]
  Tensor block_tables;     // I32 [S, max_blocks_per_seq], unused entries -1
  Tensor slot_mapping;     // I32 [T]
};

// A step that could not run for want of a resource the step itself sized (the scratch arena): the
// device is intact, nothing outside the step's own tokens was written, so the engine fails that
// step's requests and goes on. Any other exception from a step is fatal to the worker.
class StepError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // The dtype activations and the KV cache are kept in.
  virtual DType activation_dtype() const = 0;

  virtual Tensor empty(std::vector<int64_t> shape, DType dtype) = 0;
  // Copies host data to the device, converting to `dtype` (exact when widening).
  virtual Tensor upload(const HostTensor& src, DType dtype) = 0;
  // Copies a tensor to host memory as FP32.
  virtual std::vector<float> download_f32(const Tensor& src) = 0;
  // Waits until all queued work has finished.
  virtual void synchronize() = 0;
  // Makes this backend's device current on the calling thread; every thread that calls the
  // backend calls it first (a GPU's CUDA context is per thread). Nothing to do on the CPU.
  virtual void bind_thread() const {}
  // Step-scoped memory, valid until the next begin_step(): activations and per-step inputs. A
  // device backend hands it out from a fixed arena, so the same step shape gets the same
  // addresses (what CUDA graphs replay). Default: ordinary memory.
  virtual Tensor scratch(std::vector<int64_t> shape, DType dtype) { return empty(std::move(shape), dtype); }
  // Starts a forward step: scratch memory handed out before it may be reused.
  virtual void begin_step() {}
  // Copies dst.nbytes() bytes of host memory into dst (no conversion).
  virtual void copy_from_host(const void* src, Tensor& dst) = 0;
  // Copies `rows` rows of `row_bytes` bytes, `src_pitch` bytes apart on the host, into dst's
  // memory `dst_pitch` bytes apart (no conversion); the rest of dst is left as it was.
  virtual void copy_from_host_2d(const void* src, size_t src_pitch, Tensor& dst, size_t dst_pitch, size_t row_bytes,
                                 size_t rows) {
    for (size_t r = 0; r < rows; ++r) {
      Tensor row = dst;
      row.data = static_cast<char*>(dst.data) + r * dst_pitch;
      row.dtype = DType::kU8;
      row.shape = {static_cast<int64_t>(row_bytes)};
      copy_from_host(static_cast<const char*>(src) + r * src_pitch, row);
    }
  }
  // Step graphs (CUDA graphs where supported): capture() records the work `fn` queues without
  // running it; replay() runs it again on the same buffers. Only after supports_graphs() says
  // scratch addresses are fixed.
  virtual bool supports_graphs() const { return false; }
  virtual std::shared_ptr<void> capture(const std::function<void()>& fn) { (void)fn; return nullptr; }
  virtual void replay(const std::shared_ptr<void>& graph) { (void)graph; }
  // Sampling where the logits are (worker/engine/sampler.h's semantics): rows [0, rows.size()) of
  // FP32 logits [>= rows.size(), vocab], one SamplingRow each; penalties rewrite those rows.
  // Only token ids and the asked-for logprobs come back. supports_sampling() false: the caller
  // downloads the logits and samples on the host.
  virtual bool supports_sampling() const { return false; }
  virtual void sample(Tensor& logits, const std::vector<SamplingRow>& rows, const std::vector<PenaltyEntry>& entries,
                      SampledRows& out) {
    (void)logits, (void)rows, (void)entries, (void)out;
  }
  // Fills a floating tensor with values uniform in [-scale, scale) from (seed, element index):
  // synthetic weights, made where they live.
  virtual void fill_uniform(Tensor& t, uint64_t seed, float scale) = 0;
  // Fills t with pseudo-random bits: byte j is byte j % 4 (little-endian) of
  // synthetic_bits(seed, j / 4), whatever the dtype; for F8E4M3 bit 6 of every byte is then
  // cleared (exponent field <= 7: finite values of magnitude < 2, never NaN). Synthetic quantized
  // weights (packed INT4 words, INT8, FP8). Default: made on the host, then copy_from_host.
  virtual void fill_random_bits(Tensor& t, uint64_t seed) {
    std::vector<uint8_t> bytes(t.nbytes());
    synthetic_random_bytes(seed, t.dtype, bytes.data(), bytes.size());
    copy_from_host(bytes.data(), t);
  }

  // out[t] = table[ids[t] - vocab_start] when vocab_start <= ids[t] < vocab_start + rows(table),
  // zeros otherwise (a vocab-parallel shard; its partial rows are summed by an all-reduce).
  virtual void embedding(const Tensor& ids, const Tensor& table, int64_t vocab_start,
                         Tensor& out) = 0;
  // out = x / rms(x) * weight over the last dimension.
  virtual void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // In/out residual: residual += x, then out = rmsnorm(residual).
  virtual void add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps,
                           Tensor& out) = 0;
  // Called once per quantized weight after loading: the backend may rewrite it into the layout its
  // kernels read (LinearWeight::mma_layout). The values it stands for do not change.
  virtual void prepare_linear(LinearWeight& w) { (void)w; }
  // out[T, N] = x[T, K] * W^T; `out` may be FP32 even when activations are 16-bit (logits).
  virtual void linear(const Tensor& x, const LinearWeight& w, Tensor& out) = 0;
  // qkv [T, (Hq + 2 * Hkv) * D] is the fused projection: per token Hq query heads, then Hkv key
  // heads, then Hkv value heads. In place: rotate-half RoPE on the q and k heads with
  // cos_sin [max_pos, D] (first D/2 columns cos, last D/2 sin) at positions[t]; then writes the k
  // and v heads to the cache at slot_mapping[t] (slots < 0 are skipped: padding tokens).
  virtual void rope_and_store_kv(Tensor& qkv, int64_t num_q_heads, const Tensor& positions,
                                 const Tensor& cos_sin, const Tensor& slot_mapping,
                                 KvLayer& cache) = 0;
  // Causal attention of the query heads of qkv over the paged cache; query head h reads KV head
  // h / (Hq / Hkv). out: [T, Hq * D].
  virtual void attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache,
                         const AttentionMetadata& meta, float scale, Tensor& out) = 0;
  // rope_and_store_kv(qkv, num_q_heads, positions, cos_sin, meta.slot_mapping, cache) then
  // attention(qkv, ...): out and the cache exactly as the two leave them. A backend that does both
  // in one kernel (decode steps) may leave qkv unrotated: nothing reads it after.
  virtual void rope_store_attention(Tensor& qkv, int64_t num_q_heads, const Tensor& positions, const Tensor& cos_sin,
                                    KvLayer& cache, const AttentionMetadata& meta, float scale, Tensor& out) {
    rope_and_store_kv(qkv, num_q_heads, positions, cos_sin, meta.slot_mapping, cache);
    attention(qkv, num_q_heads, cache, meta, scale, out);
  }
  // gate_up [T, 2F] (gate first) -> out [T, F] = silu(gate) * up.
  virtual void silu_mul(const Tensor& gate_up, Tensor& out) = 0;
  // linear(x, w, gate_up) with a [gate; up] weight ([2F, K]), then silu_mul(gate_up, out): out
  // [T, F] exactly as the two give it. A backend with one kernel for both, for the shape, runs
  // that and leaves gate_up alone (it is the unfused path's buffer).
  virtual void linear_silu_mul(const Tensor& x, const LinearWeight& w, Tensor& gate_up, Tensor& out) {
    linear(x, w, gate_up);
    silu_mul(gate_up, out);
  }
  // out[i] = x[indices[i]] (rows).
  virtual void gather_rows(const Tensor& x, const Tensor& indices, Tensor& out) = 0;
  // shards [n * R, C] holds n blocks [R, C] one after another (what all_gather returns for n
  // ranks); out [R, n * C] sets them side by side: out[i, k * C + j] = shards[k * R + i, j].
  // Turns the gathered logits of a vocab-parallel LM head into full vocabulary rows. Any dtype
  // (a copy; shards and out share it).
  virtual void join_column_shards(const Tensor& shards, int64_t num_shards, Tensor& out) = 0;
};

}  // namespace shardserve
