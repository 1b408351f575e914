// SiLU-and-mul of the fused gate|up projection: out = silu(gate) * up, rounded like the reference
// model (silu rounded to T before the product). Each thread takes 16 bytes of gate, of up and of
// the output when a row is a multiple of 16 bytes (one element at a time otherwise): element by
// element, batch 128 of Llama-3.1-8B took 10.7 us a layer for 11 MB moved.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* gate_up, int64_t rows, int64_t f, T* out) {
  using V = Pack<T, kVec>;
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t fv = f / kVec;  // vectors per row of out
  const int64_t n = rows * fv;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / fv;
    const int64_t i = idx % fv;
    const V* row = reinterpret_cast<const V*>(gate_up + r * 2 * f);
    const V gv = row[i], uv = row[fv + i];
    V ov;
#pragma unroll
    for (int e = 0; e < kVec; ++e) ov.e[e] = silu_mul_rounded<T>(to_f32(gv.e[e]), to_f32(uv.e[e]));
    reinterpret_cast<V*>(out)[idx] = ov;
  }
}

template <typename T, int kVec>
cudaError_t launch(const void* gate_up, int64_t rows, int64_t f, void* out, cudaStream_t stream) {
  const int64_t n = rows * f / kVec;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  return launch_pdl(silu_mul_kernel<T, kVec>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream,
                    static_cast<const T*>(gate_up), rows, f, static_cast<T*>(out));
}

}  // namespace

cudaError_t silu_mul(const void* gate_up, int64_t rows, int64_t f, void* out, DType dtype, cudaStream_t stream) {
  if (rows * f == 0) return cudaSuccess;
  const bool vectors = f * static_cast<int64_t>(dtype_size(dtype)) % 16 == 0 &&
                       aligned(gate_up, 16) && aligned(out, 16);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return vectors ? launch<T, 16 / sizeof(T)>(gate_up, rows, f, out, stream) : launch<T, 1>(gate_up, rows, f, out, stream);
  });
}

}  // namespace shardserve::kernels
