// Hopper (sm_90a) warpgroup MMA building blocks: wgmma.mma_async with shared-memory descriptors for
// the 128-byte swizzled layout, the fences around it, and that layout's addressing. A warpgroup is
// four consecutive warps (128 threads); each instruction multiplies 64 rows (warp w of the group
// owns rows 16w..16w+15, with mma.sync's m16n8 accumulator layout) by N columns, 16 deep.
//
// Only sm_90a has these instructions: code using them is compiled when SHARDSERVE_WGMMA is 1 (the
// sm_90a pass of nvcc) and its host side checks kernel_has_wgmma() before it launches anything that
// relies on them, so an sm_80-only build (or the compute_80 PTX JIT-compiled on a Hopper) takes
// the mma.sync kernels instead.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SHARDSERVE_WGMMA 1
#else
#define SHARDSERVE_WGMMA 0
#endif

namespace shardserve::kernels::wgmma {

// Whether this kernel's code on the current device was compiled for sm_90a (and so has its wgmma
// body): the PTX it came from is 9.0 or later. A compute_80 PTX JIT-compiled on a Hopper reports 80.
template <typename Kernel>
bool kernel_has_wgmma(Kernel kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
}

// Byte offset of 16-byte chunk c (elements 8c..8c+7) of row r in a [kRows][cols] tile of 16-bit
// elements laid out as wgmma's 128-byte swizzle wants it: column blocks of 64 elements, each
// [kRows][128 B] (8-row atoms of 1 KB), chunks XOR-swizzled by r % 8. The tile starts 1 KB-aligned.
template <int kRows>
__device__ __forceinline__ uint32_t swizzle128(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (kRows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets.
// K-major operands (rows of K contiguous): `stride` = 1024 (from one 8-row atom to the next),
// `leading` unused. N-major B (rows of K, N contiguous): `leading` = bytes from one 64-column
// block to the next, `stride` = 1024 (from 8 rows of K to the next 8).
__device__ __forceinline__ uint64_t desc128(uint32_t smem_addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void fence() {
#if SHARDSERVE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if SHARDSERVE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if SHARDSERVE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory written by ordinary stores or cp.async, made visible to wgmma's (async proxy) reads;
// a barrier after it publishes other threads' writes.
__device__ __forceinline__ void fence_proxy_async() {
#if SHARDSERVE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving reads or writes of accumulators across the asynchronous MMAs
// (their registers change under it between the issue and the wait).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

#define SHARDSERVE_WG_R32                                                                                          \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31"
#define SHARDSERVE_WG_R64                                                                                          \
  SHARDSERVE_WG_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
                    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SHARDSERVE_WG_R48                                                                                          \
  SHARDSERVE_WG_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define SHARDSERVE_WG_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define SHARDSERVE_WG_D32                                                                                    \
  SHARDSERVE_WG_D4(0), SHARDSERVE_WG_D4(1), SHARDSERVE_WG_D4(2), SHARDSERVE_WG_D4(3), SHARDSERVE_WG_D4(4), \
      SHARDSERVE_WG_D4(5), SHARDSERVE_WG_D4(6), SHARDSERVE_WG_D4(7)
#define SHARDSERVE_WG_D48 \
  SHARDSERVE_WG_D32, SHARDSERVE_WG_D4(8), SHARDSERVE_WG_D4(9), SHARDSERVE_WG_D4(10), SHARDSERVE_WG_D4(11)
#define SHARDSERVE_WG_D64                                                                                       \
  SHARDSERVE_WG_D32, SHARDSERVE_WG_D4(8), SHARDSERVE_WG_D4(9), SHARDSERVE_WG_D4(10), SHARDSERVE_WG_D4(11),     \
      SHARDSERVE_WG_D4(12), SHARDSERVE_WG_D4(13), SHARDSERVE_WG_D4(14), SHARDSERVE_WG_D4(15)
// One wgmma of shape m64n<NS>k16 on 16-bit type DT with FP32 accumulators (REGS: their operand
// numbers, OPS: the operands). SS: A and B from descriptors a and b, the accumulators kept unless
// the "r" operand numbered ACC is 0. RS: A from registers a[4], B (N-major) from descriptor b.
#define SHARDSERVE_WG_SS(NS, DT, REGS, OPS, A, B, ACC)                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ACC ", 0;\nwgmma.mma_async.sync.aligned.m64n" NS        \
               "k16.f32." DT "." DT " {" REGS "}, %" A ", %" B ", p, 1, 1, 0, 0;\n}\n"                         \
               : OPS                                                                                         \
               : "l"(a), "l"(b), "r"(acc))
#define SHARDSERVE_WG_RS(NS, DT, REGS, OPS, A0, A1, A2, A3, B)                                               \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" NS "k16.f32." DT "." DT " {" REGS "}, {%" A0 ", %" A1      \
               ", %" A2 ", %" A3 "}, %" B ", 1, 1, 1, 1;\n"                                                    \
               : OPS                                                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))

// d[64 x N] (+)= A[64 x 16] B[16 x N], A and B K-major in shared memory (descriptors a, b); d is
// overwritten when `accumulate` is false. N = 64, 96 or 128.
template <typename T, int N>
__device__ __forceinline__ void mma_ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate) {
#if SHARDSERVE_WGMMA
  const int acc = accumulate ? 1 : 0;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(N == 64 || N == 96 || N == 128, "N = 64, 96 or 128");
  if constexpr (N == 64 && kBf16) SHARDSERVE_WG_SS("64", "bf16", SHARDSERVE_WG_R32, SHARDSERVE_WG_D32, "32", "33", "34");
  if constexpr (N == 64 && !kBf16) SHARDSERVE_WG_SS("64", "f16", SHARDSERVE_WG_R32, SHARDSERVE_WG_D32, "32", "33", "34");
  if constexpr (N == 96 && kBf16) SHARDSERVE_WG_SS("96", "bf16", SHARDSERVE_WG_R48, SHARDSERVE_WG_D48, "48", "49", "50");
  if constexpr (N == 96 && !kBf16) SHARDSERVE_WG_SS("96", "f16", SHARDSERVE_WG_R48, SHARDSERVE_WG_D48, "48", "49", "50");
  if constexpr (N == 128 && kBf16) SHARDSERVE_WG_SS("128", "bf16", SHARDSERVE_WG_R64, SHARDSERVE_WG_D64, "64", "65", "66");
  if constexpr (N == 128 && !kBf16) SHARDSERVE_WG_SS("128", "f16", SHARDSERVE_WG_R64, SHARDSERVE_WG_D64, "64", "65", "66");
#endif
}

// d[64 x N] += A[64 x 16] B[16 x N]: A in registers (each warp's 16 rows as mma.sync's m16n8k16 A
// fragment), B N-major in shared memory (descriptor b). N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void mma_rs_bt(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b) {
#if SHARDSERVE_WGMMA
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(N == 64 || N == 128, "N = 64 or 128");
  if constexpr (N == 64 && kBf16) SHARDSERVE_WG_RS("64", "bf16", SHARDSERVE_WG_R32, SHARDSERVE_WG_D32, "32", "33", "34", "35", "36");
  if constexpr (N == 64 && !kBf16) SHARDSERVE_WG_RS("64", "f16", SHARDSERVE_WG_R32, SHARDSERVE_WG_D32, "32", "33", "34", "35", "36");
  if constexpr (N == 128 && kBf16) SHARDSERVE_WG_RS("128", "bf16", SHARDSERVE_WG_R64, SHARDSERVE_WG_D64, "64", "65", "66", "67", "68");
  if constexpr (N == 128 && !kBf16) SHARDSERVE_WG_RS("128", "f16", SHARDSERVE_WG_R64, SHARDSERVE_WG_D64, "64", "65", "66", "67", "68");
#endif
}

#undef SHARDSERVE_WG_RS
#undef SHARDSERVE_WG_SS
#undef SHARDSERVE_WG_D64
#undef SHARDSERVE_WG_D48
#undef SHARDSERVE_WG_R48
#undef SHARDSERVE_WG_D32
#undef SHARDSERVE_WG_D4
#undef SHARDSERVE_WG_R64
#undef SHARDSERVE_WG_R32

}  // namespace shardserve::kernels::wgmma
