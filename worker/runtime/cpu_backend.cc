#include "worker/runtime/cpu_backend.h"

#include "worker/runtime/synthetic_uniform.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace shardserve {
namespace {

void require_f32(const Tensor& t, const char* what) {
  if (t.dtype != DType::kF32) {
    throw std::logic_error(std::string("cpu backend: ") + what + " must be F32, got " +
                           std::string(dtype_name(t.dtype)));
  }
}

// Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn fn) {
  const int64_t chunks = std::min<int64_t>(num_threads, n);
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(chunks - 1));
  const int64_t step = (n + chunks - 1) / chunks;
  for (int64_t begin = step; begin < n; begin += step) {
    threads.emplace_back([=] { fn(begin, std::min(n, begin + step)); });
  }
  fn(int64_t{0}, std::min(n, step));
  for (auto& t : threads) t.join();
}

float rms_scale(const float* x, int64_t n, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(n) + eps));
}

}  // namespace

CpuBackend::CpuBackend(int num_threads)
    : num_threads_(num_threads > 0 ? num_threads
                                   : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))) {}

Tensor CpuBackend::empty(std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const size_t bytes = std::max<size_t>(t.nbytes(), 1);
  // 64-byte alignment so every row of a matrix starts on a cache line when sizes allow.
  void* mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (mem == nullptr) throw std::bad_alloc();
  t.storage = std::shared_ptr<void>(mem, std::free);
  t.data = mem;
  return t;
}

Tensor CpuBackend::upload(const HostTensor& src, DType dtype) {
  Tensor t = empty(src.shape, dtype);
  const auto n = static_cast<size_t>(src.numel());
  if (src.dtype == dtype) {
    std::memcpy(t.data, src.data, n * dtype_size(dtype));
  } else if (dtype == DType::kF32) {
    convert_to_f32(src.data, src.dtype, n, t.as<float>());
  } else {
    throw std::logic_error("cpu backend: upload converts only to F32");
  }
  return t;
}

std::vector<float> CpuBackend::download_f32(const Tensor& src) {
  std::vector<float> out(static_cast<size_t>(src.numel()));
  convert_to_f32(src.data, src.dtype, out.size(), out.data());
  return out;
}

void CpuBackend::copy_from_host(const void* src, Tensor& dst) { std::memcpy(dst.data, src, dst.nbytes()); }

void CpuBackend::fill_uniform(Tensor& t, uint64_t seed, float scale) {
  require_f32(t, "fill_uniform target");
  // The same values as kernels::fill_uniform before rounding to the device's dtype.
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = synthetic_uniform(seed, static_cast<uint64_t>(i), scale);
}

void CpuBackend::fill_random_bits(Tensor& t, uint64_t seed) {
  synthetic_random_bytes(seed, t.dtype, static_cast<uint8_t*>(t.data), t.nbytes());
}

void dequantize_row(const LinearWeight& w, int64_t n, float* out) {
  const int64_t k_all = w.in_features();
  switch (w.format) {
    case WeightFormat::kDense:
      convert_to_f32(static_cast<const char*>(w.weight.data) + n * k_all * dtype_size(w.weight.dtype), w.weight.dtype,
                     static_cast<size_t>(k_all), out);
      return;
    case WeightFormat::kInt8:
    case WeightFormat::kFp8: {
      convert_to_f32(static_cast<const uint8_t*>(w.weight.data) + n * k_all, w.weight.dtype, static_cast<size_t>(k_all), out);
      const float scale = w.scales.as<float>()[n];
      for (int64_t k = 0; k < k_all; ++k) out[k] *= scale;
      return;
    }
    case WeightFormat::kInt4: {
      const int64_t groups = w.scales.dim(1);
      const auto* words = w.weight.as<uint32_t>() + n * (k_all / 8);
      const uint8_t* zeros = w.zeros.as<uint8_t>() + n * groups;
      const int32_t* g_idx = w.g_idx.empty() ? nullptr : w.g_idx.as<int32_t>();
      std::vector<float> scales(static_cast<size_t>(groups));
      convert_to_f32(static_cast<const char*>(w.scales.data) + n * groups * dtype_size(w.scales.dtype), w.scales.dtype,
                     scales.size(), scales.data());
      for (int64_t k = 0; k < k_all; ++k) {
        const int64_t g = g_idx ? g_idx[k] : k / w.group_size;
        const int q = static_cast<int>((words[k / 8] >> (4 * (k % 8))) & 0xFu);
        // (q - z) is an integer of at most 5 bits and s has at most 24: the product is exact.
        out[k] = static_cast<float>(q - zeros[g]) * scales[g];
      }
      return;
    }
  }
}

