// The value synthetic weights take at element i: uniform in [-scale, scale) from a splitmix64 hash
// of (seed, i). One definition for the CPU backend and the CUDA kernel, so both make the same
// weights bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SHARDSERVE_HOST_DEVICE __host__ __device__
#else
#define SHARDSERVE_HOST_DEVICE
#endif

namespace shardserve {

SHARDSERVE_HOST_DEVICE inline float synthetic_uniform(uint64_t seed, uint64_t i, float scale) {
  uint64_t z = seed ^ (i * 0xd1b54a32d192ed03ull);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return (2.0f * u - 1.0f) * scale;
}

}  // namespace shardserve
