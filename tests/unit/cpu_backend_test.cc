// Unit checks of the CPU reference ops against direct formulas, in particular that paged
// attention through a scrambled block table equals attention over contiguous keys.
#include "worker/runtime/cpu_backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

namespace shardserve {
namespace {

Tensor f32(CpuBackend& be, const std::vector<float>& v, std::vector<int64_t> shape) {
  return be.upload(HostTensor{v.data(), DType::kF32, std::move(shape)}, DType::kF32);
}
Tensor i32(CpuBackend& be, const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  return be.upload(HostTensor{v.data(), DType::kI32, std::move(shape)}, DType::kI32);
}

TEST(CpuBackend, RmsNormAndResidual) {
  CpuBackend be(1);
  Tensor x = f32(be, {1, 2, 3, 4}, {1, 4});
  Tensor w = f32(be, {1, 1, 2, 0.5}, {4});
  Tensor out = be.empty({1, 4}, DType::kF32);
  be.rmsnorm(x, w, 0.0f, out);
  const float inv = 1.0f / std::sqrt(30.0f / 4.0f);
  EXPECT_NEAR(out.as<float>()[2], 3 * inv * 2, 1e-6);
  Tensor residual = f32(be, {1, 1, 1, 1}, {1, 4});
  be.add_rmsnorm(x, residual, w, 0.0f, out);
  EXPECT_EQ(residual.as<float>()[3], 5.0f);  // residual += x
  const float inv2 = 1.0f / std::sqrt((4 + 9 + 16 + 25) / 4.0f);
  EXPECT_NEAR(out.as<float>()[3], 5 * inv2 * 0.5f, 1e-6);
}

TEST(CpuBackend, EmbeddingOfAVocabShardZeroesOtherRows) {
  CpuBackend be(1);
  Tensor table = f32(be, {10, 11, 20, 21}, {2, 2});  // rows for ids 4 and 5
  Tensor ids = i32(be, {5, 3, 4}, {3});
  Tensor out = be.empty({3, 2}, DType::kF32);
  be.embedding(ids, table, 4, out);
  EXPECT_EQ(std::vector<float>(out.as<float>(), out.as<float>() + 6), (std::vector<float>{20, 21, 0, 0, 10, 11}));
}

TEST(CpuBackend, LinearMatchesTheDefinitionWithAndWithoutThreads) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n;
  const int64_t t = 3, k = 33, m = 70;
  std::vector<float> x(t * k), w(m * k);
  for (auto& v : x) v = n(rng);
  for (auto& v : w) v = n(rng);
  for (int threads : {1, 4}) {
    CpuBackend be(threads);
    LinearWeight lw{f32(be, w, {m, k})};
    Tensor out = be.empty({t, m}, DType::kF32);
    be.linear(f32(be, x, {t, k}), lw, out);
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        double ref = 0;
        for (int64_t l = 0; l < k; ++l) ref += double(x[i * k + l]) * w[j * k + l];
        EXPECT_NEAR(out.as<float>()[i * m + j], ref, 1e-4);
      }
    }
  }
}

TEST(CpuBackend, SiluMul) {
  CpuBackend be(1);
  Tensor gu = f32(be, {1.0f, -2.0f, 3.0f, 0.5f}, {1, 4});
  Tensor out = be.empty({1, 2}, DType::kF32);
  be.silu_mul(gu, out);
  EXPECT_NEAR(out.as<float>()[0], 1.0f / (1 + std::exp(-1.0f)) * 3.0f, 1e-6);
  EXPECT_NEAR(out.as<float>()[1], -2.0f / (1 + std::exp(2.0f)) * 0.5f, 1e-6);
}

