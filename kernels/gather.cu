// Row gather (the rows whose logits are wanted) for any element size, 4 bytes at a time when
// rows allow it.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename W>
__global__ void gather_kernel(const W* x, int64_t row_words, const int32_t* indices, W* out) {
  const W* src = x + static_cast<int64_t>(indices[blockIdx.x]) * row_words;
  W* dst = out + blockIdx.x * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

cudaError_t gather_rows(const void* x, int64_t row_bytes, const int32_t* indices, int64_t n, void* out,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (row_bytes % 4 == 0) {
    gather_kernel<uint32_t><<<n, 256, 0, stream>>>(static_cast<const uint32_t*>(x), row_bytes / 4, indices,
                                                   static_cast<uint32_t*>(out));
  } else {
    gather_kernel<uint8_t><<<n, 256, 0, stream>>>(static_cast<const uint8_t*>(x), row_bytes, indices,
                                                  static_cast<uint8_t*>(out));
  }
  return cudaGetLastError();
}

}  // namespace shardserve::kernels
