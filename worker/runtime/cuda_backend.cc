#include "worker/runtime/cuda_backend.h"

#include <cublasLt.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/kernels.h"
#include "worker/runtime/attention_splits.h"
#include "worker/runtime/communicator.h"

namespace shardserve {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLASLt error in ") + what + ": status " + std::to_string(static_cast<int>(s)));
  }
}

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    case DType::kF32: return CUDA_R_32F;
    case DType::kF8E4M3: return CUDA_R_8F_E4M3;
    default: throw std::logic_error("cuda backend: no cuBLAS type for " + std::string(dtype_name(d)));
  }
}

const int32_t* i32(const Tensor& t) { return static_cast<const int32_t*>(t.data); }

constexpr size_t kAlign = 256;
size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool missing = false;  // cuBLASLt has no algorithm (asked with allow_missing)
  // The heuristic's candidates, best first; the first call outside a graph capture times them on
  // the real operands and keeps the fastest (algo).
  std::vector<cublasLtMatmulAlgo_t> candidates;
  bool tuned = false;
  // Decode-sized 16-bit shapes: the project's split-K tensor-core GEMM (kernels/skinny_gemm.cu) in
  // a few configurations (CTAs per SM, stages in flight), the fastest used when the tuning finds
  // it faster than every cuBLASLt candidate.
  std::vector<kernels::SkinnyGemmShape> skinny_candidates;
  kernels::SkinnyGemmShape skinny;
  bool use_skinny = false;
  // Tokens <= 256: the weight is read from HBM in a model's step (the layers before it have
  // pushed it out of the L2), so the tuning times each call after flushing the L2.
  bool cold_weight = false;
  ~GemmPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::create(int device, DType activation_dtype) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return absl::NotFoundError("no CUDA device is available");
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", device, " does not exist (", count, " present)"));
  }
  if (activation_dtype != DType::kBF16 && activation_dtype != DType::kF16 && activation_dtype != DType::kF32) {
    return absl::InvalidArgumentError("the CUDA backend runs BF16, F16 or F32 (checking) activations");
  }
  auto b = std::unique_ptr<CudaBackend>(new CudaBackend());
  b->device_ = device;
  b->dtype_ = activation_dtype;
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  b->num_sms_ = prop.multiProcessorCount;
  b->fp8_tensor_cores_ = prop.major * 10 + prop.minor >= 89;  // Ada, Hopper and later
  b->device_name_ = prop.name;
  check(cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  cublasLtHandle_t handle;
  check(cublasLtCreate(&handle), "cublasLtCreate");
  b->cublaslt_ = handle;
  // One allocation: cuBLASLt's workspace, then the decode attention's and the decode-sized GEMM's
  // split counters (zero).
  b->gemm_workspace_bytes_ = size_t{32} << 20;
  constexpr int64_t kCounters = kSplitCounters + kernels::kSkinnyGemmCounters;
  check(cudaMalloc(&b->gemm_workspace_, b->gemm_workspace_bytes_ + kCounters * sizeof(int32_t)),
        "cudaMalloc(gemm workspace)");
  b->split_counters_ = reinterpret_cast<int32_t*>(static_cast<char*>(b->gemm_workspace_) + b->gemm_workspace_bytes_);
  b->skinny_counters_ = b->split_counters_ + kSplitCounters;
  check(cudaMemset(b->split_counters_, 0, kCounters * sizeof(int32_t)), "cudaMemset(split counters)");
  return b;
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  gemm_plans_.clear();
  for (void* p : measured_) cudaFree(p);
  if (dequant_) cudaFree(dequant_);
  if (sample_dev_) cudaFree(sample_dev_);
  if (sample_host_) cudaFreeHost(sample_host_);
  if (arena_) cudaFree(arena_);
  if (gemm_workspace_) cudaFree(gemm_workspace_);
  if (cublaslt_) cublasLtDestroy(static_cast<cublasLtHandle_t>(cublaslt_));
  if (stream_) cudaStreamDestroy(stream_);
}

Tensor CudaBackend::empty(std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  void* mem = nullptr;
  const size_t bytes = std::max<size_t>(t.nbytes(), 1);
  check(cudaMalloc(&mem, bytes), "cudaMalloc");
  persistent_bytes_ += bytes;
  t.storage = std::shared_ptr<void>(mem, [](void* p) { cudaFree(p); });
  t.data = mem;
  return t;
}

Tensor CudaBackend::scratch(std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const size_t bytes = aligned(std::max<size_t>(t.nbytes(), 1));
  if (arena_ == nullptr) {  // measure mode
    void* mem = nullptr;
    check(cudaMalloc(&mem, bytes), "cudaMalloc(scratch)");
    measured_.push_back(mem);
    t.data = mem;
  } else {
    if (arena_used_ + bytes > arena_bytes_) {
      throw StepError(absl::StrCat("scratch arena of ", arena_bytes_, " bytes exhausted: the step needs more than the ",
                                   "largest step the worker was sized for (max_num_batched_tokens, max_num_seqs)"));
    }
    t.data = arena_ + arena_used_;
  }
  arena_used_ += bytes;
  scratch_peak_ = std::max(scratch_peak_, arena_used_);
  return t;
}

void CudaBackend::begin_step() {
  if (!measured_.empty()) {
    wait_stream();
    for (void* p : measured_) cudaFree(p);
    measured_.clear();
  }
  arena_used_ = 0;
}

void CudaBackend::reserve_scratch(size_t bytes) {
  begin_step();
  if (arena_) cudaFree(arena_);
  arena_ = nullptr;
  void* mem = nullptr;
  check(cudaMalloc(&mem, bytes), "cudaMalloc(scratch arena)");
  arena_ = static_cast<char*>(mem);
  arena_bytes_ = bytes;
}

