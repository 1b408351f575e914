// Standalone harness for the quantized tensor-core GEMM (kernels/quant_gemm.cu, included whole):
// every compiled configuration, INT4, INT8 and FP8, checked against a double-precision CPU
// reference of the canonical definitions (kernels.h's QuantWeightView: INT4 (q - zero) * scale per
// group, act-order g_idx included; INT8 q * scale and FP8 e4m3(q) * scale per row), then timed
// beside cuBLASLt's best BF16 GEMM of the same shape at Llama-3.1 8B and 70B layer shapes (INT4
// group 128 with FP16 scales, as AWQ ships them).
//
//   nvcc -std=c++20 -O3 -arch=sm_90a -I. --expt-relaxed-constexpr tests/bench/quant_gemm_harness.cu \
//        -lcublasLt -o quant_gemm_harness && ./quant_gemm_harness [--no-timing]
//   [--no-check] [--formats int4,int8,fp8] [--shapes SUBSTRING, e.g. 70B]
//   [--profile: no timing; one call of the tuned configuration at 1 and 8 tokens per shape between
//    cudaProfilerStart/Stop, for ncu --profile-from-start off]
//
// Prints the first, a middle and the largest token count of each check (relative error = max
// |error| / max |y|; the tolerance 1e-2 is the BF16 output's rounding plus, for INT4, the scale's
// rounding to the activation type, see quant_gemm.cu) and every failure; then per format, shape
// and token count the best configuration's time, the time of the one quant_mma_tune() picks, the
// best of the streaming kernel alone (what the tiled kernel gains), cuBLASLt's, the speedup and the
// fraction of the copy bandwidth (measured in the same run) the packed weights and scales are read
// at; each timing also as a JSON line starting "record:".
// Exits non-zero when a check fails.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "kernels/quant_gemm.cu"
#include <cuda_profiler_api.h>
#include "tests/bench/cublaslt_timing.h"
#include "tests/bench/gpu_timing.h"
#include "tests/bench/host_16bit.h"

using namespace shardserve;
using namespace shardserve::kernels;

namespace {

int g_failures = 0;
std::string g_shape_filter;  // --shapes: only the shapes whose name contains it

// E4M3 (sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities) as a double.
double e4m3(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (b & 0x80) ? -v : v;
}

const char* format_name(QuantFormat f) {
  return f == QuantFormat::kInt4 ? "int4" : f == QuantFormat::kInt8 ? "int8" : "fp8";
}

// A canonical INT4, INT8 or FP8 weight on the host and on the device, and its repacked form (FP8:
// read in place).
struct HostWeight {
  QuantFormat format = QuantFormat::kInt4;
  int64_t n = 0, k = 0, group = 0, groups = 0;
  bool act_order = false, f16_scales = true;
  std::vector<uint32_t> words;   // INT4 [N, K/8]
  std::vector<int8_t> bytes;     // INT8 / FP8 [N, K]
  std::vector<float> scales;     // INT4 [N, G] (the values the device holds), INT8 / FP8 [N]
  std::vector<uint8_t> zeros;    // INT4 [N, G]
  std::vector<int32_t> g_idx;    // INT4 [K] when act_order
  void *d_weight = nullptr, *d_scales = nullptr, *d_zeros = nullptr, *d_g_idx = nullptr;
  void *d_packed = nullptr, *d_scale_zero = nullptr, *d_perm = nullptr;

