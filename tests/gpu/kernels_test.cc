// Every CUDA backend op against the CPU reference backend on random inputs. Inputs are rounded to
// BF16 first and given to both sides, so the only differences are the GPU's BF16 outputs and
// intermediate roundings (the residual stream, normalised values, q/k after RoPE are kept in BF16
// as the reference model keeps them) and summation order: relative errors of a few BF16 ulps
// (2^-8 = 0.4%). Tolerances below are 1-2% of the output's scale for that reason.
// Skipped when no CUDA device is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <set>

#include "kernels/kernels.h"
#include "worker/runtime/cpu_backend.h"
#include "worker/runtime/cuda_backend.h"

namespace shardserve {
namespace {

class KernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto b = CudaBackend::create(0, DType::kBF16);
    if (!b.ok()) GTEST_SKIP() << b.status();
    gpu_ = std::move(*b);
  }

  // Random values rounded to BF16, so both backends see identical inputs.
  std::vector<float> random(int64_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = bf16_to_f32(f32_to_bf16(d(rng_)));
    return v;
  }
  Tensor cpu_f32(const std::vector<float>& v, std::vector<int64_t> shape) {
    return cpu_.upload(HostTensor{v.data(), DType::kF32, std::move(shape)}, DType::kF32);
  }
  Tensor gpu_bf16(const std::vector<float>& v, std::vector<int64_t> shape) {
    return gpu_->upload(HostTensor{v.data(), DType::kF32, std::move(shape)}, DType::kBF16);
  }
  template <typename B>
  Tensor ints(B& be, const std::vector<int32_t>& v) {
    return be.upload(HostTensor{v.data(), DType::kI32, {static_cast<int64_t>(v.size())}}, DType::kI32);
  }
  template <typename B>
  Tensor ints2(B& be, const std::vector<int32_t>& v, int64_t rows) {
    return be.upload(HostTensor{v.data(), DType::kI32, {rows, static_cast<int64_t>(v.size()) / rows}}, DType::kI32);
  }
  // max |gpu - cpu| / max(1e-3, max |cpu|), after checking shapes and that nothing is NaN.
  double rel_error(const Tensor& gpu, const Tensor& cpu) {
    EXPECT_EQ(gpu.shape, cpu.shape);
    const std::vector<float> g = gpu_->download_f32(gpu);
    const std::vector<float> c = cpu_.download_f32(cpu);
    double scale = 1e-3, err = 0.0;
    size_t worst = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      if (std::isnan(g[i])) return INFINITY;
      scale = std::max(scale, std::fabs(double(c[i])));
      if (std::fabs(double(g[i]) - c[i]) > err) {
        err = std::fabs(double(g[i]) - c[i]);
        worst = i;
      }
    }
    if (err / scale > 1e-2) {
      std::printf("worst element %zu of %zu: gpu %g, cpu %g\n", worst, c.size(), g[worst], c[worst]);
    }
    return err / scale;
  }

  std::mt19937 rng_{20261121};
  CpuBackend cpu_{2};
  std::unique_ptr<CudaBackend> gpu_;
};

TEST_F(KernelsTest, EmbeddingOfAVocabShard) {
  const int64_t rows = 50, hidden = 4099;
  const auto table = random(rows * hidden);
  const std::vector<int32_t> ids = {100, 101, 149, 150, 99, 120};  // shard holds ids [100, 150)
  Tensor c_out = cpu_.empty({6, hidden}, DType::kF32);
  Tensor g_out = gpu_->empty({6, hidden}, DType::kBF16);
  cpu_.embedding(ints(cpu_, ids), cpu_f32(table, {rows, hidden}), 100, c_out);
  gpu_->embedding(ints(*gpu_, ids), gpu_bf16(table, {rows, hidden}), 100, g_out);
  EXPECT_EQ(rel_error(g_out, c_out), 0.0);
}

