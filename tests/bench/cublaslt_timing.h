// cuBLASLt's best BF16 time for y^T = W x^T at a given shape, the baseline the GEMM harnesses
// (tests/bench/*_harness.cu) compare against: the fastest of its heuristic's first 8 answers,
// each timed over back-to-back calls, with the weight cycling through `copies` copies so that L2
// holds none of it.
#pragma once

#include <cublasLt.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "tests/bench/gpu_timing.h"

#define CB(x)                                                                       \
  do {                                                                              \
    const cublasStatus_t s_ = (x);                                                  \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                              \
      std::fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #x, int(s_)); \
      std::exit(2);                                                                 \
    }                                                                               \
  } while (0)

namespace shardserve::harness {

struct Lt {
  cublasLtHandle_t h;
  void* ws;
  size_t ws_bytes = size_t{32} << 20;
  Lt() {
    CB(cublasLtCreate(&h));
    CK(cudaMalloc(&ws, ws_bytes));
  }
  // y^T = W x^T in column-major terms, as worker/runtime/cuda_backend.cc sets it up; the fastest
  // of the heuristic's first 8 answers. Returns microseconds per call.
  double time(const void* w, int copies, size_t w_elems, const void* x, void* y, int64_t t, int64_t n, int64_t k) {
    cublasLtMatmulDesc_t desc;
    CB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t trans = CUBLAS_OP_T;
    CB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)));
    cublasLtMatrixLayout_t a, b, c;
    CB(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, k, n, k));
    CB(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, k, t, k));
    CB(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, n, t, n));
    cublasLtMatmulPreference_t pref;
    CB(cublasLtMatmulPreferenceCreate(&pref));
    CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
    cublasLtMatmulHeuristicResult_t res[8];
    int found = 0;
    CB(cublasLtMatmulAlgoGetHeuristic(h, desc, a, b, c, c, pref, 8, res, &found));
    const float alpha = 1, beta = 0;
    double best = 1e30;
    for (int i = 0; i < found; ++i) {
      const double us = harness::time_us([&](int it) {
        const void* wi = static_cast<const __nv_bfloat16*>(w) + (it % copies) * w_elems;
        CB(cublasLtMatmul(h, desc, &alpha, wi, a, x, b, &beta, y, c, y, c, &res[i].algo, ws, ws_bytes, nullptr));
      }, 50);
      best = std::min(best, us);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatmulDescDestroy(desc);
    return best;
  }
};

}  // namespace shardserve::harness
