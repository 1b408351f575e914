// SiLU-and-mul of the fused gate|up projection: out = silu(gate) * up, rounded like the reference
// model (silu rounded to T before the product).
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename T>
__global__ void silu_mul_kernel(const T* gate_up, int64_t rows, int64_t f, T* out) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t n = rows * f;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / f;
    const int64_t i = idx % f;
    const float g = to_f32(gate_up[r * 2 * f + i]);
    const float u = to_f32(gate_up[r * 2 * f + f + i]);
    const float s = to_f32(from_f32<T>(g / (1.0f + __expf(-g))));
    out[idx] = from_f32<T>(s * u);
  }
}

}  // namespace

cudaError_t silu_mul(const void* gate_up, int64_t rows, int64_t f, void* out, DType dtype, cudaStream_t stream) {
  const int64_t n = rows * f;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch_pdl(silu_mul_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream,
                      static_cast<const T*>(gate_up), rows, f, static_cast<T*>(out));
  });
}

}  // namespace shardserve::kernels