TEST_F(KernelsTest, RmsNormAndFusedResidual) {
  for (int64_t hidden : {64, 4096, 5003}) {
    for (int64_t rows : {1, 3, 17}) {
      const auto x = random(rows * hidden), res = random(rows * hidden), w = random(hidden, 0.5f);
      Tensor c_out = cpu_.empty({rows, hidden}, DType::kF32), g_out = gpu_->empty({rows, hidden}, DType::kBF16);
      cpu_.rmsnorm(cpu_f32(x, {rows, hidden}), cpu_f32(w, {hidden}), 1e-5f, c_out);
      gpu_->rmsnorm(gpu_bf16(x, {rows, hidden}), gpu_bf16(w, {hidden}), 1e-5f, g_out);
      EXPECT_LT(rel_error(g_out, c_out), 1e-2) << hidden << "x" << rows;
      Tensor c_res = cpu_f32(res, {rows, hidden}), g_res = gpu_bf16(res, {rows, hidden});
      cpu_.add_rmsnorm(cpu_f32(x, {rows, hidden}), c_res, cpu_f32(w, {hidden}), 1e-5f, c_out);
      gpu_->add_rmsnorm(gpu_bf16(x, {rows, hidden}), g_res, gpu_bf16(w, {hidden}), 1e-5f, g_out);
      EXPECT_LT(rel_error(g_res, c_res), 1e-2) << "residual " << hidden;
      EXPECT_LT(rel_error(g_out, c_out), 2e-2) << "fused " << hidden << "x" << rows;
    }
  }
}

// Up to 8 tokens go through the decode GEMV, more through cuBLASLt; F32 activations (checking
// mode aside) always through cuBLASLt.
TEST_F(KernelsTest, LinearGemvAndCublasLt) {
  struct Shape { int64_t t, n, k; };
  for (const Shape s : {Shape{1, 96, 64}, Shape{7, 1000, 72}, Shape{64, 4096, 1024}, Shape{3, 6144, 4096},
                        Shape{8, 4096, 14336}, Shape{2, 32003, 512}, Shape{9, 200, 512}, Shape{5, 100, 60}}) {
    const auto x = random(s.t * s.k), w = random(s.n * s.k, 1.0f / std::sqrt(float(s.k)));
    Tensor c_out = cpu_.empty({s.t, s.n}, DType::kF32);
    cpu_.linear(cpu_f32(x, {s.t, s.k}), LinearWeight{cpu_f32(w, {s.n, s.k})}, c_out);
    for (int64_t gemv_max : {int64_t{0}, int64_t{8}}) {  // cuBLASLt only, then the GEMV where it applies
      gpu_->set_gemv_max_tokens(gemv_max);
      for (DType out_dtype : {DType::kBF16, DType::kF32}) {
        Tensor g_out = gpu_->empty({s.t, s.n}, out_dtype);
        gpu_->linear(gpu_bf16(x, {s.t, s.k}), LinearWeight{gpu_bf16(w, {s.n, s.k})}, g_out);
        EXPECT_LT(rel_error(g_out, c_out), out_dtype == DType::kF32 ? 2e-3 : 1e-2)
            << s.t << "x" << s.n << "x" << s.k << " out " << dtype_name(out_dtype) << " gemv_max " << gemv_max;
      }
    }
  }
}

// Rows of 16-byte vectors (f = 1024) and of single elements (f = 3001).
TEST_F(KernelsTest, SiluMul) {
  for (const int64_t f : {3001, 1024}) {
    const int64_t rows = 5;
    const auto gu = random(rows * 2 * f, 2.0f);
    Tensor c_out = cpu_.empty({rows, f}, DType::kF32), g_out = gpu_->empty({rows, f}, DType::kBF16);
    cpu_.silu_mul(cpu_f32(gu, {rows, 2 * f}), c_out);
    gpu_->silu_mul(gpu_bf16(gu, {rows, 2 * f}), g_out);
    EXPECT_LT(rel_error(g_out, c_out), 1e-2) << f;
  }
}

