// One-shot all-reduce over buffers every rank maps (kernels.h: one_shot_all_reduce).
//
// Why: at decode a row-parallel layer's all-reduce moves hidden x tokens x 2 bytes (16 KB a token
// for a 70B model), 160 times a token. NCCL's ring/tree protocols take ~16-19 us for that on two
// H200s; the floor is one NVLink round trip and one read of the peers' data, a few us. So each
// rank reads every peer's copy directly and sums locally: one kernel, one barrier.
//
// Protocol, per CTA b of a fixed grid (kBlocks CTAs, so a CTA owns the same 16-byte units of x in
// every call and on every rank):
//   1. epoch = ++signal[me].epoch[b] (only this CTA touches it);
//   2. copy its units of x into staging half (epoch & 1) of my buffer;
//   3. for each rank r: store-release epoch into signal[r].flags[b][me];
//   4. wait until signal[me].flags[b][r] >= epoch for every r (load-acquire), or the abort word;
//   5. sum its units over ranks 0..world-1 from their staging halves (epoch & 1) into x.
// A rank's call n + 2 overwrites the half its peers read in call n. That is safe: it runs after
// its own call n + 1, whose barrier saw every peer's call n + 1 flag, which each peer's CTA b
// raised only after its call n finished (stream order). Flags are compared as a signed difference
// (wrap-around), and a peer may already be one epoch ahead when a CTA looks (>=, not ==).
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace shardserve::kernels {
namespace {

constexpr int kBlocks = 32;
constexpr int kThreads = 512;

struct Signal {
  uint32_t flags[kBlocks][kMaxAllReduceRanks];  // [CTA][from rank]: the last epoch that rank raised here
  uint32_t epoch[kBlocks];                      // this rank's calls, per CTA
};

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// A staging unit of a peer, past the L1 (written by another GPU or process during this kernel).
__device__ __forceinline__ uint4 load_unit(const void* p) { return __ldcg(static_cast<const uint4*>(p)); }

template <typename T, int kRanks>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(AllReducePeers p, T* x, int64_t n) {
  constexpr int kVec = 16 / sizeof(T);
  using Unit = Pack<T, kVec>;
  // Launched with programmatic dependent launch (common.cuh): its launch hides behind the tail of
  // the layer before it, and nothing is touched until that has completed (so every kernel before
  // it, the previous all-reduce included, has).
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  auto* own = static_cast<Signal*>(p.signals[p.rank]);
  __shared__ uint32_t epoch_shared;
  if (threadIdx.x == 0) {
    const uint32_t e = own->epoch[b] + 1;
    own->epoch[b] = e;
    epoch_shared = e;
  }
  __syncthreads();
  const uint32_t epoch = epoch_shared;
  const size_t half = (epoch & 1u) * p.capacity;
  const int64_t units = (n + kVec - 1) / kVec;
  const bool x_vectors = aligned(x, 16);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(b) * blockDim.x + threadIdx.x;

  Unit* mine = reinterpret_cast<Unit*>(static_cast<char*>(p.buffers[p.rank]) + half);
  for (int64_t u = first; u < units; u += stride) {
    const int64_t e0 = u * kVec;
    if (x_vectors && e0 + kVec <= n) {
      mine[u] = reinterpret_cast<const Unit*>(x)[u];
    } else {
      Unit v;
#pragma unroll
      for (int i = 0; i < kVec; ++i) v.e[i] = e0 + i < n ? x[e0 + i] : from_f32<T>(0.0f);
      mine[u] = v;
    }
  }
  __syncthreads();
  // The barrier orders the CTA's copies before each flag's release (cumulative at system scope),
  // and each acquire before the CTA's reads of the peers' copies.
  if (threadIdx.x < kRanks) {
    store_release_sys(&static_cast<Signal*>(p.signals[threadIdx.x])->flags[b][p.rank], epoch);
    const uint32_t* flag = &own->flags[b][threadIdx.x];
    for (uint32_t spins = 1; static_cast<int32_t>(load_acquire_sys(flag) - epoch) < 0; ++spins) {
      if (spins % 256 == 0 && *p.abort_flag != 0) break;
    }
  }
  __syncthreads();

  const char* staged[kRanks];
#pragma unroll
  for (int r = 0; r < kRanks; ++r) staged[r] = static_cast<const char*>(p.buffers[r]) + half;
  for (int64_t u = first; u < units; u += stride) {
    Unit v[kRanks];
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      const uint4 raw = load_unit(staged[r] + u * 16);
      memcpy(&v[r], &raw, sizeof(raw));
    }
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = to_f32(v[0].e[i]);
#pragma unroll
    for (int r = 1; r < kRanks; ++r) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += to_f32(v[r].e[i]);
    }
    const int64_t e0 = u * kVec;
    if (x_vectors && e0 + kVec <= n) {
      Unit out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) out.e[i] = from_f32<T>(acc[i]);
      reinterpret_cast<Unit*>(x)[u] = out;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (e0 + i < n) x[e0 + i] = from_f32<T>(acc[i]);
      }
    }
  }
}

template <typename T, int kRanks>
cudaError_t launch(const AllReducePeers& p, void* x, int64_t n, cudaStream_t stream) {
  return launch_pdl(one_shot_kernel<T, kRanks>, dim3(kBlocks), dim3(kThreads), 0, stream, p, static_cast<T*>(x), n);
}

template <typename T>
cudaError_t launch_ranks(const AllReducePeers& p, void* x, int64_t n, cudaStream_t stream) {
  switch (p.world_size) {
    case 2: return launch<T, 2>(p, x, n, stream);
    case 3: return launch<T, 3>(p, x, n, stream);
    case 4: return launch<T, 4>(p, x, n, stream);
    case 5: return launch<T, 5>(p, x, n, stream);
    case 6: return launch<T, 6>(p, x, n, stream);
    case 7: return launch<T, 7>(p, x, n, stream);
    case 8: return launch<T, 8>(p, x, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t all_reduce_signal_bytes() {
  // Staging starts past it on a 256-byte boundary (whole 16-byte units, aligned sectors).
  return (sizeof(Signal) + 255) / 256 * 256;
}

bool one_shot_all_reduce_supported(int64_t n, DType dtype, int world_size, size_t capacity) {
  if (dtype != DType::kBF16 && dtype != DType::kF16 && dtype != DType::kF32) return false;
  if (world_size < 2 || world_size > kMaxAllReduceRanks || n < 0 || capacity % 16 != 0) return false;
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  return (bytes + 15) / 16 * 16 <= capacity;
}

cudaError_t one_shot_all_reduce(const AllReducePeers& peers, void* x, int64_t n, DType dtype, cudaStream_t stream) {
  if (!one_shot_all_reduce_supported(n, dtype, peers.world_size, peers.capacity) || peers.rank < 0 ||
      peers.rank >= peers.world_size || peers.abort_flag == nullptr) {
    return cudaErrorInvalidValue;
  }
  for (int r = 0; r < peers.world_size; ++r) {
    if (peers.signals[r] == nullptr || peers.buffers[r] == nullptr || !aligned(peers.buffers[r], 16)) {
      return cudaErrorInvalidValue;
    }
  }
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_ranks<T>(peers, x, n, stream); });
}

}  // namespace shardserve::kernels
