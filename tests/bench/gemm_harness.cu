// Standalone harness for the decode-sized GEMM (kernels/skinny_gemm.cu, included whole): checked
// against a double-precision CPU reference on random inputs in every configuration (CTAs per SM,
// stages), then timed in each beside cuBLASLt (the best of its heuristic's first 8 answers, each
// timed) at Llama-3.1 8B and 70B decode shapes.
//
//   nvcc -std=c++20 -O3 -arch=sm_90a -I. --expt-relaxed-constexpr tests/bench/gemm_harness.cu \
//        -lcublasLt -o gemm_harness && ./gemm_harness
//
// Prints per shape and token count: microseconds for the fastest configuration and cuBLASLt, the
// weight bytes' fraction of a device-to-device copy's bandwidth measured in the same run, the
// speedup, then every configuration's time; exits non-zero when a check fails (relative error
// above 1e-2) or a call leaves a split counter non-zero.
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <iterator>
#include <random>
#include <vector>

#include "kernels/skinny_gemm.cu"
#include "tests/bench/cublaslt_timing.h"
#include "tests/bench/gpu_timing.h"

using namespace shardserve;
using namespace shardserve::kernels;

namespace {

int g_failures = 0;

}  // namespace

int main() {
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const double bw = harness::copy_bandwidth();
  std::printf("%d SMs, copy bandwidth %.0f GB/s\n", sms, bw / 1e9);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  harness::Lt lt;
  float* ws = nullptr;
  const size_t ws_bytes = size_t{32} << 20;
  CK(cudaMalloc(&ws, ws_bytes));
  int32_t* counters = nullptr;
  CK(cudaMalloc(&counters, kSkinnyGemmCounters * sizeof(int32_t)));
  CK(cudaMemset(counters, 0, kSkinnyGemmCounters * sizeof(int32_t)));
  // The backend's configurations (kernels.h), and two with more CTAs an SM that it leaves out.
  using Config = SkinnyGemmConfig;
  std::vector<Config> configs(std::begin(kSkinnyGemmConfigs), std::end(kSkinnyGemmConfigs));
  configs.push_back({6, 4});
  configs.push_back({8, 4});

  // Correctness: odd token counts, one and several splits, BF16 and F32 outputs.
  struct Check {
    int64_t t, n, k;
  };
  for (const Check c : {Check{9, 128, 64}, Check{13, 4096, 4096}, Check{33, 1024, 14336}, Check{100, 6144, 4096},
                        Check{128, 192, 512}, Check{64, 28672, 4096}}) {
    std::vector<__nv_bfloat16> x(c.t * c.k), w(c.n * c.k);
    for (auto& v : x) v = __float2bfloat16_rn(u(rng));
    for (auto& v : w) v = __float2bfloat16_rn(u(rng) * 0.05f);
    void *dx, *dw, *dy;
    CK(cudaMalloc(&dx, x.size() * 2));
    CK(cudaMalloc(&dw, w.size() * 2));
    CK(cudaMalloc(&dy, c.t * c.n * 4));
    CK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    for (const Config cf : configs) {
      const SkinnyGemmShape s = skinny_gemm_shape(c.t, c.n, c.k, sms, ws_bytes, cf.ctas_per_sm, cf.stages);
      if (!s.valid) continue;  // eight stages above 64 tokens
      for (const DType out : {DType::kBF16, DType::kF32}) {
        CK(cudaMemset(dy, 0xff, c.t * c.n * 4));
        CK(skinny_gemm(s, dx, dw, dy, DType::kBF16, out, ws, counters, nullptr));
        CK(cudaDeviceSynchronize());
        std::vector<float> y(c.t * c.n);
        if (out == DType::kF32) {
          CK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
        } else {
          std::vector<__nv_bfloat16> yb(c.t * c.n);
          CK(cudaMemcpy(yb.data(), dy, yb.size() * 2, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < y.size(); ++i) y[i] = __bfloat162float(yb[i]);
        }
        double err = 0, scale = 1e-6;
        for (int64_t r = 0; r < c.t; ++r) {
          for (int64_t j = 0; j < c.n; j += (c.n > 2048 ? 7 : 1)) {
            double ref = 0;
            for (int64_t i = 0; i < c.k; ++i) ref += double(__bfloat162float(x[r * c.k + i])) * __bfloat162float(w[j * c.k + i]);
            err = std::max(err, std::abs(ref - y[r * c.n + j]));
            scale = std::max(scale, std::abs(ref));
          }
        }
        std::vector<int32_t> left(kSkinnyGemmCounters);
        CK(cudaMemcpy(left.data(), counters, left.size() * 4, cudaMemcpyDeviceToHost));
        const bool zero = std::all_of(left.begin(), left.end(), [](int32_t v) { return v == 0; });
        const bool ok = err / scale < 1e-2 && std::isfinite(err) && zero;
        g_failures += !ok;
        if (!ok || cf.ctas_per_sm == 2) {
          std::printf("%-4s T=%-4lld N=%-6lld K=%-6lld ctas/SM %d stages %d splits %lld out %s: max error / max |y| %.2e%s\n",
                      ok ? "ok" : "FAIL", (long long)c.t, (long long)c.n, (long long)c.k, cf.ctas_per_sm, cf.stages,
                      (long long)s.splits, out == DType::kF32 ? "f32" : "bf16", err / scale,
                      zero ? "" : " (counters left non-zero)");
        }
      }
    }
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
  }

  // Timing: the weight cycles through enough copies (>= 256 MB) that L2 holds none of it.
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  std::printf("%-12s %5s %-10s %10s %10s %8s %8s %8s   %s\n", "shape", "T", "best", "ours us", "lt us", "ours bw",
              "lt bw", "speedup", "every configuration: ctas/SM x stages (splits) us");
  for (const Shape sh : {Shape{"8B qkv", 6144, 4096}, Shape{"8B o", 4096, 4096}, Shape{"8B gate_up", 28672, 4096},
                         Shape{"8B down", 4096, 14336}, Shape{"70B qkv", 10240, 8192}, Shape{"70B o", 8192, 8192},
                         Shape{"70B gate_up", 57344, 8192}, Shape{"70B down", 8192, 28672}}) {
    const size_t w_elems = sh.n * sh.k;
    const int copies = std::max<int>(1, static_cast<int>((256 << 20) / (w_elems * 2)) + 1);
    void *dw, *dx, *dy;
    CK(cudaMalloc(&dw, w_elems * 2 * copies));
    CK(cudaMemset(dw, 0, w_elems * 2 * copies));
    CK(cudaMalloc(&dx, 128 * sh.k * 2));
    CK(cudaMemset(dx, 0, 128 * sh.k * 2));
    CK(cudaMalloc(&dy, 128 * sh.n * 4));
    for (const int64_t t : {9, 16, 32, 64, 128}) {
      double best = 1e30;
      char best_name[32] = "", all[640] = "";
      for (const Config cf : configs) {
        const SkinnyGemmShape s = skinny_gemm_shape(t, sh.n, sh.k, sms, ws_bytes, cf.ctas_per_sm, cf.stages);
        if (!s.valid) continue;
        const double us = harness::time_us([&](int it) {
          CK(skinny_gemm(s, dx, static_cast<__nv_bfloat16*>(dw) + (it % copies) * w_elems, dy, DType::kBF16,
                         DType::kBF16, ws, counters, nullptr));
        }, 50);
        std::snprintf(all + std::strlen(all), sizeof(all) - std::strlen(all), " %dx%d(%lld) %.1f", cf.ctas_per_sm,
                      cf.stages, (long long)s.splits, us);
        if (us < best) {
          best = us;
          std::snprintf(best_name, sizeof(best_name), "%dx%d", cf.ctas_per_sm, cf.stages);
        }
      }
      const double theirs = lt.time(dw, copies, w_elems, dx, dy, t, sh.n, sh.k);
      const double bytes = w_elems * 2.0;
      std::printf("%-12s %5lld %-10s %10.1f %10.1f %8.3f %8.3f %7.2fx  %s\n", sh.name, (long long)t, best_name, best,
                  theirs, bytes / (best * 1e-6) / bw, bytes / (theirs * 1e-6) / bw, theirs / best, all);
    }
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dy);
  }
  std::printf("%s: %d failed checks\n", g_failures ? "FAIL" : "PASS", g_failures);
  return g_failures ? 1 : 0;
}
