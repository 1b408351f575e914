// Standalone harness for the paged-attention kernels (kernels/attention.cu, included whole so the
// tensor-core and the CUDA-core kernels can be launched side by side): each checked against a
// double-precision CPU reference on random inputs over a scrambled paged cache, then timed.
//
//   nvcc -std=c++20 -O3 -arch=sm_90a -I. --expt-relaxed-constexpr tests/bench/attention_harness.cu \
//        -lcublasLt -o attention_harness            # the sm_90a build
//   ... -gencode arch=compute_80,code=compute_80    # the sm_80 path, JIT-compiled on newer GPUs
//   ./attention_harness [--quick]
//
// Prints one line per check (relative L2 error and max error against the reference; FAIL above
// 2e-2, the GPU tests' tolerance) and per timing (microseconds per layer, TFLOP/s for prefill,
// bandwidth fraction of the KV bytes against a device-to-device copy measured in the same run), and
// exits non-zero when a check fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_profiler_api.h>

#include "kernels/attention.cu"
#include "tests/bench/cublaslt_timing.h"
#include "tests/bench/gpu_timing.h"
#include "tests/bench/host_16bit.h"

using namespace shardserve;
using namespace shardserve::kernels;

// The kernel ahead of a decode step's attention, as RoPE's cache store is: it lets its dependents
// launch at once, spins for `spin` clocks, then writes each sequence's newest cache row (K and V,
// every KV head) from src. An attention that read those rows before its wait sees what was there
// before (NaN, below).
// (Outside the anonymous namespace: kernels/attention.cu, included above, has its own, and the
// registration of a kernel template in a second one is ambiguous to the host compiler.)
namespace harness_kernels {
template <typename T>
__global__ void slow_store_kernel(const T* k_src, const T* v_src, const int64_t* slots, int n, int row, T* k, T* v,
                                  long long spin) {
  pdl_trigger();
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  for (int i = threadIdx.x; i < n * row; i += blockDim.x) {
    const int64_t at = slots[i / row] * row + i % row;
    k[at] = k_src[i];
    v[at] = v_src[i];
  }
}
}  // namespace harness_kernels

namespace {

int g_failures = 0;
int g_sms = 0;
float* g_partials = nullptr;  // the latest Problem's partials buffer (room for 32 splits), for decode_splits
int32_t* g_counters = nullptr;  // split counters for every (sequence, KV head), zero between launches

struct Seq {
  int cached, fresh;
};

using harness::host_f32;
using harness::host_from;

// One attention problem: random q/k/v, a scrambled block table, device copies (`copies` caches
// of the same content for timing without L2 reuse between launches).
template <typename T>
struct Problem {
  int hq, hkv, d, bs = 16;
  std::vector<Seq> seqs;
  int tokens = 0, width = 0, blocks = 0;
  std::vector<int32_t> qsl{0}, lens, bt;
  std::vector<T> qkv, k, v;
  T *d_qkv = nullptr, *d_k = nullptr, *d_v = nullptr, *d_out = nullptr;
  int32_t *d_qsl = nullptr, *d_lens = nullptr, *d_bt = nullptr;
  float* d_part = nullptr;
  int copies = 1;
  size_t cache_elems = 0;

