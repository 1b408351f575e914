// Embedding gather. One CTA per token copying a row; memory-bound and tiny next to the GEMMs,
// so plain element loads suffice.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

template <typename T>
__global__ void embedding_kernel(const int32_t* ids, const T* table, int64_t rows, int64_t hidden, int64_t vocab_start,
                                 T* out) {
  pdl_trigger();
  pdl_wait();  // every input is another kernel's output
  const int64_t t = blockIdx.x;
  const int64_t row = ids[t] - vocab_start;
  T* dst = out + t * hidden;
  if (row >= 0 && row < rows) {
    const T* src = table + row * hidden;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = from_f32<T>(0.0f);
  }
}

}  // namespace

cudaError_t embedding(const int32_t* ids, int64_t num_tokens, const void* table, int64_t rows, int64_t hidden,
                      int64_t vocab_start, void* out, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch_pdl(embedding_kernel<T>, dim3(static_cast<unsigned>(num_tokens)), dim3(256), 0, stream, ids,
                      static_cast<const T*>(table), rows, hidden, vocab_start, static_cast<T*>(out));
  });
}

}  // namespace shardserve::kernels