// Writes K/V for a 21-token sequence (GQA 4 query heads : 2 KV heads) through rope_and_store_kv
// into scrambled blocks, then checks decode attention for the last token against a dense
// computation over the same rotated keys.
TEST(CpuBackend, PagedAttentionEqualsDenseAttention) {
  CpuBackend be(1);
  const int64_t hq = 4, hkv = 2, d = 8, len = 21, block = 4, blocks = 8, max_pos = 64;
  std::mt19937 rng(3);
  std::normal_distribution<float> n;
  std::vector<float> qkv((hq + 2 * hkv) * d * len);
  for (auto& v : qkv) v = n(rng);
  std::vector<float> cs(max_pos * d);
  for (int64_t p = 0; p < max_pos; ++p) {
    for (int64_t i = 0; i < d / 2; ++i) {
      cs[p * d + i] = std::cos(p * 0.3 / (i + 1));
      cs[p * d + d / 2 + i] = std::sin(p * 0.3 / (i + 1));
    }
  }
  const std::vector<int32_t> table = {6, 0, 3, 7, 1, 5};
  std::vector<int32_t> positions(len), slots(len);
  for (int32_t p = 0; p < len; ++p) {
    positions[p] = p;
    slots[p] = table[p / block] * block + p % block;
  }
  KvLayer cache{be.empty({blocks, block, hkv, d}, DType::kF32), be.empty({blocks, block, hkv, d}, DType::kF32)};
  Tensor qkv_t = f32(be, qkv, {len, (hq + 2 * hkv) * d});
  be.rope_and_store_kv(qkv_t, hq, i32(be, positions, {len}), f32(be, cs, {max_pos, d}), i32(be, slots, {len}), cache);

  // Decode attention for the last token only.
  AttentionMetadata meta;
  meta.num_seqs = 1;
  meta.query_start_loc = i32(be, {0, 1}, {2});
  meta.seq_lens = i32(be, {int32_t(len)}, {1});
  meta.block_tables = i32(be, table, {1, int64_t(table.size())});
  Tensor last = qkv_t.rows(len - 1, len);
  Tensor out = be.empty({1, hq * d}, DType::kF32);
  be.attention(last, hq, cache, meta, 0.5f, out);

  const int64_t stride = (hq + 2 * hkv) * d;
  const float* rotated = qkv_t.as<float>();
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t g = h / (hq / hkv);
    std::vector<double> s(len);
    double mx = -1e30, den = 0;
    for (int64_t p = 0; p < len; ++p) {
      double dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += double(rotated[(len - 1) * stride + h * d + i]) * rotated[p * stride + (hq + g) * d + i];
      s[p] = dot * 0.5;
      mx = std::max(mx, s[p]);
    }
    for (auto& v : s) den += (v = std::exp(v - mx));
    for (int64_t i = 0; i < d; ++i) {
      double ref = 0;
      for (int64_t p = 0; p < len; ++p) ref += s[p] / den * rotated[p * stride + (hq + hkv + g) * d + i];
      EXPECT_NEAR(out.as<float>()[h * d + i], ref, 1e-5) << "head " << h << " dim " << i;
    }
  }
}

TEST(CpuBackend, RopeRotatesHalvesAndSkipsNegativeSlots) {
  CpuBackend be(1);
  // One token, 1 q head, 1 kv head, d = 2: q = (1, 0) rotated by angle a is (cos a, sin a).
  const float a = 0.7f;
  Tensor qkv = f32(be, {1, 0, 0, 1, 5, 6}, {1, 6});
  Tensor cs = f32(be, {1, 0, std::cos(a), std::sin(a)}, {2, 2});
  KvLayer cache{be.empty({1, 1, 1, 2}, DType::kF32), be.empty({1, 1, 1, 2}, DType::kF32)};
  cache.k.as<float>()[0] = 42;
  be.rope_and_store_kv(qkv, 1, i32(be, {1}, {1}), cs, i32(be, {-1}, {1}), cache);
  EXPECT_NEAR(qkv.as<float>()[0], std::cos(a), 1e-6);
  EXPECT_NEAR(qkv.as<float>()[1], std::sin(a), 1e-6);
  EXPECT_NEAR(qkv.as<float>()[2], -std::sin(a), 1e-6);  // k = (0, 1) -> (-sin a, cos a)
  EXPECT_EQ(cache.k.as<float>()[0], 42.0f);             // slot -1: nothing written
}

}  // namespace
}  // namespace shardserve