  double at(int64_t r, int64_t f) const {
    if (format == QuantFormat::kInt8) return bytes[r * k + f] * static_cast<double>(scales[r]);
    if (format == QuantFormat::kFp8) return e4m3(static_cast<uint8_t>(bytes[r * k + f])) * static_cast<double>(scales[r]);
    const int q = static_cast<int>((words[r * (k / 8) + f / 8] >> (4 * (f % 8))) & 0xF);
    const int64_t i = r * groups + (act_order ? g_idx[f] : f / group);
    return (q - zeros[i]) * static_cast<double>(scales[i]);
  }
  QuantWeightView view() const {
    QuantWeightView v;
    v.format = format;
    v.weight = d_weight;
    v.scales = d_scales;
    v.scales_f16 = format == QuantFormat::kInt4 && f16_scales;
    v.zeros = static_cast<const uint8_t*>(d_zeros);
    v.g_idx = static_cast<const int32_t*>(d_g_idx);
    v.group_size = group;
    v.num_groups = groups;
    v.n = n;
    v.k = k;
    return v;
  }
  QuantMmaView mma_view(DType dtype) const {
    return QuantMmaView{format, format == QuantFormat::kFp8 ? d_weight : d_packed,
                        format == QuantFormat::kInt4 ? d_scale_zero : d_scales,
                        static_cast<const int32_t*>(d_perm), n, k, group, groups, dtype};
  }
  void free_all() {
    for (void* p : {d_weight, d_scales, d_zeros, d_g_idx, d_packed, d_scale_zero, d_perm}) cudaFree(p);
  }
};

template <typename V>
void* upload(const std::vector<V>& v) {
  void* d = nullptr;
  CK(cudaMalloc(&d, v.size() * sizeof(V)));
  CK(cudaMemcpy(d, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
  return d;
}

HostWeight make_weight(QuantFormat format, int64_t n, int64_t k, int64_t group, bool act_order, bool f16_scales,
                       DType dtype, std::mt19937& rng) {
  HostWeight w;
  w.format = format;
  w.n = n;
  w.k = k;
  if (format != QuantFormat::kInt4) {
    w.bytes.resize(n * k);
    for (auto& v : w.bytes) {
      v = static_cast<int8_t>(rng() % 256 - 128);
      if (format == QuantFormat::kFp8 && (v & 0x7F) == 0x7F) v = 0;  // E4M3's NaN codes
    }
    std::uniform_real_distribution<float> s(0.0005f, 0.002f);
    for (int64_t r = 0; r < n; ++r) w.scales.push_back(s(rng));
    w.d_weight = upload(w.bytes);
    w.d_scales = upload(w.scales);
  } else {
    w.group = group;
    w.groups = (k + group - 1) / group;
    w.act_order = act_order;
    w.f16_scales = f16_scales;
    w.words.resize(n * k / 8);
    for (auto& v : w.words) v = rng();
    std::uniform_real_distribution<float> s(0.005f, 0.02f);
    for (int64_t i = 0; i < n * w.groups; ++i) {
      w.scales.push_back(f16_scales ? __half2float(__float2half_rn(s(rng))) : s(rng));
      w.zeros.push_back(static_cast<uint8_t>(rng() % 16));
    }
    std::vector<__half> scales_f16(w.scales.size());
    for (size_t i = 0; i < w.scales.size(); ++i) scales_f16[i] = __float2half_rn(w.scales[i]);
    if (act_order) {  // GPTQ desc_act: input f belongs to group (its rank in a random order) / group
      std::vector<int32_t> order(k);
      for (int64_t i = 0; i < k; ++i) order[i] = static_cast<int32_t>(i);
      std::shuffle(order.begin(), order.end(), rng);
      w.g_idx.resize(k);
      for (int64_t r = 0; r < k; ++r) w.g_idx[order[r]] = static_cast<int32_t>(r / group);
    }
    w.d_weight = upload(w.words);
    w.d_scales = f16_scales ? upload(scales_f16) : upload(w.scales);
    w.d_zeros = upload(w.zeros);
    if (act_order) {
      w.d_g_idx = upload(w.g_idx);
      const auto perm = int4_act_order_permutation(w.g_idx, group);
      if (!perm) {
        std::fprintf(stderr, "act-order permutation refused a GPTQ g_idx\n");
        std::exit(2);
      }
      w.d_perm = upload(*perm);
    }
    CK(cudaMalloc(&w.d_scale_zero, int4_mma_scale_zero_bytes(n, w.groups)));
  }
  if (format != QuantFormat::kFp8) {
    CK(cudaMalloc(&w.d_packed, quant_mma_packed_bytes(format, n, k)));
    CK(quant_mma_repack(w.view(), static_cast<const int32_t*>(w.d_perm), dtype, w.d_packed, w.d_scale_zero, nullptr));
  }
  return w;
}

// The tiled kernel's split-K partials and counters, as the CUDA backend gives them (32 MB).
QuantMmaWorkspace workspace() {
  static const QuantMmaWorkspace ws = [] {
    QuantMmaWorkspace w;
    w.bytes = size_t{32} << 20;
    CK(cudaMalloc(&w.partials, w.bytes));
    CK(cudaMalloc(&w.counters, kSkinnyGemmCounters * sizeof(int32_t)));
    CK(cudaMemset(w.counters, 0, kSkinnyGemmCounters * sizeof(int32_t)));
    return w;
  }();
  return ws;
}

std::string config_name(const QuantMmaConfig& c) {
  if (c.ctas_per_sm > 0) {
    return std::to_string(c.token_tiles) + "x8tok/tiled/" + std::to_string(c.row_tiles) + "x16rows/" +
           std::to_string(c.depth) + "stages/" + std::to_string(c.ctas_per_sm) + "ctas";
  }
  char buf[80];
  std::snprintf(buf, sizeof buf, "%dx8tok/%dx16rows/%dwarpsN/%dwarpsK/depth%d%s%s", c.token_tiles, c.row_tiles,
                c.warps_n, c.warps_k, c.depth, c.stage_x ? "/smem-x" : "",
                c.min_blocks > 1 ? ("/" + std::to_string(c.min_blocks) + "ctas").c_str() : "");
  return buf;
}

template <typename T>
void check_shape(QuantFormat format, int64_t n, int64_t k, int64_t group, bool act_order, bool f16_scales,
                 std::mt19937& rng) {
  const DType dtype = std::is_same_v<T, __nv_bfloat16> ? DType::kBF16 : DType::kF16;
  HostWeight w = make_weight(format, n, k, group, act_order, f16_scales, dtype, rng);
  CK(cudaDeviceSynchronize());
  std::vector<double> dense(n * k);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t f = 0; f < k; ++f) dense[r * k + f] = w.at(r, f);
  }
  if (format != QuantFormat::kFp8) {  // the dense weight back from the packed layout (steps above 128 tokens)
    void* dd = nullptr;
    CK(cudaMalloc(&dd, n * k * sizeof(T)));
    CK(quant_mma_dequantize(w.mma_view(dtype), dd, nullptr));
    std::vector<T> got(n * k);
    CK(cudaMemcpy(got.data(), dd, got.size() * sizeof(T), cudaMemcpyDeviceToHost));
    cudaFree(dd);
    double err = 0, scale = 1e-9;
    for (int64_t i = 0; i < n * k; ++i) {
      scale = std::max(scale, std::abs(dense[i]));
      const double e = std::abs(dense[i] - harness::host_f32(got[i]));
      err = std::isfinite(e) ? std::max(err, e) : INFINITY;
    }
    const bool ok = err / scale < 1e-2;
    g_failures += !ok;
    std::printf("%-4s %s N=%lld K=%lld dequantized from the packed layout: rel error %.2e\n", ok ? "ok" : "FAIL",
                format_name(format), (long long)n, (long long)k, err / scale);
  }
  const int64_t max_t = kMaxQuantMmaTokens;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<T> x(max_t * k);
  for (auto& v : x) v = harness::host_from<T>(u(rng));
  void* dx = upload(x);
  void *dy = nullptr, *dxp = nullptr;
  CK(cudaMalloc(&dy, max_t * n * 4));
  CK(cudaMalloc(&dxp, max_t * k * sizeof(T)));
  const int64_t row_step = n > 2048 ? 7 : 1;
  char what[128];
  std::snprintf(what, sizeof what, "%s %s N=%lld K=%lld", format_name(format),
                dtype == DType::kBF16 ? "bf16" : "f16", (long long)n, (long long)k);
  std::string desc = what;
  if (format == QuantFormat::kInt4) {
    desc += " g" + std::to_string(group) + (act_order ? " act-order" : "") + (f16_scales ? "" : " f32-scales");
  }
  for (const int64_t t : {1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100, 128}) {
    std::vector<double> ref(t * n, 0.0);
    double scale = 1e-6;
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t r = 0; r < n; r += row_step) {
        double s = 0;
        for (int64_t f = 0; f < k; ++f) s += static_cast<double>(harness::host_f32(x[i * k + f])) * dense[r * k + f];
        ref[i * n + r] = s;
        scale = std::max(scale, std::abs(s));
      }
    }
    for (const QuantMmaConfig& cfg : quant_mma_configs()) {
      if (!quant_mma_config_fits(cfg, format, n, t)) continue;
      for (const DType out : {dtype, DType::kF32}) {
        CK(cudaMemset(dy, 0xff, t * n * 4));
        CK(quant_mma_gemm(w.mma_view(dtype), dx, t, dy, out, dxp, nullptr, &cfg, workspace()));
        CK(cudaDeviceSynchronize());
        std::vector<float> y(t * n);
        if (out == DType::kF32) {
          CK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
        } else {
          std::vector<T> yt(t * n);
          CK(cudaMemcpy(yt.data(), dy, yt.size() * sizeof(T), cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < y.size(); ++i) y[i] = harness::host_f32(yt[i]);
        }
        double err = 0;
        for (int64_t i = 0; i < t; ++i) {
          for (int64_t r = 0; r < n; r += row_step) {
            const double e = std::abs(ref[i * n + r] - y[i * n + r]);
            err = std::isfinite(e) ? std::max(err, e) : INFINITY;
          }
        }
        const bool ok = err / scale < 1e-2;
        g_failures += !ok;
        if (!ok || t == 1 || t == 33 || t == 128) {
          std::printf("%-4s %s T=%-3lld %-50s out %-4s: rel error %.2e\n", ok ? "ok" : "FAIL", desc.c_str(),
                      (long long)t, config_name(cfg).c_str(), out == DType::kF32 ? "f32" : "16b", err / scale);
        }
      }
    }
  }
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(dxp);
  w.free_all();
}

