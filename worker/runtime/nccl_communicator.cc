#include "worker/runtime/nccl_communicator.h"

#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::kF32: return ncclFloat32;
    case DType::kF16: return ncclFloat16;
    case DType::kBF16: return ncclBfloat16;
    case DType::kI32: return ncclInt32;
    default: throw std::logic_error("NCCL: no collective type for " + std::string(dtype_name(d)));
  }
}

std::string nccl_message(ncclResult_t r, ncclComm_t comm) {
  std::string msg = ncclGetErrorString(r);
  if (comm != nullptr) {
    if (const char* last = ncclGetLastError(comm); last != nullptr && *last != '\0') msg += absl::StrCat(" (", last, ")");
  }
  return msg;
}

// Polls a non-blocking communicator until its last call has finished: that call's result, or
// ncclInProgress once `deadline` has passed.
ncclResult_t settle(ncclComm_t comm, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    ncclResult_t state = ncclInProgress;
    if (ncclResult_t r = ncclCommGetAsyncError(comm, &state); r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (std::chrono::steady_clock::now() > deadline) return ncclInProgress;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace

absl::StatusOr<std::string> NcclCommunicator::new_unique_id() {
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
    return absl::UnavailableError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::create(CudaBackend& gpu,
                                                                           const std::string& unique_id, int rank,
                                                                           int world_size,
                                                                           std::chrono::milliseconds timeout) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(
        absl::StrCat("an NCCL unique id has ", sizeof(id.internal), " bytes, got ", unique_id.size()));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is not in a group of ", world_size));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  gpu.bind_thread();
  // A rank that is lost before the group has formed must fail the others' start, not hang it. So
  // the communicator is non-blocking (its init can be given up on: ncclCommAbort) and makes every
  // connection during init (NCCL_RUNTIME_CONNECT=0, unless the environment says otherwise), not
  // lazily inside the first collectives of the warm-up, where a lost peer would block the host.
  setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
  if (r == ncclSuccess || r == ncclInProgress) r = settle(comm, std::chrono::steady_clock::now() + timeout);
  if (r != ncclSuccess) {
    const std::string why = r == ncclInProgress
                                ? absl::StrCat("not every rank joined within ",
                                               std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                                               " s (a rank is missing or stuck)")
                                : nccl_message(r, comm);
    if (comm != nullptr) ncclCommAbort(comm);
    return absl::UnavailableError(absl::StrCat("rank ", rank, " of ", world_size, " could not join the NCCL group: ", why));
  }
  auto c = wrap(gpu, comm, rank, world_size, timeout);
  c->non_blocking_ = true;
  return c;
}

absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> NcclCommunicator::create_local_group(
    const std::vector<CudaBackend*>& gpus, std::chrono::milliseconds timeout) {
  const int n = static_cast<int>(gpus.size());
  std::vector<int> devices;
  for (CudaBackend* g : gpus) devices.push_back(g->device());
  std::vector<ncclComm_t> comms(gpus.size(), nullptr);
  if (ncclResult_t r = ncclCommInitAll(comms.data(), n, devices.data()); r != ncclSuccess) {
    return absl::UnavailableError(absl::StrCat("NCCL could not make a group of ", n, " GPUs: ", ncclGetErrorString(r)));
  }
  std::vector<std::unique_ptr<NcclCommunicator>> out;
  for (int r = 0; r < n; ++r) out.push_back(wrap(*gpus[static_cast<size_t>(r)], comms[static_cast<size_t>(r)], r, n, timeout));
  return out;
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::wrap(CudaBackend& gpu, void* comm, int rank, int world_size,
                                                         std::chrono::milliseconds timeout) {
  auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator());
  c->gpu_ = &gpu;
  c->rank_ = rank;
  c->world_size_ = world_size;
  c->comm_ = comm;
  c->timeout_ = timeout;
  NcclCommunicator* self = c.get();
  gpu.set_watchdog([self, timeout](std::chrono::steady_clock::duration waited) -> std::string {
    if (self->aborted()) {
      std::lock_guard lock(self->mu_);
      return self->reason_;
    }
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(static_cast<ncclComm_t>(self->comm_), &async);
    std::string reason;
    if (async != ncclSuccess && async != ncclInProgress) {
      reason = absl::StrCat("rank ", self->rank_, ": NCCL error: ",
                            nccl_message(async, static_cast<ncclComm_t>(self->comm_)));
    } else if (waited > timeout) {
      reason = absl::StrCat("rank ", self->rank_, " of ", self->world_size_, ": a step did not finish within ",
                            std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                            " s; a peer rank is stuck or gone (collective timeout)");
    }
    if (reason.empty()) return reason;
    self->abort(reason);
    std::lock_guard lock(self->mu_);
    return self->reason_;
  });
  return c;
}


NcclCommunicator::~NcclCommunicator() {
  if (comm_ == nullptr) return;
  gpu_->set_watchdog(nullptr);
  if (aborted_.load()) return;  // ncclCommAbort already freed it
  // Finalize waits for outstanding work; a healthy group has none at this point. Every rank of
  // the group finalizes at the same time (each on its own thread or process).
  gpu_->bind_thread();
  auto comm = static_cast<ncclComm_t>(comm_);
  ncclResult_t r = ncclCommFinalize(comm);
  if (non_blocking_ && r == ncclInProgress) r = settle(comm, std::chrono::steady_clock::now() + std::chrono::seconds(30));
  if (r == ncclSuccess) {
    ncclCommDestroy(comm);
  } else {
    ncclCommAbort(comm);  // a peer that never finalizes must not hold this rank's exit
  }
}

void NcclCommunicator::abort(const std::string& reason) {
  std::lock_guard lock(mu_);
  if (aborted_.load()) return;
  reason_ = reason;
  aborted_.store(true);
  if (custom_ != nullptr) custom_->abort();  // a one-shot kernel waiting for a peer returns
  // Ends the kernels of in-flight collectives, so the stream drains and no thread stays blocked.
  ncclCommAbort(static_cast<ncclComm_t>(comm_));
}

void NcclCommunicator::check_usable() const {
  if (aborted_.load()) {
    std::lock_guard lock(mu_);
    throw CollectiveError(reason_);
  }
}

void NcclCommunicator::check_enqueued(int result, const char* call) {
  auto comm = static_cast<ncclComm_t>(comm_);
  auto r = static_cast<ncclResult_t>(result);
  // A non-blocking communicator may still be enqueueing the call: wait for that (not for the
  // collective itself, which the stream and its watchdog wait for).
  if (non_blocking_ && r == ncclInProgress) r = settle(comm, std::chrono::steady_clock::now() + timeout_);
  if (r == ncclSuccess) return;
  const std::string why = r == ncclInProgress ? std::string("still enqueueing after the collective timeout")
                                              : nccl_message(r, comm);
  const std::string reason = absl::StrCat("rank ", rank_, ": ", call, ": ", why);
  abort(reason);
  throw CollectiveError(reason);
}

void NcclCommunicator::all_reduce(Tensor& x) {
  check_usable();
  if (takes_custom(x)) {
    custom_->all_reduce(x);
    return;
  }
  auto comm = static_cast<ncclComm_t>(comm_);
  ncclResult_t r = ncclAllReduce(x.data, x.data, static_cast<size_t>(x.numel()), nccl_type(x.dtype), ncclSum, comm,
                                 gpu_->stream());
  check_enqueued(r, "ncclAllReduce");
}

void NcclCommunicator::all_gather(const Tensor& x, Tensor& out) {
  check_usable();
  if (out.numel() != x.numel() * world_size_ || out.dtype != x.dtype) {
    throw std::logic_error("all_gather: out must hold world_size copies of x's shape and dtype");
  }
  auto comm = static_cast<ncclComm_t>(comm_);
  ncclResult_t r = ncclAllGather(x.data, out.data, static_cast<size_t>(x.numel()), nccl_type(x.dtype), comm,
                                 gpu_->stream());
  check_enqueued(r, "ncclAllGather");
}

}  // namespace shardserve