// The gate/up GEMV with SiLU-and-multiply in one kernel (SHARDSERVE_FUSED_SILU) gives bit for bit
// what the GEMV and silu_mul give, and matches the CPU reference; F not a multiple of the four
// rows a CTA takes (the tail's clamped warps) included. The fused kernel leaves the unfused path's
// gate_up buffer alone (so it, not the two kernels, ran); above the GEMV's sizes, where the split-K
// GEMM has no whole tiles it is the two, else whichever the trial picked, against the reference.
TEST_F(KernelsTest, FusedSiluGemvIsTheGemvThenSiluMul) {
  struct Shape { int64_t t, f, k; };
  for (const Shape s : {Shape{1, 1000, 512}, Shape{2, 1001, 264}, Shape{1, 14336, 4096}, Shape{2, 3, 64},
                        Shape{5, 200, 128}, Shape{16, 2048, 4096}, Shape{33, 1024, 512}}) {
    const auto x = random(s.t * s.k), w = random(2 * s.f * s.k, 2.0f / std::sqrt(float(s.k)));
    Tensor c_gu = cpu_.empty({s.t, 2 * s.f}, DType::kF32), c_out = cpu_.empty({s.t, s.f}, DType::kF32);
    cpu_.linear_silu_mul(cpu_f32(x, {s.t, s.k}), LinearWeight{cpu_f32(w, {2 * s.f, s.k})}, c_gu, c_out);
    const Tensor gx = gpu_bf16(x, {s.t, s.k});
    const LinearWeight gw{gpu_bf16(w, {2 * s.f, s.k})};
    const std::vector<float> sentinel(static_cast<size_t>(s.t * 2 * s.f), 7.0f);
    Tensor g_gu = gpu_bf16(sentinel, {s.t, 2 * s.f});
    Tensor g_two = gpu_->empty({s.t, s.f}, DType::kBF16), g_fused = gpu_->empty({s.t, s.f}, DType::kBF16);
    gpu_->set_fused_silu(false);
    gpu_->linear_silu_mul(gx, gw, g_gu, g_two);
    EXPECT_NE(gpu_->download_f32(g_gu), sentinel) << "the unfused path writes gate_up";
    g_gu = gpu_bf16(sentinel, {s.t, 2 * s.f});
    gpu_->set_fused_silu(true);
    gpu_->linear_silu_mul(gx, gw, g_gu, g_fused);
    if (s.t <= 2) {  // gemv_max_tokens' default: the GEMV's gated form, bit for bit the GEMV's result
      EXPECT_EQ(gpu_->download_f32(g_gu), sentinel) << s.t << "x" << s.f << "x" << s.k;
      const std::vector<float> two = gpu_->download_f32(g_two), one = gpu_->download_f32(g_fused);
      int64_t differ = 0;
      for (size_t i = 0; i < two.size(); ++i) differ += std::memcmp(&two[i], &one[i], sizeof(float)) != 0;
      EXPECT_EQ(differ, 0) << s.t << "x" << s.f << "x" << s.k;
    } else if (2 * s.f % 64 != 0) {  // no whole 64-row tiles for the split-K GEMM: the two kernels
      EXPECT_NE(gpu_->download_f32(g_gu), sentinel) << s.t << "x" << s.f << "x" << s.k;
    }
    // Otherwise the load-time trial picks the gated split-K GEMM or the two kernels (the GEMM
    // perhaps cuBLASLt's, summed in another order): the reference decides, and
    // SkinnyGemmMatchesTheReference holds the gated kernel to the plain one bit for bit.
    EXPECT_LT(rel_error(g_fused, c_out), 1e-2) << s.t << "x" << s.f << "x" << s.k;
    EXPECT_LT(rel_error(g_two, c_out), 1e-2) << s.t << "x" << s.f << "x" << s.k;
  }
  gpu_->set_fused_silu(false);
}