std::vector<float> dequantize(const LinearWeight& w) {
  const int64_t n_all = w.out_features();
  const int64_t k_all = w.in_features();
  std::vector<float> out(static_cast<size_t>(n_all * k_all));
  for (int64_t n = 0; n < n_all; ++n) dequantize_row(w, n, out.data() + n * k_all);
  return out;
}

void CpuBackend::embedding(const Tensor& ids, const Tensor& table, int64_t vocab_start,
                           Tensor& out) {
  require_f32(table, "embedding table");
  const int64_t hidden = table.dim(1);
  const int64_t rows = table.dim(0);
  for (int64_t t = 0; t < ids.numel(); ++t) {
    const int64_t row = ids.as<int32_t>()[t] - vocab_start;
    float* dst = out.as<float>() + t * hidden;
    if (row >= 0 && row < rows) {
      std::memcpy(dst, table.as<float>() + row * hidden, static_cast<size_t>(hidden) * 4);
    } else {
      std::fill(dst, dst + hidden, 0.0f);
    }
  }
}

void CpuBackend::rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  require_f32(x, "rmsnorm input");
  const int64_t hidden = weight.numel();
  const int64_t rows = x.numel() / hidden;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.as<float>() + r * hidden;
    float* yr = out.as<float>() + r * hidden;
    const float scale = rms_scale(xr, hidden, eps);
    for (int64_t i = 0; i < hidden; ++i) yr[i] = xr[i] * scale * weight.as<float>()[i];
  }
}

void CpuBackend::add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps,
                             Tensor& out) {
  require_f32(residual, "residual");
  float* res = residual.as<float>();
  const float* xs = x.as<float>();
  for (int64_t i = 0; i < residual.numel(); ++i) res[i] += xs[i];
  rmsnorm(residual, weight, eps, out);
}

void CpuBackend::linear(const Tensor& x, const LinearWeight& w, Tensor& out) {
  require_f32(x, "linear input");
  if (w.format == WeightFormat::kDense) require_f32(w.weight, "linear weight");
  require_f32(out, "linear output");
  const int64_t k = w.in_features();
  const int64_t n = w.out_features();
  const int64_t tokens = x.numel() / k;
  const float* xs = x.as<float>();
  float* ys = out.as<float>();
  // W8A8 as on the GPU: x[t] = E4M3(x[t] / s_t) and y[t] = s_t * (E4M3 codes . W).
  std::vector<float> xq, x_scales;
  const bool w8a8 = emulate_w8a8_ && w.format == WeightFormat::kFp8 && fp8_runs_as_w8a8(tokens, n, k);
  if (w8a8) {
    xq.resize(static_cast<size_t>(tokens * k));
    x_scales.resize(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t) {
      float scale = 0.0f;
      if (!w.input_scale.empty()) {
        scale = w.input_scale.as<float>()[0];
      } else {
        float amax = 0.0f;
        for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xs[t * k + i]));
        scale = std::max(amax, 1e-12f) / 448.0f;
      }
      const float inv = 1.0f / scale;
      for (int64_t i = 0; i < k; ++i) xq[t * k + i] = fp8e4m3_to_f32(f32_to_fp8e4m3(xs[t * k + i] * inv));
      x_scales[t] = scale;
    }
    xs = xq.data();
  }
  // Threads split the output features: each reads (or dequantizes) its rows of W once for all
  // tokens. Every format runs the same dot-product loop over an FP32 row.
  const int threads = tokens * n * k >= (int64_t{1} << 20) ? num_threads_ : 1;
  parallel_for(n, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> row(w.format == WeightFormat::kDense ? 0 : static_cast<size_t>(k));
    for (int64_t j = begin; j < end; ++j) {
      const float* wr = row.data();
      if (w.format == WeightFormat::kDense) {
        wr = w.weight.as<float>() + j * k;
      } else {
        dequantize_row(w, j, row.data());
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const float* xr = xs + t * k;
        float acc = 0.0f;
        for (int64_t i = 0; i < k; ++i) acc += xr[i] * wr[i];
        ys[t * n + j] = w8a8 ? acc * x_scales[t] : acc;
      }
    }
  });
}

