// Synthetic weights straight on the device: a splitmix64 hash of (seed, index) mapped to
// uniform [-scale, scale). Deterministic for a seed, no host memory or files involved.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t bits = splitmix64(seed ^ (static_cast<uint64_t>(i) * 0xd1b54a32d192ed03ull));
    const float u = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = from_f32<T>((2.0f * u - 1.0f) * scale);
  }
}

template <typename T>
__global__ void convert_kernel(const float* in, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_f32<T>(in[i]);
  }
}

int64_t grid_for(int64_t n) { return std::clamp<int64_t>((n + 255) / 256, 1, 65535); }

}  // namespace

cudaError_t fill_uniform(void* out, int64_t n, uint64_t seed, float scale, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    fill_uniform_kernel<T><<<grid_for(n), 256, 0, stream>>>(static_cast<T*>(out), n, seed, scale);
    return cudaGetLastError();
  });
}

cudaError_t convert_from_f32(const float* in, int64_t n, void* out, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    convert_kernel<T><<<grid_for(n), 256, 0, stream>>>(in, n, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace shardserve::kernels