// Every copy goes on stream_ and is waited for: stream_ does not synchronise with the legacy
// default stream, and a pageable cudaMemcpy may return before its DMA has landed.
Tensor CudaBackend::upload(const HostTensor& src, DType dtype) {
  Tensor t = empty(src.shape, dtype);
  const auto n = static_cast<size_t>(src.numel());
  if (src.dtype == dtype) {
    check(cudaMemcpyAsync(t.data, src.data, n * dtype_size(dtype), cudaMemcpyHostToDevice, stream_), "cudaMemcpy(upload)");
    wait_stream();
    return t;
  }
  // Widen to F32 on the host (exact), then round on the device.
  std::vector<float> f32(n);
  convert_to_f32(src.data, src.dtype, n, f32.data());
  if (dtype == DType::kF32) {
    check(cudaMemcpyAsync(t.data, f32.data(), n * 4, cudaMemcpyHostToDevice, stream_), "cudaMemcpy(upload)");
    wait_stream();
    return t;
  }
  void* staging = nullptr;
  check(cudaMalloc(&staging, n * 4), "cudaMalloc(staging)");
  check(cudaMemcpyAsync(staging, f32.data(), n * 4, cudaMemcpyHostToDevice, stream_), "cudaMemcpy(upload)");
  check(kernels::convert_from_f32(static_cast<float*>(staging), static_cast<int64_t>(n), t.data, dtype, stream_), "convert_from_f32");
  wait_stream();
  cudaFree(staging);
  return t;
}

std::vector<float> CudaBackend::download_f32(const Tensor& src) {
  std::vector<float> out(static_cast<size_t>(src.numel()));
  if (src.dtype == DType::kF32) {  // logits: straight into the result
    check(cudaMemcpyAsync(out.data(), src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_), "cudaMemcpy(download)");
    wait_stream();
    return out;
  }
  std::vector<uint8_t> raw(src.nbytes());
  check(cudaMemcpyAsync(raw.data(), src.data, raw.size(), cudaMemcpyDeviceToHost, stream_), "cudaMemcpy(download)");
  wait_stream();
  convert_to_f32(raw.data(), src.dtype, out.size(), out.data());
  return out;
}

void CudaBackend::synchronize() { wait_stream(); }

void CudaBackend::bind_thread() const { check(cudaSetDevice(device_), "cudaSetDevice"); }

void CudaBackend::wait_stream() {
  if (!watchdog_) {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return;
  }
  // Poll instead of blocking, so a collective whose peer is lost or stuck becomes an error. The
  // first 200 us spin (a decode step's tail); after that, sleeping 50 us between polls costs
  // nothing measurable and frees the core.
  const auto start = std::chrono::steady_clock::now();
  while (true) {
    const cudaError_t st = cudaStreamQuery(stream_);
    if (st == cudaSuccess) return;
    if (st != cudaErrorNotReady) check(st, "cudaStreamQuery");
    const auto waited = std::chrono::steady_clock::now() - start;
    if (std::string reason = watchdog_(waited); !reason.empty()) throw CollectiveError(reason);
    if (waited > std::chrono::microseconds(200)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void CudaBackend::copy_from_host(const void* src, Tensor& dst) {
  check(cudaMemcpyAsync(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice, stream_), "cudaMemcpy(copy_from_host)");
}

void CudaBackend::copy_from_host_2d(const void* src, size_t src_pitch, Tensor& dst, size_t dst_pitch, size_t row_bytes,
                                    size_t rows) {
  if (rows == 0 || row_bytes == 0) return;
  check(cudaMemcpy2DAsync(dst.data, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpy2D(copy_from_host_2d)");
}

void CudaBackend::fill_uniform(Tensor& t, uint64_t seed, float scale) {
  check(kernels::fill_uniform(t.data, t.numel(), seed, scale, t.dtype, stream_), "fill_uniform");
}

void CudaBackend::fill_random_bits(Tensor& t, uint64_t seed) {
  check(kernels::fill_random_bits(t.data, static_cast<int64_t>(t.nbytes()), seed, t.dtype == DType::kF8E4M3, stream_),
        "fill_random_bits");
}

void CudaBackend::embedding(const Tensor& ids, const Tensor& table, int64_t vocab_start, Tensor& out) {
  check(kernels::embedding(i32(ids), ids.numel(), table.data, table.dim(0), table.dim(1), vocab_start, out.data,
                           table.dtype, stream_), "embedding");
}

void CudaBackend::rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  const int64_t hidden = weight.numel();
  check(kernels::rmsnorm(x.data, nullptr, weight.data, x.numel() / hidden, hidden, eps, out.data, x.dtype, stream_), "rmsnorm");
}

void CudaBackend::add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor& out) {
  const int64_t hidden = weight.numel();
  check(kernels::rmsnorm(x.data, residual.data, weight.data, x.numel() / hidden, hidden, eps, out.data, x.dtype,
                         stream_), "add_rmsnorm");
}

// Each of the plan's candidates that can split K, also at 2 to 16 splits (at least 256 of K each),
// where cuBLASLt accepts the configuration within the workspace; tune_gemm keeps the fastest.
void CudaBackend::add_split_k_variants(GemmPlan& plan, int64_t k) {
  const size_t base = plan.candidates.size();
  for (size_t i = 0; i < base; ++i) {
    const cublasLtMatmulAlgo_t algo = plan.candidates[i];
    int32_t support = 0, current = 1;
    uint32_t schemes = 0;
    size_t written = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &support, sizeof(support),
                                          &written) != CUBLAS_STATUS_SUCCESS ||
        support == 0 ||
        cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes),
                                          &written) != CUBLAS_STATUS_SUCCESS) {
      continue;
    }
    cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &current, sizeof(current), &written);
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    for (const uint32_t s : {uint32_t{CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE}, uint32_t{CUBLASLT_REDUCTION_SCHEME_INPLACE},
                             uint32_t{CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE}}) {
      if ((schemes & s) != 0) {
        scheme = s;
        break;
      }
    }
    if (scheme == CUBLASLT_REDUCTION_SCHEME_NONE) continue;
    for (const int32_t splits : {2, 4, 8, 16}) {
      if (splits == current || k / splits < 256) continue;
      cublasLtMatmulAlgo_t v = algo;
      cublasLtMatmulHeuristicResult_t checked{};
      if (cublasLtMatmulAlgoConfigSetAttribute(&v, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits)) ==
              CUBLAS_STATUS_SUCCESS &&
          cublasLtMatmulAlgoConfigSetAttribute(&v, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) ==
              CUBLAS_STATUS_SUCCESS &&
          cublasLtMatmulAlgoCheck(static_cast<cublasLtHandle_t>(cublaslt_), plan.desc, plan.a, plan.b, plan.c, plan.c,
                                  &v, &checked) == CUBLAS_STATUS_SUCCESS &&
          checked.workspaceSize <= gemm_workspace_bytes_) {
        plan.candidates.push_back(v);
      }
    }
  }
}