void CpuBackend::rope_and_store_kv(Tensor& qkv, int64_t num_q_heads, const Tensor& positions,
                                   const Tensor& cos_sin, const Tensor& slot_mapping,
                                   KvLayer& cache) {
  require_f32(qkv, "qkv");
  const int64_t tokens = qkv.dim(0);
  const int64_t head_dim = cache.k.dim(3);
  const int64_t kv_heads = cache.k.dim(2);
  const int64_t half = head_dim / 2;
  const int64_t max_pos = cos_sin.dim(0);
  const int64_t stride = (num_q_heads + 2 * kv_heads) * head_dim;
  const int64_t kv_row = kv_heads * head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t pos = positions.as<int32_t>()[t];
    if (pos < 0 || pos >= max_pos) throw std::out_of_range("rope: position out of range");
    const float* cs = cos_sin.as<float>() + pos * head_dim;
    float* row = qkv.as<float>() + t * stride;
    // q and k heads are adjacent in the row: rotate all of them.
    for (int64_t h = 0; h < num_q_heads + kv_heads; ++h) {
      float* x = row + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i];
        const float x2 = x[i + half];
        x[i] = x1 * cs[i] - x2 * cs[half + i];
        x[i + half] = x2 * cs[i] + x1 * cs[half + i];
      }
    }
    const int64_t slot = slot_mapping.as<int32_t>()[t];
    if (slot < 0) continue;
    const float* k = row + num_q_heads * head_dim;
    std::memcpy(cache.k.as<float>() + slot * kv_row, k, static_cast<size_t>(kv_row) * 4);
    std::memcpy(cache.v.as<float>() + slot * kv_row, k + kv_row, static_cast<size_t>(kv_row) * 4);
  }
}

void CpuBackend::attention(const Tensor& qkv, int64_t num_q_heads, const KvLayer& cache,
                           const AttentionMetadata& meta, float scale, Tensor& out) {
  const int64_t head_dim = cache.k.dim(3);
  const int64_t kv_heads = cache.k.dim(2);
  const int64_t group = num_q_heads / kv_heads;
  const int64_t block_size = cache.k.dim(1);
  const int64_t stride = (num_q_heads + 2 * kv_heads) * head_dim;
  const int64_t max_blocks = meta.block_tables.dim(1);
  const int32_t* starts = meta.query_start_loc.as<int32_t>();
  std::vector<float> scores;
  for (int s = 0; s < meta.num_seqs; ++s) {
    const int32_t* block_table = meta.block_tables.as<int32_t>() + s * max_blocks;
    const int64_t seq_len = meta.seq_lens.as<int32_t>()[s];
    const int64_t q_len = starts[s + 1] - starts[s];
    scores.resize(static_cast<size_t>(seq_len));
    for (int64_t i = 0; i < q_len; ++i) {
      const int64_t t = starts[s] + i;
      const int64_t pos = seq_len - q_len + i;  // causal: attends to positions [0, pos]
      for (int64_t h = 0; h < num_q_heads; ++h) {
        const float* q = qkv.as<float>() + t * stride + h * head_dim;
        const int64_t kv_head = h / group;
        auto cache_offset = [&](int64_t p) {
          const int64_t slot = block_table[p / block_size] * block_size + p % block_size;
          return (slot * kv_heads + kv_head) * head_dim;
        };
        float max_score = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) {
          const float* k = cache.k.as<float>() + cache_offset(p);
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * k[d];
          scores[p] = dot * scale;
          max_score = std::max(max_score, scores[p]);
        }
        double denom = 0.0;
        for (int64_t p = 0; p <= pos; ++p) {
          scores[p] = std::exp(scores[p] - max_score);
          denom += scores[p];
        }
        float* o = out.as<float>() + (t * num_q_heads + h) * head_dim;
        std::fill(o, o + head_dim, 0.0f);
        for (int64_t p = 0; p <= pos; ++p) {
          const float* v = cache.v.as<float>() + cache_offset(p);
          const auto w = static_cast<float>(scores[p] / denom);
          for (int64_t d = 0; d < head_dim; ++d) o[d] += w * v[d];
        }
      }
    }
  }
}

void CpuBackend::silu_mul(const Tensor& gate_up, Tensor& out) {
  const int64_t f = out.dim(1);
  for (int64_t t = 0; t < out.dim(0); ++t) {
    const float* g = gate_up.as<float>() + t * 2 * f;
    const float* u = g + f;
    float* o = out.as<float>() + t * f;
    for (int64_t i = 0; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void CpuBackend::gather_rows(const Tensor& x, const Tensor& indices, Tensor& out) {
  const size_t row_bytes = x.nbytes() / static_cast<size_t>(x.dim(0));
  for (int64_t i = 0; i < indices.numel(); ++i) {
    std::memcpy(static_cast<char*>(out.data) + static_cast<size_t>(i) * row_bytes,
                static_cast<const char*>(x.data) + indices.as<int32_t>()[i] * row_bytes, row_bytes);
  }
}

void CpuBackend::join_column_shards(const Tensor& shards, int64_t num_shards, Tensor& out) {
  const int64_t rows = out.dim(0);
  const size_t shard_row_bytes = shards.nbytes() / static_cast<size_t>(shards.dim(0));
  for (int64_t k = 0; k < num_shards; ++k) {
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(static_cast<char*>(out.data) + (i * num_shards + k) * shard_row_bytes,
                  static_cast<const char*>(shards.data) + (k * rows + i) * shard_row_bytes, shard_row_bytes);
    }
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace shardserve
