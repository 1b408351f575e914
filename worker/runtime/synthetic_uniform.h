// The value synthetic weights take at element i: uniform in [-scale, scale) from a splitmix64 hash
// of (seed, i); and the random bits of synthetic quantized weights. One definition for the CPU
// backend and the CUDA kernels, so both make the same weights bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "worker/runtime/dtype.h"

#if defined(__CUDACC__)
#define SHARDSERVE_HOST_DEVICE __host__ __device__
#else
#define SHARDSERVE_HOST_DEVICE
#endif

namespace shardserve {

SHARDSERVE_HOST_DEVICE inline uint64_t synthetic_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed ^ (i * 0xd1b54a32d192ed03ull);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

SHARDSERVE_HOST_DEVICE inline float synthetic_uniform(uint64_t seed, uint64_t i, float scale) {
  const float u = static_cast<float>(synthetic_hash(seed, i) >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return (2.0f * u - 1.0f) * scale;
}

// 32 random bits for word i (synthetic quantized weights: Backend::fill_random_bits).
SHARDSERVE_HOST_DEVICE inline uint32_t synthetic_bits(uint64_t seed, uint64_t i) {
  return static_cast<uint32_t>(synthetic_hash(seed, i) >> 32);
}

// Byte j of a fill_random_bits tensor: byte j % 4 of word j / 4; FP8 E4M3 bytes lose bit 6 (the
// exponent's top bit), so every value is finite and below 2 in magnitude.
SHARDSERVE_HOST_DEVICE inline uint8_t synthetic_random_byte(uint64_t seed, uint64_t j, bool fp8e4m3) {
  const auto byte = static_cast<uint8_t>(synthetic_bits(seed, j / 4) >> (8 * (j % 4)));
  return fp8e4m3 ? static_cast<uint8_t>(byte & 0xBF) : byte;
}

// The host loop of fill_random_bits over n bytes of a tensor of `dtype`.
inline void synthetic_random_bytes(uint64_t seed, DType dtype, uint8_t* out, size_t n) {
  const bool fp8 = dtype == DType::kF8E4M3;
  for (size_t j = 0; j < n; ++j) out[j] = synthetic_random_byte(seed, j, fp8);
}

}  // namespace shardserve