  Problem(int hq_, int hkv_, int d_, std::vector<Seq> s, std::mt19937& rng, bool fill_cache = true)
      : hq(hq_), hkv(hkv_), d(d_), seqs(std::move(s)) {
    int max_len = 0;
    for (const Seq& q : seqs) {
      tokens += q.fresh;
      qsl.push_back(tokens);
      lens.push_back(q.cached + q.fresh);
      max_len = std::max(max_len, q.cached + q.fresh);
    }
    width = (max_len + bs - 1) / bs;
    blocks = static_cast<int>(seqs.size()) * width;
    std::vector<int32_t> perm(blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    bt.assign(static_cast<size_t>(blocks), -1);
    for (size_t i = 0; i < seqs.size(); ++i) {
      for (int b = 0; b < (lens[i] + bs - 1) / bs; ++b) bt[i * width + b] = perm[i * width + b];
    }
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int64_t stride = static_cast<int64_t>(hq + 2 * hkv) * d;
    qkv.resize(static_cast<size_t>(tokens) * stride);
    for (auto& x : qkv) x = host_from<T>(u(rng));
    cache_elems = static_cast<size_t>(blocks) * bs * hkv * d;
    k.resize(cache_elems);
    v.resize(cache_elems);
    if (fill_cache) {
      for (auto& x : k) x = host_from<T>(u(rng));
      for (auto& x : v) x = host_from<T>(u(rng));
    }
    const double cache_bytes = 2.0 * cache_elems * sizeof(T);
    copies = std::clamp(static_cast<int>(512e6 / cache_bytes), 1, 16);
    CK(cudaMalloc(&d_qkv, qkv.size() * sizeof(T)));
    CK(cudaMalloc(&d_k, cache_elems * sizeof(T) * copies));
    CK(cudaMalloc(&d_v, cache_elems * sizeof(T) * copies));
    CK(cudaMalloc(&d_out, static_cast<size_t>(tokens) * hq * d * sizeof(T)));
    CK(cudaMalloc(&d_qsl, qsl.size() * 4));
    CK(cudaMalloc(&d_lens, lens.size() * 4));
    CK(cudaMalloc(&d_bt, bt.size() * 4));
    CK(cudaMalloc(&d_part, attention_workspace_bytes(tokens, hq, d, 32) + 16));
    g_partials = d_part;
    CK(cudaMemcpy(d_qkv, qkv.data(), qkv.size() * sizeof(T), cudaMemcpyHostToDevice));
    for (int c = 0; c < copies; ++c) {
      CK(cudaMemcpy(d_k + c * cache_elems, k.data(), cache_elems * sizeof(T), cudaMemcpyHostToDevice));
      CK(cudaMemcpy(d_v + c * cache_elems, v.data(), cache_elems * sizeof(T), cudaMemcpyHostToDevice));
    }
    CK(cudaMemcpy(d_qsl, qsl.data(), qsl.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
  }
  ~Problem() {
    for (void* p : {static_cast<void*>(d_qkv), static_cast<void*>(d_k), static_cast<void*>(d_v),
                    static_cast<void*>(d_out), static_cast<void*>(d_qsl), static_cast<void*>(d_lens),
                    static_cast<void*>(d_bt), static_cast<void*>(d_part)}) {
      cudaFree(p);
    }
  }
  bool decode_only() const {
    return std::all_of(seqs.begin(), seqs.end(), [](const Seq& q) { return q.fresh == 1; });
  }
  AttentionParams params(int copy = 0) const {
    AttentionParams p;
    p.qkv = d_qkv;
    p.k_cache = d_k + static_cast<size_t>(copy) * cache_elems;
    p.v_cache = d_v + static_cast<size_t>(copy) * cache_elems;
    p.out = d_out;
    p.query_start_loc = d_qsl;
    p.seq_lens = d_lens;
    p.block_tables = d_bt;
    p.num_tokens = tokens;
    p.num_seqs = static_cast<int64_t>(seqs.size());
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.block_size = bs;
    p.max_blocks = width;
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
    p.decode_only = decode_only();
    // As the CUDA backend: split only decode steps (worker/runtime/attention_splits.h).
    const int64_t max_q = std::max_element(seqs.begin(), seqs.end(), [](auto& a, auto& b) { return a.fresh < b.fresh; })->fresh;
    if (max_q == 1) p.num_splits = static_cast<int>(std::clamp<int64_t>(2 * g_sms / std::max<int64_t>(tokens * hkv, 1), 1, 32));
    p.partials = p.num_splits > 1 ? d_part : nullptr;
    p.split_counters = p.num_splits > 1 ? g_counters : nullptr;  // the decode kernel merges its splits
    return p;
  }
  // Causal FLOPs (QK^T and PV) and the KV bytes a decode step must read.
  double flops() const {
    double f = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      for (int j = 0; j < seqs[i].fresh; ++j) f += 4.0 * hq * d * (seqs[i].cached + j + 1);
    }
    return f;
  }
  double kv_bytes() const {
    double b = 0;
    for (int l : lens) b += 2.0 * l * hkv * d * sizeof(T);
    return b;
  }
  // Checks the device output against a double reference on a sample of tokens (every token of
  // short sequences, a stride of long ones plus their last tokens).
  void check(const std::string& what) {
    std::vector<T> out(static_cast<size_t>(tokens) * hq * d);
    CK(cudaMemcpy(out.data(), d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    const int64_t stride = static_cast<int64_t>(hq + 2 * hkv) * d;
    const int g = hq / hkv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    double err2 = 0, ref2 = 0, max_err = 0;
    std::vector<double> sc, o(d);
    for (size_t s = 0; s < seqs.size(); ++s) {
      for (int j = 0; j < seqs[s].fresh; ++j) {
        if (seqs[s].fresh > 64 && j % 13 != 0 && j < seqs[s].fresh - 3) continue;
        const int t = qsl[s] + j;
        const int qp = seqs[s].cached + j;
        for (int h = 0; h < hq; ++h) {
          const int kvh = h / g;
          sc.assign(qp + 1, 0.0);
          double mx = -1e300;
          for (int pos = 0; pos <= qp; ++pos) {
            const int64_t slot = static_cast<int64_t>(bt[s * width + pos / bs]) * bs + pos % bs;
            const T* kr = &k[(slot * hkv + kvh) * d];
            const T* q = &qkv[t * stride + static_cast<int64_t>(h) * d];
            double dot = 0;
            for (int e = 0; e < d; ++e) dot += static_cast<double>(host_f32(q[e])) * host_f32(kr[e]);
            sc[pos] = dot * scale;
            mx = std::max(mx, sc[pos]);
          }
          double l = 0;
          std::fill(o.begin(), o.end(), 0.0);
          for (int pos = 0; pos <= qp; ++pos) {
            const double w = std::exp(sc[pos] - mx);
            l += w;
            const int64_t slot = static_cast<int64_t>(bt[s * width + pos / bs]) * bs + pos % bs;
            const T* vr = &v[(slot * hkv + kvh) * d];
            for (int e = 0; e < d; ++e) o[e] += w * host_f32(vr[e]);
          }
          for (int e = 0; e < d; ++e) {
            const double ref = o[e] / l;
            const double got = host_f32(out[(static_cast<int64_t>(t) * hq + h) * d + e]);
            err2 += (got - ref) * (got - ref);
            ref2 += ref * ref;
            max_err = std::max(max_err, std::abs(got - ref));
          }
        }
      }
    }
    const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
    const bool ok = rel < 2e-2 && std::isfinite(rel);
    if (!ok) ++g_failures;
    std::printf("%-4s %-58s rel_l2 %.2e  max_abs %.2e\n", ok ? "ok" : "FAIL", what.c_str(), rel, max_err);
  }
};

using Launch = cudaError_t (*)(const AttentionParams&, cudaStream_t);

// The CUDA-core fallback kernel (and its split combine for decode steps).
template <typename T>
cudaError_t launch_cuda_core(const AttentionParams& p, cudaStream_t stream) {
  const size_t smem = smem_bytes(p.num_q_heads / p.num_kv_heads, p.head_dim);
  CK(cudaFuncSetAttribute(attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  attention_kernel<T><<<dim3(p.num_tokens, p.num_kv_heads, p.num_splits), 128, smem, stream>>>(p);
  if (p.num_splits > 1) combine_kernel<T><<<dim3(p.num_tokens, p.num_q_heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}
template <typename T>
cudaError_t launch_tensor_core(const AttentionParams& p, cudaStream_t stream) {
  return paged_attention(p, std::is_same_v<T, __nv_bfloat16> ? DType::kBF16 : DType::kF16, stream);
}

// Tuning variants of the tensor-core kernels (warps per prefill CTA, pipeline stages, 16-row
// tiles per warp, positions per softmax step).
template <int kWarps, int kStages, int kMW = 1, int kSubN = tc::kTileN>
cudaError_t prefill_variant(const AttentionParams& p, cudaStream_t stream) {
  using T = __nv_bfloat16;
  constexpr auto kernel = tc::prefill_mma_kernel<T, 128, 4, kWarps, kStages, kMW, kSubN>;
  const size_t smem = tc::tc_smem_bytes(16 * kWarps * kMW, 128, kStages);
  CK(allow_smem<kernel>(smem));
  const int64_t tokens = 16 * kWarps * kMW / 4;
  const dim3 grid((p.num_tokens + tokens - 1) / tokens + p.num_seqs, p.num_kv_heads);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}
// The Hopper prefill's variants (positions per K/V tile, stages, CTAs an SM asked of the compiler).
template <int kWG, int kN, int kStages, int kMinBlocks = 1, bool kLazy = false>
cudaError_t wgmma_variant(const AttentionParams& p, cudaStream_t stream) {
  return tc::launch_prefill_wgmma<__nv_bfloat16, 128, 4, kWG, kN, kStages, kMinBlocks, kLazy>(p, stream);
}
// The backend's prefill with the mma.sync kernel (the sm_80 path) on any GPU.
template <typename T>
cudaError_t launch_mma_sync(const AttentionParams& p, cudaStream_t stream) {
  setenv("SHARDSERVE_ATTENTION_WGMMA", "0", 1);
  const cudaError_t e = launch_tensor_core<T>(p, stream);
  unsetenv("SHARDSERVE_ATTENTION_WGMMA");
  return e;
}
template <int kStages, int kMinBlocks = 1>
cudaError_t decode_variant(const AttentionParams& in, cudaStream_t stream) {
  using T = __nv_bfloat16;
  AttentionParams p = in;
  p.split_counters = nullptr;  // merged by combine_kernel
  constexpr auto kernel = tc::decode_mma_kernel<T, 128, 4, kStages, kMinBlocks>;
  const size_t smem = tc::tc_smem_bytes(16, 128, kStages);
  CK(allow_smem<kernel>(smem));
  cudaError_t e = launch_pdl(kernel, dim3(p.num_seqs, p.num_kv_heads, p.num_splits), dim3(128), smem, stream, p);
  if (e == cudaSuccess && p.num_splits > 1) e = launch_pdl(combine_kernel<T>, dim3(p.num_tokens, p.num_q_heads), dim3(128), 0, stream, p);
  return e;
}

// The backend's decode kernel with the context split into a fixed number of CTAs instead of
// worker/runtime/attention_splits.h's choice (the partials buffer holds up to 32).
template <int kSplits>
cudaError_t decode_splits(const AttentionParams& p, cudaStream_t stream) {
  AttentionParams q = p;
  q.num_splits = kSplits;
  q.partials = kSplits > 1 ? g_partials : nullptr;
  return launch_tensor_core<__nv_bfloat16>(q, stream);
}

// The backend's decode kernel with its splits merged by combine_kernel instead of by its own last
// split of each (sequence, KV head).
template <typename T>
cudaError_t decode_combine_kernel(const AttentionParams& p, cudaStream_t stream) {
  AttentionParams q = p;
  q.split_counters = nullptr;
  return launch_tensor_core<T>(q, stream);
}

// The backend's decode kernel reading the cache before its programmatic-dependent wait, as the
// CUDA backend launches it in a decode step (AttentionParams::kv_before_wait).
template <typename T>
cudaError_t decode_early_kv(const AttentionParams& p, cudaStream_t stream) {
  AttentionParams q = p;
  q.kv_before_wait = true;
  return launch_tensor_core<T>(q, stream);
}

// Early-KV decode against the reference while the kernel ahead of it is still writing the newest
// positions (their rows NaN until it does): the kernel must read those rows only after its wait.
template <typename T>
void check_early_kv(const char* name, int hq, int hkv, int d, std::vector<Seq> seqs, std::mt19937& rng) {
  Problem<T> pr(hq, hkv, d, std::move(seqs), rng);
  const int row = hkv * d;
  const int n = static_cast<int>(pr.seqs.size());
  std::vector<int64_t> slots;
  std::vector<T> k_rows, v_rows;
  for (int s = 0; s < n; ++s) {
    const int pos = pr.lens[s] - 1;
    const int64_t slot = static_cast<int64_t>(pr.bt[s * pr.width + pos / pr.bs]) * pr.bs + pos % pr.bs;
    slots.push_back(slot);
    k_rows.insert(k_rows.end(), pr.k.begin() + slot * row, pr.k.begin() + (slot + 1) * row);
    v_rows.insert(v_rows.end(), pr.v.begin() + slot * row, pr.v.begin() + (slot + 1) * row);
  }
  T *d_k_rows = nullptr, *d_v_rows = nullptr;
  int64_t* d_slots = nullptr;
  CK(cudaMalloc(&d_k_rows, k_rows.size() * sizeof(T)));
  CK(cudaMalloc(&d_v_rows, v_rows.size() * sizeof(T)));
  CK(cudaMalloc(&d_slots, slots.size() * sizeof(int64_t)));
  CK(cudaMemcpy(d_k_rows, k_rows.data(), k_rows.size() * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_v_rows, v_rows.data(), v_rows.size() * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_slots, slots.data(), slots.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  for (const int64_t slot : slots) {
    CK(cudaMemset(pr.d_k + slot * row, 0xFF, row * sizeof(T)));
    CK(cudaMemset(pr.d_v + slot * row, 0xFF, row * sizeof(T)));
  }
  CK(cudaDeviceSynchronize());
  cudaStream_t stream = nullptr;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  harness_kernels::slow_store_kernel<T><<<1, 256, 0, stream>>>(d_k_rows, d_v_rows, d_slots, n, row, pr.d_k, pr.d_v, 200000);
  CK(cudaGetLastError());
  CK(decode_early_kv<T>(pr.params(), stream));
  CK(cudaStreamSynchronize(stream));
  CK(cudaStreamDestroy(stream));
  const std::string shape = " hq" + std::to_string(hq) + " hkv" + std::to_string(hkv) + " d" + std::to_string(d);
  pr.check(std::string("early-kv decode ") + name + shape);
  for (void* q : {static_cast<void*>(d_k_rows), static_cast<void*>(d_v_rows), static_cast<void*>(d_slots)}) cudaFree(q);
}

template <typename T>
double time_us(Problem<T>& pr, Launch f, int iters) {
  return harness::time_us([&](int i) { CK(f(pr.params(i % pr.copies), nullptr)); }, iters);
}


template <typename T>
void check_case(const char* name, int hq, int hkv, int d, std::vector<Seq> seqs, std::mt19937& rng) {
  Problem<T> pr(hq, hkv, d, std::move(seqs), rng);
  const std::string shape = " hq" + std::to_string(hq) + " hkv" + std::to_string(hkv) + " d" + std::to_string(d) +
                            (std::is_same_v<T, __half> ? " f16" : " bf16");
  CK(launch_tensor_core<T>(pr.params(), nullptr));
  CK(cudaDeviceSynchronize());
  pr.check(std::string("tensor-core ") + name + shape);
  if (!pr.decode_only()) {
    CK(cudaMemset(pr.d_out, 0, static_cast<size_t>(pr.tokens) * hq * d * sizeof(T)));
    CK(launch_mma_sync<T>(pr.params(), nullptr));
    CK(cudaDeviceSynchronize());
    pr.check(std::string("mma.sync    ") + name + shape);
  }
  if (pr.params().split_counters != nullptr) {
    CK(cudaMemset(pr.d_out, 0, static_cast<size_t>(pr.tokens) * hq * d * sizeof(T)));
    CK(decode_combine_kernel<T>(pr.params(), nullptr));
    CK(cudaDeviceSynchronize());
    pr.check(std::string("tensor-core ") + name + " combine kernel" + shape);
  }
  if (d == 128 || d == 64) {
    CK(cudaMemset(pr.d_out, 0, static_cast<size_t>(pr.tokens) * hq * d * sizeof(T)));
    CK(launch_cuda_core<T>(pr.params(), nullptr));
    CK(cudaDeviceSynchronize());
    pr.check(std::string("cuda-core   ") + name + shape);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  // --profile-prefill: one 2,048-token prefill launch between cudaProfilerStart/Stop, for Nsight
  // Compute (--profile-from-start off), and nothing else.
  const bool profile_prefill = argc > 1 && std::strcmp(argv[1], "--profile-prefill") == 0;
  int dev = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs, sm_%d%d\n", prop.name, g_sms, prop.major, prop.minor);
  std::mt19937 rng(1234);
  CK(cudaMalloc(&g_counters, 65536 * sizeof(int32_t)));
  CK(cudaMemset(g_counters, 0, 65536 * sizeof(int32_t)));
  if (profile_prefill) {
    Problem<__nv_bfloat16> pr(32, 8, 128, {{0, 2048}}, rng, false);
    CK(cudaDeviceSynchronize());
    CK(cudaProfilerStart());
    CK(launch_tensor_core<__nv_bfloat16>(pr.params(), nullptr));
    CK(cudaDeviceSynchronize());
    CK(cudaProfilerStop());
    return 0;
  }

  // Correctness: mixed steps (fresh prompts, cached prefixes with chunks, decodes), decode-only
  // steps over long and odd contexts, GQA 8:1, 4:1, 2:1 and MHA, head_dim 64 and 128.
  const std::vector<Seq> mixed = {{0, 37}, {20, 5}, {99, 1}, {300, 77}, {0, 200}, {63, 65}, {0, 1}};
  std::vector<Seq> decode;
  for (int s = 0; s < 40; ++s) {
    const int pick[] = {1, 63, 64, 65, 700, 129, 17, 300};
    decode.push_back({pick[s % 8] + s / 8 - 1, 1});
  }
  const std::vector<Seq> few = {{0, 1}, {63, 1}, {700, 1}, {2000, 1}, {128, 1}};
  struct Shape {
    int hq, hkv, d;
  };
  for (const Shape& sh : {Shape{32, 8, 128}, Shape{64, 8, 128}, Shape{8, 4, 64}, Shape{4, 4, 64}, Shape{16, 8, 128}}) {
    const int hq = sh.hq, hkv = sh.hkv, d = sh.d;
    check_case<__nv_bfloat16>("mixed", hq, hkv, d, mixed, rng);
    check_case<__nv_bfloat16>("decode 40", hq, hkv, d, decode, rng);
    check_case<__nv_bfloat16>("decode 5 (splits)", hq, hkv, d, few, rng);
  }
  check_case<__half>("mixed", 32, 8, 128, mixed, rng);
  check_case<__half>("decode 5 (splits)", 32, 8, 128, few, rng);
  check_case<__nv_bfloat16>("prefill 1000 + 1000 cached", 32, 8, 128, {{1000, 1000}}, rng);
  for (const Shape& sh : {Shape{32, 8, 128}, Shape{8, 4, 64}}) {
    check_early_kv<__nv_bfloat16>("decode 40", sh.hq, sh.hkv, sh.d, decode, rng);
    check_early_kv<__nv_bfloat16>("decode 5 (splits)", sh.hq, sh.hkv, sh.d, few, rng);
  }
  check_early_kv<__half>("decode 5 (splits)", 32, 8, 128, few, rng);
  check_early_kv<__nv_bfloat16>("decode 3 (one and two positions)", 32, 8, 128, {{0, 1}, {1, 1}, {64, 1}}, rng);

  const double bw = harness::copy_bandwidth();
  std::printf("copy bandwidth %.0f GB/s\n", bw / 1e9);
  // The dense BF16 tensor-core rate: cuBLASLt's best 8192^3 GEMM, the yardstick of prefill TFLOP/s.
  double tc_rate = 0;
  {
    constexpr int64_t kN = 8192;
    void *a = nullptr, *b = nullptr, *c = nullptr;
    CK(cudaMalloc(&a, kN * kN * 2));
    CK(cudaMalloc(&b, kN * kN * 2));
    CK(cudaMalloc(&c, kN * kN * 2));
    CK(cudaMemset(a, 0x3c, kN * kN * 2));  // ~1.1: finite products, no denormal shortcuts
    CK(cudaMemset(b, 0x3c, kN * kN * 2));
    harness::Lt lt;
    const double us = lt.time(a, 1, kN * kN, b, c, kN, kN, kN);
    tc_rate = 2.0 * kN * kN * kN / (us * 1e-6);
    for (void* q : {a, b, c}) cudaFree(q);
  }
  std::printf("BF16 tensor-core rate (cuBLASLt 8192^3) %.1f TFLOP/s\n", tc_rate / 1e12);
  using T = __nv_bfloat16;
  std::printf("%-36s %10s %10s %8s %10s %8s %10s %8s\n", "case (Llama-3.1-8B layer)", "cc us", "tc us", "speedup", "TFLOP/s",
              "bw frac", "mma.sync", "tc frac");
  auto bench = [&](const std::string& name, std::vector<Seq> seqs, bool decode_step) {
    Problem<T> pr(32, 8, 128, std::move(seqs), rng, false);
    const int iters = quick ? 5 : 20;
    const double cc = time_us(pr, launch_cuda_core<T>, decode_step ? iters : std::max(2, iters / 5));
    const double tc = time_us(pr, launch_tensor_core<T>, iters);
    const double tflops = pr.flops() / (tc * 1e-6) / 1e12;
    const double frac = pr.kv_bytes() / (tc * 1e-6) / bw;
    // Prefill: the mma.sync (sm_80) kernel's time beside the backend's, and the backend's share of
    // the dense tensor-core rate.
    const double ms = decode_step ? 0.0 : time_us(pr, launch_mma_sync<T>, iters);
    std::printf("%-36s %10.1f %10.1f %7.2fx %10.1f %8.3f %10.1f %8.3f\n", name.c_str(), cc, tc, cc / tc, tflops, frac, ms,
                tflops * 1e12 / tc_rate);
  };
  bench("prefill 2048", {{0, 2048}}, false);
  bench("prefill 8192", {{0, 8192}}, false);
  bench("prefill 4 x 512", {{0, 512}, {0, 512}, {0, 512}, {0, 512}}, false);
  bench("chunk 512 after 4096 cached", {{4096, 512}}, false);
  for (int ctx : {512, 8192}) {
    for (int b : {1, 8, 32, 128}) {
      if (ctx == 8192 && b == 128) continue;
      bench("decode b" + std::to_string(b) + " ctx " + std::to_string(ctx), std::vector<Seq>(b, Seq{ctx - 1, 1}), true);
    }
  }
  std::printf("tuning variants (us per layer)\n");
  auto variants = [&](const std::string& name, std::vector<Seq> seqs, const std::vector<std::pair<const char*, Launch>>& fs) {
    Problem<T> pr(32, 8, 128, std::move(seqs), rng, false);
    std::printf("%-36s", name.c_str());
    for (const auto& [label, f] : fs) std::printf(" %s %.1f", label, time_us(pr, f, quick ? 5 : 20));
    std::printf("\n");
  };
  const std::vector<std::pair<const char*, Launch>> pf = {
      {"w8s2", prefill_variant<8, 2>},           {"w8s3", prefill_variant<8, 3>},
      {"w4s2m2", prefill_variant<4, 2, 2>},      {"w4s3m2", prefill_variant<4, 3, 2>},
      {"w4s2m2n32", prefill_variant<4, 2, 2, 32>}, {"w8s2m2", prefill_variant<8, 2, 2>},
      {"w8s2m2n32", prefill_variant<8, 2, 2, 32>}};
  std::vector<std::pair<const char*, Launch>> wf = {
      {"g2n64s4", wgmma_variant<2, 64, 4>},           {"g2n128s3", wgmma_variant<2, 128, 3>},
      {"g2n128s3lazy", wgmma_variant<2, 128, 3, 1, true>}, {"g3n64s3", wgmma_variant<3, 64, 3>},
      {"g3n64s4", wgmma_variant<3, 64, 4>},           {"g3n64s4lazy", wgmma_variant<3, 64, 4, 1, true>},
      {"g3n96s3lazy", wgmma_variant<3, 96, 3, 1, true>}};
  {  // only where this build has the sm_90a kernel and the GPU runs it (not an sm_80 build's PTX)
    Problem<T> pr(32, 8, 128, {{0, 64}}, rng);
    if (prop.major != 9 || wf.front().second(pr.params(), nullptr) == cudaErrorNotSupported) wf.clear();
    CK(cudaDeviceSynchronize());
  }
  using Variants = std::vector<std::pair<const char*, Launch>>;
  for (const Variants* list : std::initializer_list<const Variants*>{&wf, &pf}) {
    for (const auto& [label, f] : *list) {  // each variant against the reference first
      for (const std::vector<Seq>& seqs : {mixed, std::vector<Seq>{{1000, 1000}}, std::vector<Seq>{{0, 333}, {17, 1}}}) {
        Problem<T> pr(32, 8, 128, seqs, rng);
        CK(f(pr.params(), nullptr));
        CK(cudaDeviceSynchronize());
        pr.check(std::string("prefill variant ") + label);
      }
    }
  }
  const std::vector<std::pair<const char*, Launch>> df = {{"s2", decode_variant<2>}, {"s3", decode_variant<3>}, {"s2mb3", decode_variant<2, 3>}, {"s3mb2", decode_variant<3, 2>}};
  variants("prefill 2048", {{0, 2048}}, pf);
  variants("prefill 8192", {{0, 8192}}, pf);
  if (!wf.empty()) {
    variants("prefill 2048", {{0, 2048}}, wf);
    variants("prefill 8192", {{0, 8192}}, wf);
    variants("prefill 4 x 512", {{0, 512}, {0, 512}, {0, 512}, {0, 512}}, wf);
    variants("chunk 512 after 4096 cached", {{4096, 512}}, wf);
  }
  variants("decode b1 ctx 512", std::vector<Seq>(1, Seq{511, 1}), df);
  variants("decode b8 ctx 512", std::vector<Seq>(8, Seq{511, 1}), df);
  variants("decode b32 ctx 512", std::vector<Seq>(32, Seq{511, 1}), df);
  variants("decode b128 ctx 512", std::vector<Seq>(128, Seq{511, 1}), df);
  variants("decode b32 ctx 8192", std::vector<Seq>(32, Seq{8191, 1}), df);
  // Splits merged by the decode kernel's last split (the backend) or by combine_kernel.
  const std::vector<std::pair<const char*, Launch>> mf = {{"combine_kernel", decode_combine_kernel<T>},
                                                          {"merged_in_kernel", launch_tensor_core<T>}};
  // The cache read before the wait (the backend with SHARDSERVE_EARLY_KV=1) or after it.
  const std::vector<std::pair<const char*, Launch>> ef = {{"after_wait", launch_tensor_core<T>},
                                                          {"early_kv", decode_early_kv<T>}};
  for (int ctx : {512, 8192}) {
    for (int b : {1, 8, 32, 128}) {
      if (ctx == 8192 && b == 128) continue;
      variants("decode b" + std::to_string(b) + " ctx " + std::to_string(ctx), std::vector<Seq>(b, Seq{ctx - 1, 1}), ef);
    }
  }
  variants("decode b1 ctx 512", std::vector<Seq>(1, Seq{511, 1}), mf);
  variants("decode b8 ctx 512", std::vector<Seq>(8, Seq{511, 1}), mf);
  variants("decode b1 ctx 8192", std::vector<Seq>(1, Seq{8191, 1}), mf);
  // Split counts around attention_splits.h's choice, at 512 and at the 513-522 positions of the
  // engine benchmark's decode steps after a 512-token prompt (a ninth, nearly empty tile).
  const std::vector<std::pair<const char*, Launch>> sf = {
      {"splits1", decode_splits<1>}, {"2", decode_splits<2>}, {"3", decode_splits<3>}, {"4", decode_splits<4>},
      {"8", decode_splits<8>}};
  for (int ctx : {512, 520}) {
    for (int b : {32, 128}) {
      variants("decode b" + std::to_string(b) + " ctx " + std::to_string(ctx), std::vector<Seq>(b, Seq{ctx - 1, 1}), sf);
    }
  }
  std::printf("%s: %d failed checks\n", g_failures ? "FAIL" : "PASS", g_failures);
  return g_failures ? 1 : 0;
}