// A mixed step on a scrambled paged cache: sequence 0 prefills 37 tokens, sequence 1 continues a
// chunked prefill (20 cached + 5 new), sequence 2 decodes at position 99 — then a decode-only step
// (flash-decoding splits). RoPE + cache write run first, so attention reads what they wrote.
struct AttnCase { int64_t hq, hkv, d; };
class AttentionTest : public KernelsTest, public ::testing::WithParamInterface<AttnCase> {
 protected:
  struct Seq { int32_t cached, fresh; };
  // One step of these sequences (tokens already cached, new query tokens) over a paged cache of
  // random K/V values whose blocks are scrambled across the cache, random q: the CUDA backend's
  // attention against the CPU reference (rel_error).
  double scrambled_step_error(const std::vector<Seq>& seqs) {
    const AttnCase c = GetParam();
    const int64_t block_size = 16;
    int64_t tokens = 0, width = 0;
    int32_t max_q = 0, max_len = 0;
    std::vector<int32_t> lens, qsl{0};
    for (const Seq& q : seqs) {
      tokens += q.fresh;
      qsl.push_back(static_cast<int32_t>(tokens));
      lens.push_back(q.cached + q.fresh);
      max_q = std::max(max_q, q.fresh);
      max_len = std::max(max_len, lens.back());
      width = std::max<int64_t>(width, (lens.back() + block_size - 1) / block_size);
    }
    const auto num_seqs = static_cast<int64_t>(seqs.size());
    const int64_t num_blocks = num_seqs * width;
    std::vector<int32_t> perm(static_cast<size_t>(num_blocks));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    std::vector<int32_t> bt(static_cast<size_t>(num_blocks), -1);
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b) bt[s * width + b] = perm[s * width + b];
    }
    const int64_t cache_elems = num_blocks * block_size * c.hkv * c.d;
    const auto k = random(cache_elems), v = random(cache_elems);
    const std::vector<int64_t> shape{num_blocks, block_size, c.hkv, c.d};
    KvLayer c_cache{cpu_f32(k, shape), cpu_f32(v, shape)}, g_cache{gpu_bf16(k, shape), gpu_bf16(v, shape)};
    const int64_t stride = (c.hq + 2 * c.hkv) * c.d;
    const auto qkv = random(tokens * stride);
    Tensor c_qkv = cpu_f32(qkv, {tokens, stride}), g_qkv = gpu_bf16(qkv, {tokens, stride});
    AttentionMetadata cm, gm;
    for (auto* m : {&cm, &gm}) {
      m->num_seqs = static_cast<int>(num_seqs);
      m->max_query_len = max_q;
      m->max_seq_len = max_len;
      m->block_size = static_cast<int>(block_size);
    }
    cm.query_start_loc = ints(cpu_, qsl), cm.seq_lens = ints(cpu_, lens), cm.block_tables = ints2(cpu_, bt, num_seqs);
    gm.query_start_loc = ints(*gpu_, qsl), gm.seq_lens = ints(*gpu_, lens), gm.block_tables = ints2(*gpu_, bt, num_seqs);
    Tensor c_out = cpu_.empty({tokens, c.hq * c.d}, DType::kF32);
    Tensor g_out = gpu_bf16(std::vector<float>(static_cast<size_t>(tokens * c.hq * c.d), 1e4f), {tokens, c.hq * c.d});
    const float scale = 1.0f / std::sqrt(float(c.d));
    cpu_.attention(c_qkv, c.hq, c_cache, cm, scale, c_out);
    gpu_->begin_step();
    gpu_->attention(g_qkv, c.hq, g_cache, gm, scale, g_out);
    return rel_error(g_out, c_out);
  }
};