GemmPlan& CudaBackend::gemm_plan(int64_t m, int64_t n, int64_t k, DType ab, DType c, bool allow_missing) {
  const std::string key = absl::StrCat(m, "x", n, "x", k, ":", static_cast<int>(ab), ":", static_cast<int>(c));
  auto it = gemm_plans_.find(key);
  if (it != gemm_plans_.end()) return *it->second;
  auto plan = std::make_unique<GemmPlan>();
  check(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t trans = CUBLAS_OP_T;
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), "TRANSA");
  // Column-major view: W [N, K] row-major is K x N (ld K), used transposed; x [T, K] is K x T;
  // y [T, N] is N x T. So y^T = W x^T with m = N, n = T, k = K.
  check(cublasLtMatrixLayoutCreate(&plan->a, cuda_type(ab), k, m, k), "layout A");
  check(cublasLtMatrixLayoutCreate(&plan->b, cuda_type(ab), k, n, k), "layout B");
  check(cublasLtMatrixLayoutCreate(&plan->c, cuda_type(c), m, n, m), "layout C");
  cublasLtMatmulPreference_t pref;
  check(cublasLtMatmulPreferenceCreate(&pref), "preference");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &gemm_workspace_bytes_,
                                             sizeof(gemm_workspace_bytes_)), "preference workspace");
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates]{};
  int found = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(cublaslt_), plan->desc, plan->a,
                                                          plan->b, plan->c, plan->c, pref, kCandidates, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED && allow_missing) found = 0;  // no kernel for these types here
  else check(s, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) {
    if (!allow_missing) throw std::runtime_error("cuBLASLt has no algorithm for " + key);
    plan->missing = true;
  }
  plan->algo = results[0].algo;
  for (int i = 0; i < found; ++i) {
    if (results[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates.push_back(results[i].algo);
  }
  if ((ab == DType::kBF16 || ab == DType::kF16) && (c == ab || c == DType::kF32)) {
    // CTAs an SM x stages in flight (kernels.h's list: the fastest differs by shape).
    if (skinny_gemm_mode() != SkinnyGemmMode::kOff) {
      for (const kernels::SkinnyGemmConfig& cfg : kernels::kSkinnyGemmConfigs) {
        const kernels::SkinnyGemmShape s =
            kernels::skinny_gemm_shape(n, m, k, num_sms_, gemm_workspace_bytes_, cfg.ctas_per_sm, cfg.stages);
        if (s.valid) plan->skinny_candidates.push_back(s);
      }
    }
  }
  // Decode shapes (a few hundred tokens at most against a large weight): N / tile CTAs do not
  // fill the GPU (4096 outputs in 128-wide tiles are 32 CTAs on 132 SMs), and the heuristic's
  // answers rarely split K far enough.
  if (n <= 256) add_split_k_variants(*plan, k);
  plan->cold_weight = n <= 256;
  return *gemm_plans_.emplace(key, std::move(plan)).first->second;
}

// SHARDSERVE_SKINNY_GEMM: "off" leaves decode-sized 16-bit GEMMs to cuBLASLt, "prefer" takes the
// project's skinny GEMM when it is within 10% of cuBLASLt's best, anything else (the default)
// when it is faster.
SkinnyGemmMode skinny_gemm_mode() {
  static const SkinnyGemmMode mode = [] {
    const char* env = std::getenv("SHARDSERVE_SKINNY_GEMM");
    if (env != nullptr && std::strcmp(env, "off") == 0) return SkinnyGemmMode::kOff;
    if (env != nullptr && std::strcmp(env, "prefer") == 0) return SkinnyGemmMode::kPrefer;
    return SkinnyGemmMode::kTune;
  }();
  return mode;
}

namespace {
bool env_flag(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr) return fallback;
  if (std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  return fallback;
}
}  // namespace

// SHARDSERVE_EARLY_KV: a decode step's attention issues its first K/V tiles (every position but
// each sequence's newest) before it waits for the RoPE/cache-store kernel ahead of it, so the
// cache read starts under that kernel (AttentionParams::kv_before_wait). On by default (=0 turns
// it off): on an H100, engine_bench batch 32 at context 512 4,345 -> 4,402 tok/s with it alone.
bool early_kv_enabled() {
  static const bool on = env_flag("SHARDSERVE_EARLY_KV", true);
  return on;
}

// SHARDSERVE_FUSED_ROPE: a decode step's attention (the tensor-core decode kernel's shapes) applies
// RoPE to its query rows and to the step's K, and stores K and V in the cache itself
// (AttentionParams::rope_cos_sin, rope_and_store_kv's arithmetic): one kernel a layer less. On by
// default (=0 turns it off): alone it moved batch 32 by -0.3% on an H100 (noise), with the other
// two it adds to their gain (all three: 4,345 -> 4,443 tok/s).
bool fused_rope_enabled() {
  static const bool on = env_flag("SHARDSERVE_FUSED_ROPE", true);
  return on;
}

// SHARDSERVE_FUSED_SILU: at GEMV sizes (up to gemv_max_tokens_ tokens, 16-bit weights) the gate/up
// projection writes silu(gate) * up itself (kernels::gemv_silu_mul, bit for bit the GEMV and
// silu_mul's result): one kernel and one round trip of the gate/up activations less per layer.
// On by default (=0 turns it off): batch 32 4,345 -> 4,363 tok/s alone on an H100.
bool fused_silu_enabled() {
  static const bool on = env_flag("SHARDSERVE_FUSED_SILU", true);
  return on;
}

kernels::QuantFormat quant_kernel_format(WeightFormat f) {
  return f == WeightFormat::kInt4 ? kernels::QuantFormat::kInt4
         : f == WeightFormat::kInt8 ? kernels::QuantFormat::kInt8
                                    : kernels::QuantFormat::kFp8;
}

namespace {

kernels::QuantWeightView quant_view(const LinearWeight& w) {
  kernels::QuantWeightView v;
  v.format = quant_kernel_format(w.format);
  v.weight = w.weight.data;
  v.scales = w.scales.data;
  v.scales_f16 = w.scales.dtype == DType::kF16;
  v.n = w.out_features();
  v.k = w.in_features();
  if (w.format == WeightFormat::kInt4) {
    v.zeros = static_cast<const uint8_t*>(w.zeros.data);
    v.g_idx = w.g_idx.empty() ? nullptr : static_cast<const int32_t*>(w.g_idx.data);
    v.group_size = w.group_size;
    v.num_groups = w.scales.dim(1);
  }
  return v;
}

kernels::QuantMmaView mma_view(const LinearWeight& w, DType activations) {
  kernels::QuantMmaView v;
  v.format = quant_kernel_format(w.format);
  v.packed = w.weight.data;
  v.scales = w.scales.data;
  v.perm = w.mma_perm.empty() ? nullptr : w.mma_perm.as<int32_t>();
  v.n = w.out_features();
  v.k = w.in_features();
  v.group_size = w.group_size;
  v.num_groups = w.format == WeightFormat::kInt4 ? w.scales.dim(0) : 0;
  v.dtype = activations;
  return v;
}

}  // namespace

void CudaBackend::prepare_linear(LinearWeight& w) {
  const DType act = activation_dtype();
  if (act != DType::kBF16 && act != DType::kF16) return;  // FP32 activations: the canonical kernels
  if (w.format == WeightFormat::kFp8) {
    // Read in place by the tensor-core kernel (no repack) where it runs: only its configurations
    // to measure.
    if (kernels::quant_mma_supported(quant_view(w), 1, act)) {
      check(kernels::quant_mma_tune(mma_view(w, act), stream_, quant_workspace()), "quant_mma_tune");
    }
    return;
  }
  if (w.mma_layout || (w.format != WeightFormat::kInt4 && w.format != WeightFormat::kInt8)) return;
  const kernels::QuantWeightView v = quant_view(w);
  if (!kernels::quant_mma_supported(v, 1, act)) return;
  const bool int4 = w.format == WeightFormat::kInt4;
  Tensor perm;
  if (int4 && !w.g_idx.empty()) {
    std::vector<int32_t> g_idx(static_cast<size_t>(v.k));
    check(cudaMemcpyAsync(g_idx.data(), w.g_idx.data, g_idx.size() * 4, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpy(g_idx)");
    wait_stream();
    const auto order = kernels::int4_act_order_permutation(g_idx, w.group_size);
    if (!order) return;  // groups that are not group_size inputs each: the canonical kernels
    bool identity = true;
    for (size_t p = 0; p < order->size() && identity; ++p) identity = (*order)[p] == static_cast<int32_t>(p);
    if (!identity) perm = upload(HostTensor{order->data(), DType::kI32, {v.k}}, DType::kI32);
  }
  Tensor packed = empty(w.weight.shape, w.weight.dtype);
  Tensor scale_zero;
  if (int4) scale_zero = empty({v.num_groups, 3 * v.n}, DType::kU8);
  check(kernels::quant_mma_repack(v, perm.empty() ? nullptr : perm.as<int32_t>(), act, packed.data,
                                  int4 ? scale_zero.data : nullptr, stream_), "quant_mma_repack");
  wait_stream();
  // The canonical tensors are freed with their last reference, here.
  size_t released = w.weight.nbytes();
  w.weight = std::move(packed);
  if (int4) {
    released += w.scales.nbytes() + w.zeros.nbytes() + w.g_idx.nbytes();
    w.scales = std::move(scale_zero);
    w.zeros = Tensor();
    w.g_idx = Tensor();
  }
  persistent_bytes_ -= std::min(released, persistent_bytes_);
  w.mma_perm = std::move(perm);
  w.mma_layout = true;
  // The fastest configuration per token bucket on this GPU, once per shape (a model has 4-5).
  check(kernels::quant_mma_tune(mma_view(w, act), stream_, quant_workspace()), "quant_mma_tune");
}

// cuBLASLt's first heuristic answer is often not its fastest kernel for decode shapes (a few
// tokens against a large weight), where the choice of split-K decides whether the GPU is filled.
// Each candidate runs on the real operands (the output is rewritten by the caller's own call right
// after), once to warm up and then 8 times back to back, and the fastest is kept for this shape;
// at decode shapes instead 5 single calls, each after the L2 is flushed, the best of them (back to
// back, a weight that fits the L2, such as Llama-3.1-8B's qkv and o, is timed from it, not from HBM
// as in the model's step). Close candidates can still swap between loads: on an H200, 8B gate_up
// at 32 tokens took the skinny GEMM (66.5 us a call in the step) in one run, cuBLASLt (60.6 us)
// in another, with 3 calls each. For decode-sized 16-bit shapes the project's skinny GEMM runs the
// same trial in each of its configurations, the fastest kept when it beats every cuBLASLt
// candidate. Skipped inside a graph capture (the heuristic's first then stays; ModelRunner's first
// run of a shape is never captured).
void CudaBackend::tune_gemm(GemmPlan& plan, const void* w, const void* x, void* out, DType ab, DType c) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream_, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone) return;
  plan.tuned = true;
  if (plan.candidates.size() < 2 && plan.skinny_candidates.empty()) return;
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  // One warm-up call (which must succeed), then back-to-back calls between the events, so that the
  // GPU time and not the host's per-call cost (several microseconds, as long as a decode-sized
  // GEMM) is what is compared. INFINITY when a call fails.
  constexpr int kCalls = 8;
  void* flush = nullptr;
  size_t flush_bytes = 0;
  if (plan.cold_weight) {
    int l2 = 0;
    check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device_), "cudaDeviceGetAttribute(L2)");
    flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
    if (cudaMalloc(&flush, flush_bytes) != cudaSuccess) {
      cudaGetLastError();
      flush = nullptr;  // no room: timed back to back
    }
  }
  auto time_calls = [&](const std::function<bool()>& call) {
    if (flush != nullptr) return best_cold_ms(call, flush, flush_bytes, start, stop);
    if (!call()) return INFINITY;
    check(cudaEventRecord(start, stream_), "cudaEventRecord");
    bool ok = true;
    for (int i = 0; i < kCalls && ok; ++i) ok = call();
    check(cudaEventRecord(stop, stream_), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0.0f;
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    return ok ? t : INFINITY;
  };
  const float alpha = 1.0f, beta = 0.0f;
  float best = INFINITY;
  for (const cublasLtMatmulAlgo_t& algo : plan.candidates) {
    const float t = time_calls([&] {
      return cublasLtMatmul(static_cast<cublasLtHandle_t>(cublaslt_), plan.desc, &alpha, w, plan.a, x, plan.b, &beta,
                            out, plan.c, out, plan.c, &algo, gemm_workspace_, gemm_workspace_bytes_, stream_) ==
             CUBLAS_STATUS_SUCCESS;
    });
    if (t < best) {
      best = t;
      plan.algo = algo;
    }
  }
  float best_skinny = INFINITY;
  for (const kernels::SkinnyGemmShape& s : plan.skinny_candidates) {
    const float t = time_calls([&] {
      return kernels::skinny_gemm(s, x, w, out, ab, c, static_cast<float*>(gemm_workspace_), skinny_counters_,
                                  stream_) == cudaSuccess;
    });
    cudaGetLastError();  // a failed launch leaves cuBLASLt in charge, not a sticky error
    if (t < best_skinny) {
      best_skinny = t;
      plan.skinny = s;
    }
  }
  // kPrefer: within 10% of cuBLASLt is enough (the skinny GEMM reads its weights before the
  // kernel ahead of it finishes, which single timed calls cannot show).
  const float margin = skinny_gemm_mode() == SkinnyGemmMode::kPrefer ? 1.1f : 1.0f;
  plan.use_skinny = std::isfinite(best_skinny) && best_skinny < best * margin;
  if (flush != nullptr) cudaFree(flush);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

float CudaBackend::best_cold_ms(const std::function<bool()>& call, void* flush, size_t flush_bytes, cudaEvent_t start,
                               cudaEvent_t stop) {
  if (!call()) return INFINITY;
  float best = INFINITY;
  for (int rep = 0; rep < 5; ++rep) {
    check(cudaMemsetAsync(flush, rep, flush_bytes, stream_), "cudaMemsetAsync(L2 flush)");
    check(cudaEventRecord(start, stream_), "cudaEventRecord");
    const bool ok = call();
    check(cudaEventRecord(stop, stream_), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0.0f;
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    if (!ok) return INFINITY;
    best = std::min(best, t);
  }
  return best;
}

void CudaBackend::gemm(const void* w, DType w_dtype, const void* x, int64_t tokens, int64_t n, int64_t k, void* out,
                       DType out_dtype) {
  GemmPlan& plan = gemm_plan(n, tokens, k, w_dtype, out_dtype);
  const float alpha = 1.0f;
  const float beta = 0.0f;
  if (!plan.tuned) tune_gemm(plan, w, x, out, w_dtype, out_dtype);
  if (plan.use_skinny) {
    check(kernels::skinny_gemm(plan.skinny, x, w, out, w_dtype, out_dtype, static_cast<float*>(gemm_workspace_),
                               skinny_counters_, stream_),
          "skinny_gemm");
    return;
  }
  check(cublasLtMatmul(static_cast<cublasLtHandle_t>(cublaslt_), plan.desc, &alpha, w, plan.a, x, plan.b, &beta, out,
                       plan.c, out, plan.c, &plan.algo, gemm_workspace_, gemm_workspace_bytes_, stream_),
        "cublasLtMatmul");
}

// Larger batches on quantized weights. FP8 where the GPU has FP8 tensor cores: W8A8, the
// activations quantized per token (or with the layer's static scale), an FP32 product, then
// both scales. Otherwise the weight is expanded to the activation type in one buffer that every
// layer reuses in turn (the largest layer's size, allocated by the warm-up step that the memory
// plan measures, never during a graph capture) and multiplied by cuBLASLt: one extra pass over
// the weight per step, small beside a prefill's arithmetic.
static_assert(kW8A8MinTokens == kernels::kMaxGemvTokens + 1, "W8A8 takes the steps the quantized GEMV does not");

void CudaBackend::quantized_gemm(const Tensor& x, const LinearWeight& w, int64_t tokens, Tensor& out) {
  const kernels::QuantWeightView v = quant_view(w);
  if (w.format == WeightFormat::kFp8 && fp8_tensor_cores_ && x.dtype != DType::kF32 &&
      fp8_runs_as_w8a8(tokens, v.n, v.k)) {
    GemmPlan& plan = gemm_plan(v.n, tokens, v.k, DType::kF8E4M3, DType::kF32, /*allow_missing=*/true);
    if (!plan.missing) {
      const size_t mark = arena_used_;  // temporaries of this call only (see attention)
      Tensor xq = scratch({tokens, v.k}, DType::kF8E4M3);
      Tensor row_scales = scratch({tokens}, DType::kF32);
      Tensor acc = scratch({tokens, v.n}, DType::kF32);
      const float* static_scale = w.input_scale.empty() ? nullptr : w.input_scale.as<float>();
      check(kernels::quantize_fp8_rows(x.data, tokens, v.k, static_scale, static_cast<uint8_t*>(xq.data),
                                       row_scales.as<float>(), x.dtype, stream_), "quantize_fp8_rows");
      gemm(w.weight.data, DType::kF8E4M3, xq.data, tokens, v.n, v.k, acc.data, DType::kF32);
      check(kernels::scale_fp8_output(acc.as<float>(), row_scales.as<float>(), w.scales.as<float>(), tokens, v.n,
                                      out.data, out.dtype, stream_), "scale_fp8_output");
      arena_used_ = mark;
      return;
    }
  }
  const size_t bytes = static_cast<size_t>(v.n * v.k) * dtype_size(x.dtype);
  if (bytes > dequant_bytes_) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    check(cudaStreamIsCapturing(stream_, &capturing), "cudaStreamIsCapturing");
    if (capturing != cudaStreamCaptureStatusNone) {
      throw std::runtime_error(absl::StrCat("dequantization buffer of ", dequant_bytes_, " bytes too small for a ", v.n,
                                            " x ", v.k, " layer during graph capture (no warm-up at this batch?)"));
    }
    wait_stream();  // the previous buffer may still be read by queued work
    if (dequant_) cudaFree(dequant_);
    dequant_ = nullptr;
    check(cudaMalloc(&dequant_, bytes), "cudaMalloc(dequantization buffer)");
    persistent_bytes_ += bytes - dequant_bytes_;
    dequant_bytes_ = bytes;
  }
  if (w.mma_layout) {
    check(kernels::quant_mma_dequantize(mma_view(w, x.dtype), dequant_, stream_), "quant_mma_dequantize");
  } else {
    check(kernels::dequantize(v, dequant_, x.dtype, stream_), "dequantize");
  }
  gemm(dequant_, x.dtype, x.data, tokens, v.n, v.k, out.data, out.dtype);
}

// The tensor-core kernel of kernels/quant_gemm.cu takes INT4/INT8 layers repacked at load up to
// kMaxQuantMmaTokens tokens, and FP8 layers (read in place) on GPUs without FP8 tensor cores (A100:
// otherwise a GEMV and a dequantized copy). With FP8 tensor cores, FP8 takes it from 3 to 8 tokens,
// between the GEMV and W8A8: on an H200's 70B shapes the GEMV read FP8 at 0.72-0.95 of the copy
// bandwidth at 1 token (the kernel on the row-major bytes: 0.52-0.72) but re-reads the activations
// per row, at half of BF16's speed by 8 tokens, where the kernel stays at 1.1-1.4x BF16.
constexpr int64_t kFp8MmaMinTokens = 3;
bool CudaBackend::runs_on_quant_mma(const LinearWeight& w, int64_t tokens, DType x) const {
  if (tokens > kernels::kMaxQuantMmaTokens || (x != DType::kBF16 && x != DType::kF16)) return false;
  if (w.mma_layout) return true;
  if (w.format != WeightFormat::kFp8) return false;
  if (fp8_tensor_cores_ && (tokens < kFp8MmaMinTokens || fp8_runs_as_w8a8(tokens, w.out_features(), w.in_features()))) {
    return false;
  }
  return kernels::quant_mma_supported(quant_view(w), tokens, x);
}

void CudaBackend::linear(const Tensor& x, const LinearWeight& w, Tensor& out) {
  const int64_t k = w.in_features();
  const int64_t n_out = w.out_features();
  const int64_t tokens = x.numel() / k;
  if (tokens == 0) return;
  if (runs_on_quant_mma(w, tokens, x.dtype)) {
    const kernels::QuantMmaView v = mma_view(w, x.dtype);
    const size_t mark = arena_used_;  // the permuted activations of an act-order weight, this call only
    void* x_permuted = v.perm != nullptr ? scratch({tokens, k}, x.dtype).data : nullptr;
    check(kernels::quant_mma_gemm(v, x.data, tokens, out.data, out.dtype, x_permuted, stream_, nullptr,
                                  quant_workspace()),
          "quant_mma_gemm");
    arena_used_ = mark;
    return;
  }
  if (w.format != WeightFormat::kDense) {
    // The quantized GEMV reads 2-4x fewer bytes than a 16-bit one for the same work, so it stays
    // ahead of the dequantize-and-GEMM path up to its largest batch.
    const kernels::QuantWeightView v = quant_view(w);
    if (kernels::quant_gemv_supported(v, tokens, x.dtype)) {
      check(kernels::quant_gemv(v, x.data, tokens, out.data, x.dtype, out.dtype, stream_), "quant_gemv");
    } else {
      quantized_gemm(x, w, tokens, out);
    }
    return;
  }
  if (tokens <= gemv_max_tokens_ && kernels::gemv_supported(tokens, k, w.weight.dtype, x.dtype)) {
    check(kernels::gemv(x.data, w.weight.data, tokens, n_out, k, out.data, x.dtype, out.dtype, stream_), "gemv");
    return;
  }
  gemm(w.weight.data, w.weight.dtype, x.data, tokens, n_out, k, out.data, out.dtype);
}

void CudaBackend::rope_and_store_kv(Tensor& qkv, int64_t num_q_heads, const Tensor& positions, const Tensor& cos_sin,
                                   const Tensor& slot_mapping, KvLayer& cache) {
  check(kernels::rope_and_store_kv(qkv.data, qkv.dim(0), num_q_heads, cache.k.dim(2), cache.k.dim(3), i32(positions),
                                   cos_sin.as<float>(), i32(slot_mapping), cache.k.data, cache.v.data, qkv.dtype,
                                   stream_), "rope_and_store_kv");
}

void CudaBackend::attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache, const AttentionMetadata& meta,
                            float scale, Tensor& out) {
  run_attention(qkv, num_q_heads, cache, meta, scale, out, nullptr, nullptr);
}