void time_shapes(QuantFormat format, double bw, const char* device, bool profile) {
  harness::Lt lt;
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const char* fmt = format_name(format);
  std::printf("%-5s %-12s %4s %9s %9s %9s %9s %8s %8s  %s\n", "", "shape", "T", "best us", "pick us", "stream us",
              "bf16 us", "speedup",
              "bw", "best config");
  for (const Shape sh : {Shape{"8B qkv", 6144, 4096}, Shape{"8B o", 4096, 4096}, Shape{"8B gate_up", 28672, 4096},
                         Shape{"8B down", 4096, 14336}, Shape{"70B qkv", 10240, 8192}, Shape{"70B o", 8192, 8192},
                         Shape{"70B gate_up", 57344, 8192}, Shape{"70B down", 8192, 28672}}) {
    if (std::string(sh.name).find(g_shape_filter) == std::string::npos) continue;
    const size_t packed = quant_mma_packed_bytes(format, sh.n, sh.k);
    const size_t sz = format == QuantFormat::kInt4 ? int4_mma_scale_zero_bytes(sh.n, sh.k / 128) : sh.n * 4;
    const int copies = std::max<int>(1, static_cast<int>((size_t{256} << 20) / packed) + 1);
    void *dp, *dsz, *dx, *dy, *dw16;
    CK(cudaMalloc(&dp, packed * copies));
    CK(cudaMemset(dp, 0x5a, packed * copies));
    CK(cudaMalloc(&dsz, sz * copies));
    CK(cudaMemset(dsz, 0x3c, sz * copies));  // finite scales and zeros in any of the types
    CK(cudaMalloc(&dx, kMaxQuantMmaTokens * sh.k * 2));
    CK(cudaMemset(dx, 0x3c, kMaxQuantMmaTokens * sh.k * 2));
    CK(cudaMalloc(&dy, kMaxQuantMmaTokens * sh.n * 4));
    const size_t w_elems = sh.n * sh.k;
    const int copies16 = std::max<int>(1, static_cast<int>((size_t{256} << 20) / (w_elems * 2)) + 1);
    CK(cudaMalloc(&dw16, w_elems * 2 * copies16));
    CK(cudaMemset(dw16, 0, w_elems * 2 * copies16));
    // What a served model runs: the configurations quant_mma_tune measures best on this GPU.
    CK(quant_mma_tune(QuantMmaView{format, dp, dsz, nullptr, sh.n, sh.k, 128, sh.k / 128, DType::kBF16}, nullptr,
                      workspace()));
    if (profile) {
      // One call of each token count's picked configuration, for Nsight Compute
      // (--profile-from-start off).
      for (const int64_t t : {1, 8}) {
        CK(cudaDeviceSynchronize());
        CK(cudaProfilerStart());
        CK(quant_mma_gemm(QuantMmaView{format, dp, dsz, nullptr, sh.n, sh.k, 128, sh.k / 128, DType::kBF16}, dx, t, dy,
                          DType::kBF16, nullptr, nullptr, nullptr, workspace()));
        CK(cudaDeviceSynchronize());
        CK(cudaProfilerStop());
      }
      for (void* p : {dp, dsz, dx, dy, dw16}) cudaFree(p);
      continue;
    }
    for (const int64_t t : {1, 4, 8, 16, 32, 64, 128}) {
      auto run = [&](const QuantMmaConfig* cfg) {
        return harness::time_us([&](int it) {
          const QuantMmaView v{format, static_cast<uint8_t*>(dp) + (it % copies) * packed,
                               static_cast<uint8_t*>(dsz) + (it % copies) * sz, nullptr, sh.n, sh.k, 128,
                               sh.k / 128, DType::kBF16};
          CK(quant_mma_gemm(v, dx, t, dy, DType::kBF16, nullptr, nullptr, cfg, workspace()));
        }, 50);
      };
      double best = 1e30, best_streaming = 1e30;
      QuantMmaConfig best_cfg;
      for (const QuantMmaConfig& cfg : quant_mma_candidates(format, sh.n, t)) {
        const double us = run(&cfg);
        if (cfg.ctas_per_sm == 0) best_streaming = std::min(best_streaming, us);
        if (us < best) {
          best = us;
          best_cfg = cfg;
        }
      }
      const double pick = run(nullptr);
      const double bf16 = lt.time(dw16, copies16, w_elems, dx, dy, t, sh.n, sh.k);
      const double frac = (packed + sz) / (best * 1e-6) / bw;
      std::printf("%-5s %-12s %4lld %9.1f %9.1f %9.1f %9.1f %7.2fx %8.3f  %s\n", fmt, sh.name, (long long)t, best, pick,
                  best_streaming, bf16, bf16 / best, frac, config_name(best_cfg).c_str());
      char date[16];
      const std::time_t now = std::time(nullptr);
      std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
      std::printf("record: {\"bench\":\"quant_op\",\"format\":\"%s\",\"quantization\":\"%s\",\"model\":\"%s\","
                  "\"tp_size\":1,\"op\":\"%s\",\"batch\":%lld,\"time_us\":%.2f,\"picked_us\":%.2f,\"bf16_us\":%.2f,"
                  "\"speedup_vs_bf16\":%.3f,\"bandwidth_fraction\":%.3f,\"config\":\"%s\",\"device\":\"%s\","
                  "\"date\":\"%s\"}\n",
                  fmt, fmt, sh.name[0] == '8' ? "llama-3.1-8b" : "llama-3.1-70b", sh.name, (long long)t, best, pick,
                  bf16, bf16 / best, frac, config_name(best_cfg).c_str(), device, date);
    }
    for (void* p : {dp, dsz, dx, dy, dw16}) cudaFree(p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool timing = true, checks = true, profile = false;
  std::string formats = "int4,int8,fp8";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--no-timing") timing = false;
    else if (a == "--no-check") checks = false;
    else if (a == "--profile") profile = true;
    else if (a == "--formats" && i + 1 < argc) formats = argv[++i];
    else if (a == "--shapes" && i + 1 < argc) g_shape_filter = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--no-timing] [--no-check] [--profile] [--formats int4,int8,fp8] "
                           "[--shapes SUBSTRING]\n", argv[0]);
      return 2;
    }
  }
  auto wants = [&](const char* f) { return formats.find(f) != std::string::npos; };
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::mt19937 rng(11);
  // Odd token counts, every configuration, group 32 and 128, act-order, FP16 and FP32 scales, both
  // activation types; the widths are the tiny checkpoints' (64) and Llama's.
  const QuantFormat int4 = QuantFormat::kInt4, int8 = QuantFormat::kInt8, fp8 = QuantFormat::kFp8;
  if (checks && wants("int4")) {
    check_shape<__nv_bfloat16>(int4, 64, 64, 32, false, true, rng);
    check_shape<__nv_bfloat16>(int4, 96, 192, 32, true, true, rng);
    check_shape<__nv_bfloat16>(int4, 1024, 4096, 128, false, true, rng);
    check_shape<__nv_bfloat16>(int4, 4096, 1024, 128, true, false, rng);
    check_shape<__half>(int4, 1024, 4096, 128, false, true, rng);
    check_shape<__half>(int4, 256, 1536, 64, true, true, rng);
  }
  if (checks && wants("int8")) {
    check_shape<__nv_bfloat16>(int8, 64, 64, 0, false, false, rng);
    check_shape<__nv_bfloat16>(int8, 1024, 4096, 0, false, false, rng);
    check_shape<__half>(int8, 4096, 1024, 0, false, false, rng);
  }
  if (checks && wants("fp8")) {
    check_shape<__nv_bfloat16>(fp8, 64, 64, 0, false, false, rng);
    check_shape<__nv_bfloat16>(fp8, 1024, 4096, 0, false, false, rng);
    check_shape<__half>(fp8, 4096, 1024, 0, false, false, rng);
  }
  if (timing || profile) {
    const double bw = harness::copy_bandwidth();
    std::printf("%s, %d SMs, copy bandwidth %.0f GB/s\n", prop.name, prop.multiProcessorCount, bw / 1e9);
    if (wants("int4")) time_shapes(int4, bw, prop.name, profile);
    if (wants("int8")) time_shapes(int8, bw, prop.name, profile);
    if (wants("fp8")) time_shapes(fp8, bw, prop.name, profile);
  }
  std::printf("%s: %d failed checks\n", g_failures ? "FAIL" : "PASS", g_failures);
  return g_failures ? 1 : 0;
}