TEST_P(AttentionTest, MixedBatchAndDecodeMatchTheReference) {
  const AttnCase c = GetParam();
  const int64_t block_size = 16, num_blocks = 24, max_pos = 256;
  std::vector<float> cs(max_pos * c.d);
  for (int64_t p = 0; p < max_pos; ++p) {
    for (int64_t i = 0; i < c.d / 2; ++i) {
      const double f = std::pow(10000.0, -2.0 * i / c.d);
      cs[p * c.d + i] = float(std::cos(p * f));
      cs[p * c.d + c.d / 2 + i] = float(std::sin(p * f));
    }
  }
  // Each sequence's blocks, scrambled across the cache.
  const std::vector<std::vector<int32_t>> tables = {{7, 2, 19}, {11, 0}, {3, 5, 21, 9, 14, 1, 23}};
  const std::vector<Seq> seqs = {{0, 37}, {20, 5}, {99, 1}};
  const int64_t stride = (c.hq + 2 * c.hkv) * c.d;
  const int64_t cache_elems = num_blocks * block_size * c.hkv * c.d;
  Tensor ck = cpu_f32(std::vector<float>(cache_elems, 0.0f), {num_blocks, block_size, c.hkv, c.d});
  Tensor cv = cpu_f32(std::vector<float>(cache_elems, 0.0f), {num_blocks, block_size, c.hkv, c.d});
  Tensor gk = gpu_bf16(std::vector<float>(cache_elems, 0.0f), {num_blocks, block_size, c.hkv, c.d});
  Tensor gv = gpu_bf16(std::vector<float>(cache_elems, 0.0f), {num_blocks, block_size, c.hkv, c.d});
  KvLayer c_cache{ck, cv}, g_cache{gk, gv};

  // fused: the GPU side as one rope_store_attention call with RoPE fused into the decode kernel
  // (qkv then stays unrotated there, so only the caches and the output are compared).
  auto run_step = [&](const std::vector<Seq>& step, bool check, bool fused = false) {
    std::vector<int32_t> positions, slots, qsl{0}, lens, bt(step.size() * 7, -1);
    int max_q = 0;
    for (size_t s = 0; s < step.size(); ++s) {
      for (int32_t j = 0; j < step[s].fresh; ++j) {
        const int32_t pos = step[s].cached + j;
        positions.push_back(pos);
        slots.push_back(tables[s][pos / block_size] * int32_t(block_size) + pos % int32_t(block_size));
      }
      qsl.push_back(int32_t(positions.size()));
      lens.push_back(step[s].cached + step[s].fresh);
      std::copy(tables[s].begin(), tables[s].end(), bt.begin() + s * 7);
      max_q = std::max(max_q, step[s].fresh);
    }
    const int64_t tokens = int64_t(positions.size());
    const auto qkv = random(tokens * stride);
    Tensor c_qkv = cpu_f32(qkv, {tokens, stride}), g_qkv = gpu_bf16(qkv, {tokens, stride});
    cpu_.rope_and_store_kv(c_qkv, c.hq, ints(cpu_, positions), cpu_f32(cs, {max_pos, c.d}), ints(cpu_, slots), c_cache);
    Tensor g_cs = gpu_->upload(HostTensor{cs.data(), DType::kF32, {max_pos, c.d}}, DType::kF32);
    if (!fused) gpu_->rope_and_store_kv(g_qkv, c.hq, ints(*gpu_, positions), g_cs, ints(*gpu_, slots), g_cache);
    if (check && !fused) {
      EXPECT_LT(rel_error(g_qkv, c_qkv), 1e-2) << "rope";
      EXPECT_LT(rel_error(g_cache.k, c_cache.k), 1e-2) << "k cache";
      EXPECT_LT(rel_error(g_cache.v, c_cache.v), 1e-2) << "v cache";
    }
    AttentionMetadata cm, gm;
    for (auto* m : {&cm, &gm}) {
      m->num_seqs = int(step.size());
      m->max_query_len = max_q;
      m->block_size = int(block_size);
    }
    cm.query_start_loc = ints(cpu_, qsl), cm.seq_lens = ints(cpu_, lens), cm.block_tables = ints2(cpu_, bt, int64_t(step.size()));
    gm.query_start_loc = ints(*gpu_, qsl), gm.seq_lens = ints(*gpu_, lens), gm.block_tables = ints2(*gpu_, bt, int64_t(step.size()));
    Tensor c_out = cpu_.empty({tokens, c.hq * c.d}, DType::kF32), g_out = gpu_->empty({tokens, c.hq * c.d}, DType::kBF16);
    const float scale = 1.0f / std::sqrt(float(c.d));
    cpu_.attention(c_qkv, c.hq, c_cache, cm, scale, c_out);
    gpu_->begin_step();
    if (fused) {
      gm.slot_mapping = ints(*gpu_, slots);
      gpu_->rope_store_attention(g_qkv, c.hq, ints(*gpu_, positions), g_cs, g_cache, gm, scale, g_out);
      EXPECT_LT(rel_error(g_cache.k, c_cache.k), 1e-2) << "k cache, fused RoPE";
      EXPECT_LT(rel_error(g_cache.v, c_cache.v), 1e-2) << "v cache, fused RoPE";
    } else {
      gpu_->attention(g_qkv, c.hq, g_cache, gm, scale, g_out);
    }
    EXPECT_LT(rel_error(g_out, c_out), 2e-2) << "attention, max_query_len " << max_q << (fused ? ", fused RoPE" : "");
  };
  // Fill sequence 2's first 99 positions (not checked), then the mixed step, then decode only,
  // two steps with the decode attention reading the cache before it waits for the RoPE and
  // cache-store kernel ahead of it (all but the position that kernel writes).
  run_step({{0, 0 + 37}, {0, 20}, {0, 99}}, false);
  run_step(seqs, true);
  run_step({{37, 1}, {25, 1}, {100, 1}}, true);
  gpu_->set_early_kv(true);
  run_step({{38, 1}, {26, 1}, {101, 1}}, true);
  run_step({{39, 1}, {27, 1}, {102, 1}}, true);
  // RoPE and the cache store in the decode kernel (SHARDSERVE_FUSED_ROPE), with the cache read
  // before the wait and after it; a mixed step in between takes the two kernels as before. Shapes
  // the decode kernel does not take (head_dim 32) fall back to the two kernels.
  gpu_->set_fused_rope(true);
  run_step({{40, 1}, {28, 1}, {103, 1}}, true, true);
  run_step({{41, 3}, {29, 1}, {104, 1}}, true, true);
  gpu_->set_early_kv(false);
  run_step({{44, 1}, {30, 1}, {105, 1}}, true, true);
  run_step({{45, 1}, {31, 1}, {106, 1}}, true, true);
  gpu_->set_fused_rope(false);
}