// Decode steps on the tensor-core kernel with SHARDSERVE_FUSED_ROPE: one kernel instead of the RoPE
// and cache-store kernel then attention; qkv is left unrotated (nothing reads it after).
void CudaBackend::rope_store_attention(Tensor& qkv, int64_t num_q_heads, const Tensor& positions, const Tensor& cos_sin,
                                       KvLayer& cache, const AttentionMetadata& meta, float scale, Tensor& out) {
  if (fused_rope_ && run_attention(qkv, num_q_heads, cache, meta, scale, out, &positions, &cos_sin)) return;
  Backend::rope_store_attention(qkv, num_q_heads, positions, cos_sin, cache, meta, scale, out);
}

bool CudaBackend::run_attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache,
                                const AttentionMetadata& meta, float scale, Tensor& out, const Tensor* positions,
                                const Tensor* cos_sin) {
  kernels::AttentionParams p;
  p.qkv = qkv.data;
  p.k_cache = cache.k.data;
  p.v_cache = cache.v.data;
  p.out = out.data;
  p.query_start_loc = i32(meta.query_start_loc);
  p.seq_lens = i32(meta.seq_lens);
  p.block_tables = i32(meta.block_tables);
  p.num_tokens = qkv.dim(0);
  p.num_seqs = meta.num_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = cache.k.dim(2);
  p.head_dim = cache.k.dim(3);
  p.block_size = cache.k.dim(1);
  p.max_blocks = meta.block_tables.dim(1);
  p.scale = scale;
  // Decode-only steps have too few (token, KV head) pairs to fill the GPU: split each context
  // over enough CTAs for about two per SM. Depends on the shape only (attention_splits.h).
  p.decode_only = meta.max_query_len == 1 && p.num_tokens == meta.num_seqs;
  if (meta.max_query_len == 1) {
    p.num_splits = static_cast<int>(decode_attention_splits(p.num_tokens, p.num_kv_heads, num_sms_));
  }
  // In a decode step the only writer of this layer's cache is rope_and_store_kv just before (or,
  // fused, this kernel), at each sequence's newest position; the metadata came up by copy before
  // the step's first kernel.
  p.kv_before_wait = p.decode_only && kv_before_wait_;
  if (positions != nullptr) {
    p.rope_positions = i32(*positions);
    p.rope_cos_sin = cos_sin->as<float>();
    p.rope_slots = i32(meta.slot_mapping);
    if (!kernels::decode_rope_fusable(p, qkv.dtype)) return false;
  }
  // The partials live only until the combine kernel has run: later scratch may reuse them (the
  // stream orders every reader before the next writer), so they do not grow with depth.
  const size_t mark = arena_used_;
  Tensor partials;
  if (p.num_splits > 1) {
    const size_t bytes = kernels::attention_workspace_bytes(p.num_tokens, p.num_q_heads, p.head_dim, p.num_splits);
    partials = scratch({static_cast<int64_t>(bytes / 4)}, DType::kF32);
    p.partials = partials.as<float>();
    // The decode kernel merges its own splits (no combine kernel) when the counters reach.
    if (p.num_seqs * p.num_kv_heads <= kSplitCounters) p.split_counters = split_counters_;
  }
  check(kernels::paged_attention(p, qkv.dtype, stream_), "paged_attention");
  arena_used_ = mark;
  return true;
}

