// Host launchers of the CUDA kernels: raw device pointers, sizes and a stream, nothing else, so
// the CUDA backend (worker/runtime/cuda_backend) stays a thin adapter and each kernel can be tested
// against the CPU reference backend on its own (tests/gpu/kernels_test.cc).
//
// `dtype` is the activation type (BF16 or F16) of the tensors marked T; math is FP32 throughout.
// Every launcher returns the launch's cudaError_t (cudaGetLastError), checked by the caller.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "worker/runtime/dtype.h"
#include "worker/runtime/sampling_row.h"

namespace shardserve::kernels {

// out[t, :] = table[ids[t] - vocab_start, :] if in [0, rows), else 0. table, out: T.
cudaError_t embedding(const int32_t* ids, int64_t num_tokens, const void* table, int64_t rows, int64_t hidden,
                      int64_t vocab_start, void* out, DType dtype, cudaStream_t stream);

// residual (optional, in/out) += x; out = rmsnorm(residual or x) * weight. All T.
// Rounding follows Hugging Face's LlamaRMSNorm: normalise in FP32, round to T, multiply by weight.
cudaError_t rmsnorm(const void* x, void* residual, const void* weight, int64_t rows, int64_t hidden, float eps,
                    void* out, DType dtype, cudaStream_t stream);

// In place on qkv [T, (Hq + 2 Hkv) * D]: rotate-half RoPE on the q and k heads with cos_sin
// [max_pos, D] (F32: cos | sin) at positions[t]; writes k and v heads to the paged caches
// [num_blocks, block_size, Hkv, D] at slot_mapping[t] (skipped when < 0).
cudaError_t rope_and_store_kv(void* qkv, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, const int32_t* positions, const float* cos_sin,
                              const int32_t* slot_mapping, void* k_cache, void* v_cache, DType dtype,
                              cudaStream_t stream);

struct AttentionParams {
  const void* qkv = nullptr;  // [T, (Hq + 2 Hkv) * D]
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;        // [T, Hq * D]
  const int32_t* query_start_loc = nullptr;  // [S + 1]
  const int32_t* seq_lens = nullptr;         // [S]
  const int32_t* block_tables = nullptr;     // [S, max_blocks]
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  int64_t max_blocks = 0;
  float scale = 1.0f;
  // Flash-decoding: each (token, KV head) is split over this many CTAs along the context, then
  // combined. partials needs attention_workspace_bytes(...) bytes when num_splits > 1.
  int num_splits = 1;
  float* partials = nullptr;
  // With splits, the tensor-core decode kernel merges them itself when given one counter per
  // (sequence, KV head) ([num_seqs * num_kv_heads], zero, and left zero): the last of a pair's
  // splits to finish combines the partials, no combine kernel runs. Without, a combine kernel does.
  int32_t* split_counters = nullptr;
  // Every sequence has exactly one query token (num_tokens == num_seqs, query_start_loc[s] = s
  // rows apart by one): the decode kernel may run.
  bool decode_only = false;
  // Decode only: the caller promises that no kernel still running when this one is launched
  // writes the metadata (query_start_loc, seq_lens, block_tables) or any cached position but each
  // sequence's newest (seq_lens[s] - 1), as in a model's step, where only the RoPE/cache-store
  // kernel just before writes the step's own token. The tensor-core decode kernel then starts
  // reading the cache before it waits for that kernel (programmatic dependent launch).
  bool kv_before_wait = false;
  // Decode only (decode_rope_fusable): the step's RoPE and cache store done by the decode kernel
  // (rope_and_store_kv's arithmetic, bit for bit), with qkv as the projection wrote it, before
  // RoPE, and left so. Each CTA rotates its query rows; the one whose split holds a sequence's
  // newest position rotates that token's K, writes K and V to the caches at rope_slots[t] (not
  // when < 0) and uses them from registers. rope_positions [T], rope_cos_sin [max_pos, D] (F32:
  // cos | sin) as rope_and_store_kv takes them; null: no fusion.
  const int32_t* rope_positions = nullptr;
  const float* rope_cos_sin = nullptr;
  const int32_t* rope_slots = nullptr;
};
// Whether the tensor-core decode kernel takes this step with RoPE fused (16-bit, head_dim 64 or
// 128, GQA groups of 1, 2, 4 or 8, decode only, 16-byte aligned qkv and caches).
bool decode_rope_fusable(const AttentionParams& p, DType dtype);
size_t attention_workspace_bytes(int64_t num_tokens, int64_t num_q_heads, int64_t head_dim, int num_splits);
// Causal paged attention, GQA-aware: one CTA serves all query heads of a KV head, so each K/V
// block is read once per group.
cudaError_t paged_attention(const AttentionParams& p, DType dtype, cudaStream_t stream);
// Which kernel paged_attention runs for steps with prompt tokens on the current device, as
// benchmark records name it: "wgmma" (Hopper, sm_90a build), "mma.sync" or "cuda-core".
const char* prefill_attention_kernel(DType dtype, int64_t head_dim, int64_t group);

// Decode GEMV: y[T, N] = x[T, K] * W^T (W [N, K]) for T <= kMaxGemvTokens, x and W of the same
// 16-bit dtype, K a multiple of 8; y in that dtype or F32. Callers check gemv_supported().
constexpr int64_t kMaxGemvTokens = 8;
bool gemv_supported(int64_t tokens, int64_t k, DType weight, DType x);
cudaError_t gemv(const void* x, const void* w, int64_t tokens, int64_t n, int64_t k, void* y, DType dtype,
                 DType out_dtype, cudaStream_t stream);
// The gate/up GEMV with SiLU-and-multiply after it in one kernel: w is [gate; up] ([2f, K]) and
// y[T, f] = silu(x * W_gate^T) * (x * W_up^T), in dtype, bit for bit gemv() then silu_mul().
cudaError_t gemv_silu_mul(const void* x, const void* w, int64_t tokens, int64_t f, int64_t k, void* y, DType dtype,
                          cudaStream_t stream);

// Decode-sized GEMM on tensor cores (kernels/skinny_gemm.cu): y[T, N] = x[T, K] * W^T for T up to
// kMaxSkinnyGemmTokens, x and W of the same 16-bit dtype, y that dtype or F32, N and K multiples
// of 64. Split over K into about `ctas_per_sm` CTAs per SM, each keeping `stages` (4, 6, or 8 up
// to 64 tokens) tiles in flight; with more than one split the FP32 partials need `workspace`
// (splits x T x N floats) and `counters` (kSkinnyGemmCounters int32, zero before the first call;
// every call leaves them zero), and the last split of each tile sums them.
constexpr int64_t kMaxSkinnyGemmTokens = 128;
// The configurations (CTAs per SM, stages) the CUDA backend times against cuBLASLt per shape, the
// GPU test checks and the harness sweeps: the fastest differs by shape (on an H200, 2 x 8 at up
// to 32 tokens, 3 x 4 at 64, 4 x 8 for 70B's qkv).
struct SkinnyGemmConfig {
  int ctas_per_sm, stages;
};
inline constexpr SkinnyGemmConfig kSkinnyGemmConfigs[] = {{2, 4}, {2, 6}, {2, 8}, {3, 4}, {3, 6}, {4, 4}, {4, 8}};
constexpr int64_t kSkinnyGemmCounters = 4096;  // 64-output tiles: N up to 262,144 splits
struct SkinnyGemmShape {
  bool valid = false;  // false: a shape the kernel does not take
  int64_t tokens = 0, n = 0, k = 0;
  int64_t splits = 1, k_per_split = 0;
  int stages = 4;
};
SkinnyGemmShape skinny_gemm_shape(int64_t tokens, int64_t n, int64_t k, int num_sms, size_t workspace_bytes,
                                  int ctas_per_sm = 2, int stages = 4);
cudaError_t skinny_gemm(const SkinnyGemmShape& shape, const void* x, const void* w, void* y, DType dtype,
                        DType out_dtype, float* workspace, int32_t* counters, cudaStream_t stream);
// The same GEMM over a fused [gate; up] weight ([2F, K], `shape` made for N = 2F) with
// SiLU-and-multiply in its epilogue: y [T, F] in dtype, bit for bit skinny_gemm() then silu_mul().
cudaError_t skinny_gemm_silu_mul(const SkinnyGemmShape& shape, const void* x, const void* w, void* y, DType dtype,
                                 float* workspace, int32_t* counters, cudaStream_t stream);

// Quantized weights (worker/runtime/backend.h's LinearWeight, same definitions), as device
// pointers. kInt4: weight U32 [N, K/8] (feature k in bits 4 (k % 8) of word k / 8), scales [N, G]
// F16 or F32, zeros U8 [N, G], g_idx I32 [K] or null (group = k / group_size). kInt8 / kFp8:
// weight I8 / E4M3 [N, K], scales F32 [N].
enum class QuantFormat : uint8_t { kInt4, kInt8, kFp8 };
struct QuantWeightView {
  QuantFormat format = QuantFormat::kInt4;
  const void* weight = nullptr;
  const void* scales = nullptr;
  bool scales_f16 = false;
  const uint8_t* zeros = nullptr;
  const int32_t* g_idx = nullptr;
  int64_t group_size = 0;
  int64_t num_groups = 0;
  int64_t n = 0;
  int64_t k = 0;
};
// Decode GEMV on quantized weights, dequantizing in registers: y[T, N] = x[T, K] * W^T for
// T <= kMaxGemvTokens, x BF16/F16, y that dtype or F32. Activations stay 16-bit (also for FP8).
bool quant_gemv_supported(const QuantWeightView& w, int64_t tokens, DType x);
cudaError_t quant_gemv(const QuantWeightView& w, const void* x, int64_t tokens, void* y, DType dtype, DType out_dtype,
                       cudaStream_t stream);
// out [N, K] (dtype T) = the dequantized weight, for a 16-bit GEMM at larger batches. K % 8 == 0.
cudaError_t dequantize(const QuantWeightView& w, void* out, DType dtype, cudaStream_t stream);
// INT4, INT8 and FP8 weights on tensor cores for 1..kMaxQuantMmaTokens tokens, activations 16-bit
// (kernels/quant_gemm.cu says how): INT4/INT8 repacked once by quant_mma_repack from the canonical
// view above into `packed` (quant_mma_packed_bytes) and, for INT4, `scale_zero`
// (int4_mma_scale_zero_bytes), for one activation dtype; FP8 read in place (packed = the canonical
// E4M3 [N, K], scales its F32 [N]). Needs N % 16 == 0 and K % 64 == 0; INT4 a group size that is a multiple of
// 16. INT4 act-order: `perm` from int4_act_order_permutation (null when the groups are already
// contiguous), and the caller's buffer of tokens x K activations for quant_mma_gemm to permute x
// into.
constexpr int64_t kMaxQuantMmaTokens = 128;
struct QuantMmaView {
  QuantFormat format = QuantFormat::kInt4;
  const void* packed = nullptr;
  const void* scales = nullptr;  // INT4: the repacked scale_zero; INT8/FP8: the canonical F32 [N]
  const int32_t* perm = nullptr;
  int64_t n = 0;
  int64_t k = 0;
  int64_t group_size = 0;
  int64_t num_groups = 0;      // INT4: the canonical view's
  DType dtype = DType::kBF16;  // the activation type (INT4: the one the scales were repacked for)
};
// One compiled variant: token_tiles x 8 tokens at most, row_tiles x 16 rows per warp, warps_n
// warps of different rows and warps_k warps splitting K per CTA, depth 64-wide blocks in flight per
// warp, the activations read from global memory or staged in shared memory (stage_x), and the
// CTAs per SM its registers are capped for (min_blocks: __launch_bounds__'s second argument, 1 for
// no cap). N must be a multiple of 16 x row_tiles x warps_n.
// ctas_per_sm > 0 selects the tiled kernel instead (9..128 tokens; INT4 and INT8): CTAs of 4 warps
// of row_tiles x 16 rows, depth cp.async stages of weights and activations in shared memory, K
// split for about ctas_per_sm CTAs an SM where a workspace takes the partial sums (warps_n is then
// 4, warps_k 1, stage_x true, min_blocks 1).
struct QuantMmaConfig {
  int token_tiles = 1;
  int row_tiles = 1;
  int warps_n = 1;
  int warps_k = 8;
  int depth = 4;
  bool stage_x = false;
  int min_blocks = 1;
  int ctas_per_sm = 0;
};
// Where the tiled kernel's splits of K leave their FP32 partial sums (`bytes` of them: splits x
// tokens x N floats; fewer splits when it is smaller) and count themselves (kSkinnyGemmCounters
// int32, zero before the first call, every call leaves them zero). Without one, one split.
struct QuantMmaWorkspace {
  float* partials = nullptr;
  size_t bytes = 0;
  int32_t* counters = nullptr;
};
bool quant_mma_supported(const QuantWeightView& w, int64_t tokens, DType x);
size_t quant_mma_packed_bytes(QuantFormat format, int64_t n, int64_t k);
size_t int4_mma_scale_zero_bytes(int64_t n, int64_t num_groups);
// Host: the input order that makes each group's inputs contiguous (a stable sort by g_idx), or
// nullopt when the groups are not all group_size inputs in that order.
std::optional<std::vector<int32_t>> int4_act_order_permutation(std::span<const int32_t> g_idx, int64_t group_size);
cudaError_t quant_mma_repack(const QuantWeightView& w, const int32_t* perm, DType dtype, void* packed,
                             void* scale_zero, cudaStream_t stream);
// y [T, N] (out_dtype: the activation type or F32) = x [T, K] * W^T. config: null for
// quant_mma_choice's.
cudaError_t quant_mma_gemm(const QuantMmaView& w, const void* x, int64_t tokens, void* y, DType out_dtype,
                           void* x_permuted, cudaStream_t stream, const QuantMmaConfig* config = nullptr,
                           const QuantMmaWorkspace& workspace = {});
// out [N, K] (w.dtype, the checkpoint's input order) = the weight the kernel multiplies with: for
// steps of more than kMaxQuantMmaTokens, a 16-bit GEMM.
cudaError_t quant_mma_dequantize(const QuantMmaView& w, void* out, cudaStream_t stream);
int quant_mma_token_tiles(int64_t tokens);
// The configuration measured best on an H200 for this shape (a fallback when not tuned).
QuantMmaConfig quant_mma_config(int64_t tokens, int64_t n, int64_t k);
// Times every configuration on this GPU for the weight's shape at 8, 16, 32, 64 and 128 tokens
// (the weight flushed from the L2 before each run, as in a model's step) and remembers the fastest
// per GPU, format, activation type and shape, as cuBLASLt's tuning does; once per shape, with its
// own buffers (a few MB, freed), synchronizing `stream`; does nothing inside a graph capture. The
// tiled kernel's splits are timed with `workspace`: quant_mma_gemm gets the same one.
cudaError_t quant_mma_tune(const QuantMmaView& w, cudaStream_t stream, const QuantMmaWorkspace& workspace = {});
// The tuned configuration for `tokens` on this shape, else quant_mma_config's.
QuantMmaConfig quant_mma_choice(const QuantMmaView& w, int64_t tokens);
std::vector<QuantMmaConfig> quant_mma_configs();
// Whether `cfg` computes `tokens` tokens of an N-row weight of `format`: its token tiles cover
// them, its CTAs' rows divide N, and (the tiled kernel) the format is INT4 or INT8.
bool quant_mma_config_fits(const QuantMmaConfig& cfg, QuantFormat format, int64_t n, int64_t tokens);
// What quant_mma_tune times for `tokens` (the harness times the same): the configurations that fit
// with at most 4x the token tiles the tokens need (wider tiles share each activation among more
// rows and can win).
std::vector<QuantMmaConfig> quant_mma_candidates(QuantFormat format, int64_t n, int64_t tokens);

// FP8 activations for W8A8: per row of x [rows, K] (T), scale = max|x| / 448, or *static_scale when
// given; q = E4M3(x / scale), saturated to +-448; row_scales[r] = scale.
cudaError_t quantize_fp8_rows(const void* x, int64_t rows, int64_t k, const float* static_scale, uint8_t* q,
                              float* row_scales, DType dtype, cudaStream_t stream);
// out[r, c] = acc[r, c] * row_scales[r] * col_scales[c] (F32 in, T or F32 out): the FP8 GEMM's
// per-token x per-channel scaling.
cudaError_t scale_fp8_output(const float* acc, const float* row_scales, const float* col_scales, int64_t rows,
                             int64_t cols, void* out, DType out_dtype, cudaStream_t stream);

// Picks the next token of each of `rows` rows of FP32 logits [rows, vocab] with the CPU sampler's
// semantics (worker/engine/sampler.h; kernels/sampling.cu says where the two can differ):
// params[r] says how; penalties rewrite the row's logits in place (entries[params[r].penalty_begin ..
// penalty_end), saved_raw keeps the raw values, one float per entry). Writes tokens[r]; when
// params[r].num_logprobs >= 0 also logprobs[r] (the chosen token's, from the raw logits) and the top
// N into top_ids / top_logprobs [rows, kMaxSampledLogprobs]. All pointers are device memory.
cudaError_t sample_rows(float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
                        const PenaltyEntry* entries, float* saved_raw, int32_t* tokens, float* logprobs,
                        int32_t* top_ids, float* top_logprobs, cudaStream_t stream);

// gate_up [T, 2F] -> out [T, F] = silu(gate) * up. T.
cudaError_t silu_mul(const void* gate_up, int64_t rows, int64_t f, void* out, DType dtype, cudaStream_t stream);

// Row gather and the vocab-parallel logits reorder, for any element size.
cudaError_t gather_rows(const void* x, int64_t row_bytes, const int32_t* indices, int64_t n, void* out,
                        cudaStream_t stream);

// Random values, uniform in [-scale, scale), from a counter-based hash of (seed, index): the
// synthetic-weights generator. Also fills F32.
cudaError_t fill_uniform(void* out, int64_t n, uint64_t seed, float scale, DType dtype, cudaStream_t stream);

// Backend::fill_random_bits on the device: byte j = synthetic_random_byte(seed, j, fp8e4m3).
cudaError_t fill_random_bits(void* out, int64_t nbytes, uint64_t seed, bool fp8e4m3, cudaStream_t stream);

// One-shot all-reduce for tensor parallelism at decode sizes (kernels/all_reduce.cu): every rank
// copies its x into its own staging buffer, raises a flag in every peer's signal block, waits for
// the peers' flags, then reads all ranks' staging buffers (mapped into this process: CUDA IPC or
// peer access) and writes the sum, added in FP32 in rank order, so every rank gets the same bits.
// One launch, one barrier; safe in CUDA graphs (its counters live in device memory). Each rank's
// allocation is all_reduce_signal_bytes() of signal block (zeroed before any peer maps it) and
// then 2 x capacity bytes of staging (alternate calls use alternate halves, which is what makes
// one barrier a call enough). Every rank of the group calls it with the same n and dtype.
constexpr int kMaxAllReduceRanks = 8;
struct AllReducePeers {
  void* signals[kMaxAllReduceRanks] = {};  // rank r's signal block, as this process maps it
  void* buffers[kMaxAllReduceRanks] = {};  // rank r's staging buffer (2 x capacity bytes)
  int rank = 0;
  int world_size = 0;
  size_t capacity = 0;  // bytes of each half; a multiple of 16
  // A word of host-mapped memory: non-zero ends every wait (a peer is gone; the result is then
  // garbage and the group is aborted by its owner). Polled while a kernel waits.
  const volatile int32_t* abort_flag = nullptr;
};
size_t all_reduce_signal_bytes();
// Whether one_shot_all_reduce takes n elements of dtype (BF16, F16 or F32) in halves of capacity.
bool one_shot_all_reduce_supported(int64_t n, DType dtype, int world_size, size_t capacity);
// In place on this rank's x [n] (any alignment), on `stream`.
cudaError_t one_shot_all_reduce(const AllReducePeers& peers, void* x, int64_t n, DType dtype, cudaStream_t stream);

// Converts n F32 values to T (BF16/F16) or copies F32.
cudaError_t convert_from_f32(const float* in, int64_t n, void* out, DType dtype, cudaStream_t stream);

}  // namespace shardserve::kernels
