// Synthetic weights straight on the device (synthetic_uniform: the CPU backend makes the same
// values), and the F32 -> 16-bit conversion of uploads.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.h"
#include "worker/runtime/synthetic_uniform.h"

namespace shardserve::kernels {
namespace {

template <typename T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_f32<T>(synthetic_uniform(seed, static_cast<uint64_t>(i), scale));
  }
}

template <typename T>
__global__ void convert_kernel(const float* in, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_f32<T>(in[i]);
  }
}

// One thread per 32-bit word: its 4 bytes are synthetic_random_byte(seed, 4 * i + b).
__global__ void fill_random_bits_kernel(uint8_t* out, int64_t n, uint64_t seed, bool fp8) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i * 4 < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t j = i * 4; j < i * 4 + 4 && j < n; ++j) out[j] = synthetic_random_byte(seed, static_cast<uint64_t>(j), fp8);
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

cudaError_t fill_random_bits(void* out, int64_t nbytes, uint64_t seed, bool fp8e4m3, cudaStream_t stream) {
  if (nbytes == 0) return cudaSuccess;
  fill_random_bits_kernel<<<grid_for((nbytes + 3) / 4), 256, 0, stream>>>(static_cast<uint8_t*>(out), nbytes, seed,
                                                                          fp8e4m3);
  return cudaGetLastError();
}

cudaError_t convert_from_f32(const float* in, int64_t n, void* out, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    convert_kernel<T><<<grid_for(n), 256, 0, stream>>>(in, n, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace shardserve::kernels