// Decode-only steps over long, scrambled contexts (several 64-position tiles, partial tiles, one
// position), from a cache filled with random values: the decode kernel, with attention split over
// CTAs (few sequences) and unsplit (many sequences), against the reference. The split steps run
// twice: the kernel's last split merges the others through counters it must leave at zero. All of
// it with the cache read after the kernel's dependency wait and before it (SHARDSERVE_EARLY_KV).
TEST_P(AttentionTest, DecodeOverLongContextsMatchesTheReference) {
  for (const bool early_kv : {false, true}) {
    gpu_->set_early_kv(early_kv);
    for (const int32_t num_seqs : {5, 40, 5, 3}) {
      std::vector<Seq> seqs;
      for (int32_t s = 0; s < num_seqs; ++s) {
        const int32_t pick[] = {1, 63, 64, 65, 700, 129, 17, 300};
        seqs.push_back({pick[s % 8] + s / 8 - 1, 1});
      }
      EXPECT_LT(scrambled_step_error(seqs), 2e-2) << num_seqs << " sequences, early_kv " << early_kv;
    }
  }
}

// Prefill steps on the tensor-core path: long prompts over several 64-position K/V tiles and query
// tiles, prompts after cached prefixes (chunked prefill, prefix-cache hits) that end mid-tile,
// one-token prompts and decodes in the same step, from a scrambled cache of random values. Each
// prefill kernel: the backend's choice, the mma.sync one (the A100 path) and, on Hopper, the
// wgmma kernel with two and with three warpgroups a CTA (SHARDSERVE_ATTENTION_WGMMA).
TEST_P(AttentionTest, LongPrefillsWithCachedPrefixesMatchTheReference) {
  for (const char* mode : {"", "0", "2", "3"}) {
    setenv("SHARDSERVE_ATTENTION_WGMMA", mode, 1);
    EXPECT_LT(scrambled_step_error({{0, 300}, {500, 131}, {37, 1}, {0, 1}, {64, 64}, {1, 45}}), 2e-2)
        << "SHARDSERVE_ATTENTION_WGMMA=" << mode;
  }
  unsetenv("SHARDSERVE_ATTENTION_WGMMA");
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttnCase{32, 8, 128},  // Llama 3.1 8B
                                           AttnCase{8, 1, 128},   // 70B per rank at TP 8
                                           AttnCase{64, 8, 128},  // 70B, GQA 8:1
                                           AttnCase{6, 1, 32},    // a tiny golden checkpoint
                                           AttnCase{8, 4, 64},    // head_dim 64, GQA 2:1
                                           AttnCase{4, 4, 64},    // MHA
                                           // MHA with an odd head count: with an odd split count
                                           // (3 or 5 sequences on 132 SMs: 29 and 17 splits) the
                                           // decode merge's partials are not 16-byte aligned and
                                           // it takes its scalar path.
                                           AttnCase{3, 3, 64}),
                         [](const auto& info) {
                           return "hq" + std::to_string(info.param.hq) + "_hkv" + std::to_string(info.param.hkv) + "_d" +
                                  std::to_string(info.param.d);
                         });