// One device buffer and one pinned host buffer of the same layout: [rows | entries | saved raw
// logits | tokens | logprobs | top ids | top logprobs]. The inputs go up in one copy; the tokens
// (and, when asked, the logprobs) come down in one.
void CudaBackend::sample(Tensor& logits, const std::vector<SamplingRow>& rows, const std::vector<PenaltyEntry>& entries,
                         SampledRows& out) {
  const auto n = static_cast<int64_t>(rows.size());
  const auto e = static_cast<int64_t>(entries.size());
  out = SampledRows{};
  if (n == 0) return;
  if (logits.dtype != DType::kF32 || logits.shape.size() != 2 || logits.dim(0) < n) {
    throw std::logic_error("CudaBackend::sample: logits must be FP32 [>= rows, vocab]");
  }
  const size_t off_entries = aligned(sizeof(SamplingRow) * n);
  const size_t off_saved = off_entries + aligned(sizeof(PenaltyEntry) * std::max<int64_t>(e, 1));
  const size_t off_tokens = off_saved + aligned(sizeof(float) * std::max<int64_t>(e, 1));
  const size_t off_lp = off_tokens + aligned(sizeof(int32_t) * n);
  const size_t off_top_ids = off_lp + aligned(sizeof(float) * n);
  const size_t off_top_lp = off_top_ids + aligned(sizeof(int32_t) * n * kMaxSampledLogprobs);
  const size_t total = off_top_lp + aligned(sizeof(float) * n * kMaxSampledLogprobs);
  if (total > sample_bytes_) {
    wait_stream();
    if (sample_dev_) cudaFree(sample_dev_);
    if (sample_host_) cudaFreeHost(sample_host_);
    sample_dev_ = sample_host_ = nullptr;
    sample_bytes_ = 0;
    const size_t bytes = std::max(total, size_t{1} << 20) * 2;
    check(cudaMalloc(&sample_dev_, bytes), "cudaMalloc(sampler)");
    check(cudaMallocHost(&sample_host_, bytes), "cudaMallocHost(sampler)");
    sample_bytes_ = bytes;
  }
  char* host = static_cast<char*>(sample_host_);
  char* dev = static_cast<char*>(sample_dev_);
  std::memcpy(host, rows.data(), sizeof(SamplingRow) * n);
  if (e > 0) std::memcpy(host + off_entries, entries.data(), sizeof(PenaltyEntry) * e);
  check(cudaMemcpyAsync(dev, host, e > 0 ? off_saved : sizeof(SamplingRow) * n, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpy(sampler inputs)");
  check(kernels::sample_rows(logits.as<float>(), n, logits.dim(1), reinterpret_cast<const SamplingRow*>(dev),
                             reinterpret_cast<const PenaltyEntry*>(dev + off_entries),
                             reinterpret_cast<float*>(dev + off_saved), reinterpret_cast<int32_t*>(dev + off_tokens),
                             reinterpret_cast<float*>(dev + off_lp), reinterpret_cast<int32_t*>(dev + off_top_ids),
                             reinterpret_cast<float*>(dev + off_top_lp), stream_),
        "sample_rows");
  const bool any_logprobs =
      std::any_of(rows.begin(), rows.end(), [](const SamplingRow& r) { return r.num_logprobs >= 0; });
  const size_t down = any_logprobs ? total - off_tokens : sizeof(int32_t) * n;
  check(cudaMemcpyAsync(host + off_tokens, dev + off_tokens, down, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpy(sampled tokens)");
  wait_stream();
  const auto* tokens = reinterpret_cast<const int32_t*>(host + off_tokens);
  out.token_ids.assign(tokens, tokens + n);
  if (any_logprobs) {
    const auto* lp = reinterpret_cast<const float*>(host + off_lp);
    const auto* top_ids = reinterpret_cast<const int32_t*>(host + off_top_ids);
    const auto* top_lp = reinterpret_cast<const float*>(host + off_top_lp);
    out.logprobs.assign(lp, lp + n);
    out.top_ids.assign(top_ids, top_ids + n * kMaxSampledLogprobs);
    out.top_logprobs.assign(top_lp, top_lp + n * kMaxSampledLogprobs);
  }
}

struct GatedPlan {
  bool tuned = false;
  bool use_fused = false;
  kernels::SkinnyGemmShape shape;
};

// The gate/up projection with SiLU-and-multiply in its epilogue (SHARDSERVE_FUSED_SILU): the GEMV
// where linear() would take it (16-bit dense weights, up to gemv_max_tokens_ tokens), the skinny
// GEMM's gated form up to its largest size where its load-time trial beats the two kernels.
// Otherwise the two.
void CudaBackend::linear_silu_mul(const Tensor& x, const LinearWeight& w, Tensor& gate_up, Tensor& out) {
  const int64_t k = w.in_features();
  const int64_t f = out.dim(1);
  const int64_t tokens = x.numel() / k;
  const bool dense16 = fused_silu_ && w.format == WeightFormat::kDense && w.out_features() == 2 * f &&
                       out.dim(0) == tokens && out.dtype == x.dtype && w.weight.dtype == x.dtype &&
                       (x.dtype == DType::kBF16 || x.dtype == DType::kF16);
  if (dense16 && tokens >= 1 && tokens <= gemv_max_tokens_ && kernels::gemv_supported(tokens, k, w.weight.dtype, x.dtype)) {
    check(kernels::gemv_silu_mul(x.data, w.weight.data, tokens, f, k, out.data, x.dtype, stream_), "gemv_silu_mul");
    return;
  }
  if (dense16 && tokens > gemv_max_tokens_ && tokens <= kernels::kMaxSkinnyGemmTokens &&
      skinny_gemm_mode() != SkinnyGemmMode::kOff && (2 * f) % 64 == 0 && k % 64 == 0) {
    const std::string key = std::to_string(tokens) + "x" + std::to_string(f) + "x" + std::to_string(k) + "/" +
                            std::string(dtype_name(x.dtype));
    std::unique_ptr<GatedPlan>& slot = gated_plans_[key];
    if (slot == nullptr) slot = std::make_unique<GatedPlan>();
    GatedPlan& plan = *slot;
    if (!plan.tuned) tune_gated(plan, x, w, gate_up, out);
    if (plan.use_fused) {
      check(kernels::skinny_gemm_silu_mul(plan.shape, x.data, w.weight.data, out.data, x.dtype,
                                          static_cast<float*>(gemm_workspace_), skinny_counters_, stream_),
            "skinny_gemm_silu_mul");
      return;
    }
  }
  Backend::linear_silu_mul(x, w, gate_up, out);
}

// As tune_gemm at decode shapes: each candidate once to warm up, then 5 calls each after the L2
// is flushed, the best kept; the two kernels (with the GEMM's own tuned choice) against every
// configuration of the gated skinny GEMM. Skipped inside a graph capture (the two kernels run).
void CudaBackend::tune_gated(GatedPlan& plan, const Tensor& x, const LinearWeight& w, Tensor& gate_up, Tensor& out) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream_, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone) return;
  plan.tuned = true;
  const int64_t k = w.in_features(), f = out.dim(1), tokens = out.dim(0);
  int l2 = 0;
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device_), "cudaDeviceGetAttribute(L2)");
  const size_t flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  void* flush = nullptr;
  if (cudaMalloc(&flush, flush_bytes) != cudaSuccess) {
    cudaGetLastError();
    return;  // no room to time it fairly: the two kernels
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  auto best_of = [&](const std::function<bool()>& call) { return best_cold_ms(call, flush, flush_bytes, start, stop); };
  const float two = best_of([&] {
    Backend::linear_silu_mul(x, w, gate_up, out);
    return true;
  });
  float best_fused = INFINITY;
  for (const kernels::SkinnyGemmConfig& cfg : kernels::kSkinnyGemmConfigs) {
    const kernels::SkinnyGemmShape s =
        kernels::skinny_gemm_shape(tokens, 2 * f, k, num_sms_, gemm_workspace_bytes_, cfg.ctas_per_sm, cfg.stages);
    if (!s.valid) continue;
    const float t = best_of([&] {
      return kernels::skinny_gemm_silu_mul(s, x.data, w.weight.data, out.data, x.dtype,
                                           static_cast<float*>(gemm_workspace_), skinny_counters_, stream_) ==
             cudaSuccess;
    });
    cudaGetLastError();  // a failed launch leaves the two kernels in charge, not a sticky error
    if (t < best_fused) {
      best_fused = t;
      plan.shape = s;
    }
  }
  plan.use_fused = std::isfinite(best_fused) && best_fused < two;
  cudaFree(flush);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

void CudaBackend::silu_mul(const Tensor& gate_up, Tensor& out) {
  check(kernels::silu_mul(gate_up.data, out.dim(0), out.dim(1), out.data, out.dtype, stream_), "silu_mul");
}

void CudaBackend::gather_rows(const Tensor& x, const Tensor& indices, Tensor& out) {
  const auto row_bytes = static_cast<int64_t>(x.nbytes() / static_cast<size_t>(x.dim(0)));
  check(kernels::gather_rows(x.data, row_bytes, i32(indices), indices.numel(), out.data, stream_), "gather_rows");
}

void CudaBackend::join_column_shards(const Tensor& shards, int64_t num_shards, Tensor& out) {
  const int64_t rows = out.dim(0);
  const size_t shard_row_bytes = shards.nbytes() / static_cast<size_t>(shards.dim(0));
  // Shard k's rows land at column offset k * C of every output row: a strided 2D copy each.
  for (int64_t k = 0; k < num_shards; ++k) {
    check(cudaMemcpy2DAsync(static_cast<char*>(out.data) + k * shard_row_bytes, num_shards * shard_row_bytes,
                            static_cast<const char*>(shards.data) + k * rows * shard_row_bytes, shard_row_bytes,
                            shard_row_bytes, rows, cudaMemcpyDeviceToDevice, stream_), "join_column_shards");
  }
}

std::shared_ptr<void> CudaBackend::capture(const std::function<void()>& fn) {
  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  try {
    fn();
  } catch (...) {
    // Leave the stream usable: end the capture and drop what it recorded.
    if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check(e, "cudaGraphInstantiate");
  return std::shared_ptr<void>(exec, [](void* g) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(g)); });
}

void CudaBackend::replay(const std::shared_ptr<void>& graph) {
  check(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.get()), stream_), "cudaGraphLaunch");
}

}  // namespace shardserve
