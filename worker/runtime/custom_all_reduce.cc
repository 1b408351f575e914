#include "worker/runtime/custom_all_reduce.h"

#include <cuda_runtime.h>

#include <charconv>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "worker/runtime/cuda_backend.h"

namespace shardserve {
namespace {

std::string cuda_message(const char* what, cudaError_t e) {
  cudaGetLastError();  // a failed mapping is not a sticky error: leave the context usable
  return absl::StrCat(what, ": ", cudaGetErrorString(e));
}

char* offset(void* base, size_t bytes) { return static_cast<char*>(base) + bytes; }

}  // namespace

absl::StatusOr<size_t> CustomAllReduce::configured_capacity() {
  const char* env = std::getenv("SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultCapacity;
  uint64_t bytes = 0;
  const char* end = env + std::strlen(env);
  auto [ptr, ec] = std::from_chars(env, end, bytes);
  if (ec != std::errc() || ptr != end || bytes > (uint64_t{1} << 34)) {
    return absl::InvalidArgumentError(absl::StrCat("SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES=", env,
                                                   " is not a byte count (0 .. 16 GiB; 0 turns the one-shot all-reduce off)"));
  }
  return static_cast<size_t>((bytes + 15) / 16 * 16);
}

absl::Status CustomAllReduce::allocate(size_t capacity) {
  if (capacity == 0 || capacity % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("all-reduce staging of ", capacity, " bytes is not whole 16-byte units"));
  }
  gpu_->bind_thread();
  const size_t signal = kernels::all_reduce_signal_bytes();
  if (cudaError_t e = cudaMalloc(&own_, signal + 2 * capacity); e != cudaSuccess) {
    own_ = nullptr;
    return absl::ResourceExhaustedError(cuda_message("cudaMalloc (all-reduce buffers)", e));
  }
  // Zeroed before any peer can see it: a peer's first flag may arrive as soon as it has mapped it.
  if (cudaError_t e = cudaMemset(own_, 0, signal); e != cudaSuccess) return absl::InternalError(cuda_message("cudaMemset", e));
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return absl::InternalError(cuda_message("cudaDeviceSynchronize", e));
  void* host = nullptr;
  if (cudaError_t e = cudaHostAlloc(&host, sizeof(int32_t), cudaHostAllocMapped | cudaHostAllocPortable); e != cudaSuccess) {
    return absl::ResourceExhaustedError(cuda_message("cudaHostAlloc (all-reduce abort word)", e));
  }
  abort_host_ = static_cast<int32_t*>(host);
  __atomic_store_n(abort_host_, 0, __ATOMIC_SEQ_CST);
  void* device_view = nullptr;
  if (cudaError_t e = cudaHostGetDevicePointer(&device_view, host, 0); e != cudaSuccess) {
    return absl::InternalError(cuda_message("cudaHostGetDevicePointer", e));
  }
  peers_.abort_flag = static_cast<const volatile int32_t*>(device_view);
  peers_.capacity = capacity;
  peers_.signals[peers_.rank] = own_;
  peers_.buffers[peers_.rank] = offset(own_, signal);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CustomAllReduce>> CustomAllReduce::create(CudaBackend& gpu, int rank, int world_size,
                                                                         const Exchange& exchange, size_t capacity,
                                                                         std::string* unavailable) {
  if (world_size < 2 || world_size > kernels::kMaxAllReduceRanks || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("a one-shot all-reduce takes 2 to ", kernels::kMaxAllReduceRanks,
                                                   " ranks; rank ", rank, " of ", world_size));
  }
  auto self = std::unique_ptr<CustomAllReduce>(new CustomAllReduce(gpu));
  self->peers_.rank = rank;
  self->peers_.world_size = world_size;
  // Round 1: every rank's capacity and IPC handle ("1" + 8 bytes + handle), or why it has none
  // ("0" + reason). Every rank takes part even when it opts out, so all learn the same outcome.
  absl::Status st = capacity == 0 ? absl::UnavailableError(absl::StrCat("rank ", rank, " opted out (capacity 0)"))
                                  : self->allocate(capacity);
  cudaIpcMemHandle_t handle{};
  if (st.ok()) {
    if (cudaError_t e = cudaIpcGetMemHandle(&handle, self->own_); e != cudaSuccess) {
      st = absl::UnavailableError(absl::StrCat("rank ", rank, ": ", cuda_message("cudaIpcGetMemHandle", e)));
    }
  }
  constexpr size_t kEntry = 1 + sizeof(uint64_t) + sizeof(cudaIpcMemHandle_t);
  std::string mine;
  if (st.ok()) {
    const uint64_t cap = capacity;
    mine = "1" + std::string(reinterpret_cast<const char*>(&cap), sizeof(cap)) +
           std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
  } else {
    mine = "0" + std::string(st.message());
  }
  auto handles = exchange(mine);
  if (!handles.ok()) return handles.status();
  if (static_cast<int>(handles->size()) != world_size) {
    return absl::DataLossError(absl::StrCat("the all-reduce handle exchange returned ", handles->size(), " entries for ",
                                            world_size, " ranks"));
  }
  // Round 2: whether this rank mapped every peer ("1") or why not ("0" + reason).
  std::string why;
  for (int r = 0; r < world_size && why.empty(); ++r) {
    const std::string& h = (*handles)[static_cast<size_t>(r)];
    if (h.empty() || h[0] != '1') {
      why = h.empty() ? absl::StrCat("rank ", r, " exported no buffer") : h.substr(1);
    } else if (h.size() != kEntry) {
      why = absl::StrCat("rank ", r, " sent a malformed buffer handle");
    } else {
      uint64_t cap = 0;
      std::memcpy(&cap, h.data() + 1, sizeof(cap));
      if (cap != capacity) {
        why = absl::StrCat("the ranks' staging sizes differ (rank ", r, ": ", cap, " bytes, rank ", rank, ": ",
                           capacity, "); set SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES alike on every rank");
      }
    }
  }
  const size_t signal = kernels::all_reduce_signal_bytes();
  gpu.bind_thread();
  for (int r = 0; r < world_size && why.empty(); ++r) {
    if (r == rank) continue;
    cudaIpcMemHandle_t peer{};
    std::memcpy(&peer, (*handles)[static_cast<size_t>(r)].data() + 1 + sizeof(uint64_t), sizeof(peer));
    void* mapped = nullptr;
    if (cudaError_t e = cudaIpcOpenMemHandle(&mapped, peer, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
      why = absl::StrCat("rank ", rank, " could not map rank ", r, "'s buffer (", cuda_message("cudaIpcOpenMemHandle", e), ")");
      break;
    }
    self->opened_.push_back(mapped);
    self->peers_.signals[r] = mapped;
    self->peers_.buffers[r] = offset(mapped, signal);
  }
  auto verdicts = exchange(why.empty() ? std::string("1") : "0" + why);
  if (!verdicts.ok()) return verdicts.status();
  for (const std::string& v : *verdicts) {
    if (v.empty() || v[0] != '1') {
      if (unavailable != nullptr) *unavailable = v.empty() ? std::string("a rank sent no verdict") : v.substr(1);
      return std::unique_ptr<CustomAllReduce>();
    }
  }
  return self;
}

absl::StatusOr<std::vector<std::unique_ptr<CustomAllReduce>>> CustomAllReduce::create_local(
    const std::vector<CudaBackend*>& gpus, size_t capacity, std::string* unavailable) {
  const int n = static_cast<int>(gpus.size());
  if (n < 2 || n > kernels::kMaxAllReduceRanks) {
    return absl::InvalidArgumentError(absl::StrCat("a one-shot all-reduce takes 2 to ", kernels::kMaxAllReduceRanks,
                                                   " ranks, got ", n));
  }
  // Each GPU must reach every other one's memory.
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      const int a = gpus[static_cast<size_t>(i)]->device(), b = gpus[static_cast<size_t>(j)]->device();
      if (a == b) continue;
      int can = 0;
      if (cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || can == 0) {
        cudaGetLastError();
        if (unavailable != nullptr) *unavailable = absl::StrCat("GPU ", a, " has no peer access to GPU ", b);
        return std::vector<std::unique_ptr<CustomAllReduce>>();
      }
      gpus[static_cast<size_t>(i)]->bind_thread();
      if (cudaError_t e = cudaDeviceEnablePeerAccess(b, 0); e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) {
        if (unavailable != nullptr) *unavailable = cuda_message("cudaDeviceEnablePeerAccess", e);
        return std::vector<std::unique_ptr<CustomAllReduce>>();
      }
      cudaGetLastError();  // clears cudaErrorPeerAccessAlreadyEnabled
    }
  }
  std::vector<std::unique_ptr<CustomAllReduce>> ranks;
  for (int r = 0; r < n; ++r) {
    auto self = std::unique_ptr<CustomAllReduce>(new CustomAllReduce(*gpus[static_cast<size_t>(r)]));
    self->peers_.rank = r;
    self->peers_.world_size = n;
    if (absl::Status st = self->allocate(capacity); !st.ok()) return st;
    ranks.push_back(std::move(self));
  }
  for (auto& self : ranks) {
    for (int r = 0; r < n; ++r) {
      self->peers_.signals[r] = ranks[static_cast<size_t>(r)]->peers_.signals[r];
      self->peers_.buffers[r] = ranks[static_cast<size_t>(r)]->peers_.buffers[r];
    }
  }
  return ranks;
}

CustomAllReduce::~CustomAllReduce() {
  gpu_->bind_thread();
  for (void* p : opened_) cudaIpcCloseMemHandle(p);
  if (own_ != nullptr) cudaFree(own_);
  if (abort_host_ != nullptr) cudaFreeHost(abort_host_);
  cudaGetLastError();
}

bool CustomAllReduce::takes(const Tensor& x) const {
  return kernels::one_shot_all_reduce_supported(x.numel(), x.dtype, peers_.world_size, peers_.capacity);
}

void CustomAllReduce::all_reduce(Tensor& x) {
  if (cudaError_t e = kernels::one_shot_all_reduce(peers_, x.data, x.numel(), x.dtype, gpu_->stream()); e != cudaSuccess) {
    throw std::runtime_error(absl::StrCat("one-shot all-reduce of ", x.numel(), " elements on rank ", peers_.rank,
                                          ": ", std::string(cudaGetErrorString(e))));
  }
}

void CustomAllReduce::abort() {
  if (abort_host_ != nullptr) __atomic_store_n(abort_host_, 1, __ATOMIC_SEQ_CST);
}

}  // namespace shardserve