// The decode-sized tensor-core GEMM (kernels/skinny_gemm.cu) on its own, whatever the tuning in
// CudaBackend::gemm picks: token counts that fill no whole fragment, one split and several (summed
// by the last split of each tile), every configuration the backend times (kernels.h), BF16 and F32
// outputs, against the CPU backend's linear; each configuration twice over the same counters,
// which every call must leave zero for the next. Its gated form (SiLU-and-multiply of the two
// halves' outputs) bit for bit against the plain kernel then silu_mul.
TEST_F(KernelsTest, SkinnyGemmMatchesTheReference) {
  struct Case { int64_t t, n, k; };
  Tensor ws = gpu_->empty({(32 << 20) / 4}, DType::kF32);
  Tensor counters = gpu_->empty({kernels::kSkinnyGemmCounters}, DType::kI32);
  ASSERT_EQ(cudaMemset(counters.data, 0, kernels::kSkinnyGemmCounters * 4), cudaSuccess);
  for (const Case c : {Case{9, 128, 64}, Case{33, 1024, 4096}, Case{100, 6144, 4096}, Case{128, 192, 512},
                       Case{16, 4096, 14336}}) {
    const auto x = random(c.t * c.k), w = random(c.n * c.k, 0.05f);
    Tensor c_out = cpu_.empty({c.t, c.n}, DType::kF32);
    cpu_.linear(cpu_f32(x, {c.t, c.k}), LinearWeight(cpu_f32(w, {c.n, c.k})), c_out);
    const Tensor gx = gpu_bf16(x, {c.t, c.k}), gw = gpu_bf16(w, {c.n, c.k});
    std::set<int64_t> split_counts;
    for (const kernels::SkinnyGemmConfig& cfg : kernels::kSkinnyGemmConfigs) {
      const int stages = cfg.stages;
      const kernels::SkinnyGemmShape shape =
          kernels::skinny_gemm_shape(c.t, c.n, c.k, 132, size_t{32} << 20, cfg.ctas_per_sm, stages);
      ASSERT_EQ(shape.valid, stages != 8 || c.t <= 64) << c.t << " tokens, " << stages << " stages";
      if (!shape.valid) continue;
      split_counts.insert(shape.splits);
      if (c.n % 64 == 0 && c.n >= 128) {
        // The gated form over the same weight read as [gate; up] (F = N / 2): bit for bit this
        // configuration's BF16 output then silu_mul.
        Tensor plain = gpu_->empty({c.t, c.n}, DType::kBF16), two = gpu_->empty({c.t, c.n / 2}, DType::kBF16);
        Tensor one = gpu_->empty({c.t, c.n / 2}, DType::kBF16);
        // The kernels run on the legacy stream, silu_mul on the backend's (non-blocking) one: each
        // waits for the other (a race otherwise, which failed the split cases on an H100).
        ASSERT_EQ(kernels::skinny_gemm(shape, gx.data, gw.data, plain.data, DType::kBF16, DType::kBF16,
                                       ws.as<float>(), counters.as<int32_t>(), nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        gpu_->silu_mul(plain, two);
        gpu_->synchronize();
        ASSERT_EQ(kernels::skinny_gemm_silu_mul(shape, gx.data, gw.data, one.data, DType::kBF16, ws.as<float>(),
                                                counters.as<int32_t>(), nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> a = gpu_->download_f32(two), b = gpu_->download_f32(one);
        int64_t differ = 0;
        for (size_t i = 0; i < a.size(); ++i) differ += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
        EXPECT_EQ(differ, 0) << "gated " << c.t << "x" << c.n << "x" << c.k << " splits " << shape.splits
                             << " stages " << stages;
      }
      for (const DType out : {DType::kBF16, DType::kF32}) {
        for (int rep = 0; rep < 2; ++rep) {
          Tensor g_out = gpu_->empty({c.t, c.n}, out);
          ASSERT_EQ(kernels::skinny_gemm(shape, gx.data, gw.data, g_out.data, DType::kBF16, out, ws.as<float>(),
                                         counters.as<int32_t>(), nullptr),
                    cudaSuccess);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          EXPECT_LT(rel_error(g_out, c_out), 1e-2) << c.t << "x" << c.n << "x" << c.k << " splits " << shape.splits
                                                   << " stages " << stages << " call " << rep;
        }
      }
    }
    std::vector<int32_t> left(kernels::kSkinnyGemmCounters);
    ASSERT_EQ(cudaMemcpy(left.data(), counters.data, left.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(std::count(left.begin(), left.end(), 0), static_cast<std::ptrdiff_t>(left.size()));
    if (c.k >= 4096) EXPECT_GT(*split_counts.rbegin(), 1) << "a case meant to split K did not";
  }
  EXPECT_FALSE(kernels::skinny_gemm_shape(129, 128, 64, 132, 1 << 20).valid);
  EXPECT_FALSE(kernels::skinny_gemm_shape(16, 100, 64, 132, 1 << 20).valid);
  EXPECT_FALSE(kernels::skinny_gemm_shape(16, 128, 64, 132, 1 << 20, 2, 5).valid);
  // Several splits without counters are refused, not raced.
  const kernels::SkinnyGemmShape split = kernels::skinny_gemm_shape(16, 4096, 4096, 132, size_t{32} << 20);
  ASSERT_GT(split.splits, 1);
  EXPECT_EQ(kernels::skinny_gemm(split, ws.data, ws.data, ws.data, DType::kBF16, DType::kBF16, ws.as<float>(), nullptr,
                                 nullptr),
            cudaErrorInvalidValue);
}

TEST_F(KernelsTest, GatherRowsAndJoinColumnShards) {
  const auto x = random(10 * 33);
  const std::vector<int32_t> idx = {9, 0, 4};
  Tensor c_out = cpu_.empty({3, 33}, DType::kF32), g_out = gpu_->empty({3, 33}, DType::kBF16);
  cpu_.gather_rows(cpu_f32(x, {10, 33}), ints(cpu_, idx), c_out);
  gpu_->gather_rows(gpu_bf16(x, {10, 33}), ints(*gpu_, idx), g_out);
  EXPECT_EQ(rel_error(g_out, c_out), 0.0);
  // 3 shards of [2, 5] -> [2, 15].
  const auto shards = random(3 * 2 * 5);
  Tensor cj = cpu_.empty({2, 15}, DType::kF32), gj = gpu_->empty({2, 15}, DType::kBF16);
  cpu_.join_column_shards(cpu_f32(shards, {6, 5}), 3, cj);
  gpu_->join_column_shards(gpu_bf16(shards, {6, 5}), 3, gj);
  EXPECT_EQ(rel_error(gj, cj), 0.0);
}

TEST_F(KernelsTest, FillUniformMatchesTheCpuGenerator) {
  Tensor c = cpu_.empty({1000}, DType::kF32);
  Tensor g = gpu_->empty({1000}, DType::kF32);
  cpu_.fill_uniform(c, 42, 0.5f);
  gpu_->fill_uniform(g, 42, 0.5f);
  EXPECT_EQ(rel_error(g, c), 0.0);
  const auto v = cpu_.download_f32(c);
  EXPECT_LE(*std::max_element(v.begin(), v.end()), 0.5f);
  EXPECT_GE(*std::min_element(v.begin(), v.end()), -0.5f);
  EXPECT_NEAR(std::accumulate(v.begin(), v.end(), 0.0) / 1000, 0.0, 0.03);
}

}  // namespace
}  // namespace shardserve
