#include "worker/runtime/inproc_communicator.h"

#include <algorithm>
#include <cstring>

namespace shardserve {

// Rank r's view of the group.
class InProcessGroup::Rank final : public Communicator {
 public:
  Rank(InProcessGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return group_.world_size_; }
  void abort(const std::string& reason) override { group_.abort(reason); }

  void all_reduce(Tensor& x) override {
    require_f32(x, "all_reduce");
    group_.barrier(rank_, "all_reduce", x.as<float>(), x.numel(), "all_reduce");
    // Rank order on every rank: identical sums everywhere.
    float* out = x.as<float>();
    std::fill(out, out + x.numel(), 0.0f);
    for (const Slot& slot : group_.slots()) {
      for (size_t i = 0; i < slot.data.size(); ++i) out[i] += slot.data[i];
    }
    group_.barrier(rank_, nullptr, nullptr, 0, "all_reduce");  // all have read the slots
  }

  void all_gather(const Tensor& x, Tensor& out) override {
    require_f32(x, "all_gather input");
    require_f32(out, "all_gather output");
    if (out.numel() != x.numel() * world_size()) {
      group_.fail("all_gather on rank " + std::to_string(rank_) + ": output of shape " + shape_string(out.shape) +
                  " does not hold " + std::to_string(world_size()) + " x " + shape_string(x.shape));
    }
    group_.barrier(rank_, "all_gather", x.as<float>(), x.numel(), "all_gather");
    for (int r = 0; r < world_size(); ++r) {
      const Slot& slot = group_.slots()[static_cast<size_t>(r)];
      std::copy(slot.data.begin(), slot.data.end(), out.as<float>() + r * x.numel());
    }
    group_.barrier(rank_, nullptr, nullptr, 0, "all_gather");  // all have read the slots
  }

 private:
  void require_f32(const Tensor& t, const char* what) {
    if (t.dtype != DType::kF32) {
      group_.fail(std::string(what) + " on rank " + std::to_string(rank_) + ": the in-process communicator takes F32, got " +
                  std::string(dtype_name(t.dtype)));
    }
  }

  InProcessGroup& group_;
  const int rank_;
};

InProcessGroup::InProcessGroup(int world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size),
      timeout_(timeout),
      arrived_(static_cast<size_t>(std::max(world_size, 0)), 0),
      slots_(static_cast<size_t>(std::max(world_size, 0))) {
  if (world_size < 1) throw std::invalid_argument("InProcessGroup: world_size must be at least 1");
  for (int r = 0; r < world_size; ++r) ranks_.push_back(std::make_unique<Rank>(*this, r));
}

InProcessGroup::~InProcessGroup() = default;

Communicator& InProcessGroup::comm(int rank) { return *ranks_.at(static_cast<size_t>(rank)); }

void InProcessGroup::abort(const std::string& reason) {
  std::lock_guard lock(mu_);
  if (!broken_) {
    broken_ = true;
    reason_ = reason;
  }
  cv_.notify_all();
}

bool InProcessGroup::broken() const {
  std::lock_guard lock(mu_);
  return broken_;
}

void InProcessGroup::fail_locked(const std::string& reason) {
  if (!broken_) {
    broken_ = true;
    reason_ = reason;
  }
  cv_.notify_all();
  throw CollectiveError(reason_);
}

void InProcessGroup::fail(const std::string& reason) {
  std::unique_lock lock(mu_);
  fail_locked(reason);
}

void InProcessGroup::barrier(int rank, const char* op, const float* data, int64_t numel, const char* name) {
  std::unique_lock lock(mu_);
  if (broken_) throw CollectiveError(reason_);
  if (op != nullptr) {
    Slot& slot = slots_[static_cast<size_t>(rank)];
    slot.op = op;
    slot.data.assign(data, data + numel);
  }
  arrived_[static_cast<size_t>(rank)] = 1;
  const uint64_t generation = generation_;
  if (++num_arrived_ == world_size_) {
    // Last to arrive: every slot is posted; check they agree before anyone reads them.
    if (op != nullptr) {
      for (int r = 0; r < world_size_; ++r) {
        const Slot& other = slots_[static_cast<size_t>(r)];
        if (std::strcmp(other.op, op) != 0 || other.data.size() != static_cast<size_t>(numel)) {
          fail_locked("collective mismatch: rank " + std::to_string(rank) + " called " + op + " on " +
                      std::to_string(numel) + " elements, rank " + std::to_string(r) + " called " + other.op + " on " +
                      std::to_string(other.data.size()));
        }
      }
    }
    // Open the barrier for everyone (arrivals -> next generation).
    num_arrived_ = 0;
    std::fill(arrived_.begin(), arrived_.end(), 0);
    ++generation_;
    cv_.notify_all();
    return;
  }
  const bool opened = cv_.wait_for(lock, timeout_, [&] { return broken_ || generation_ != generation; });
  if (broken_) throw CollectiveError(reason_);
  if (!opened) {
    std::string missing;
    for (int r = 0; r < world_size_; ++r) {
      if (!arrived_[static_cast<size_t>(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    }
    fail_locked(std::string(name) + " on rank " + std::to_string(rank) + ": rank(s) " + missing +
                " did not arrive within " + std::to_string(timeout_.count()) + " ms; the tensor-parallel group is broken");
  }
}

}  // namespace shardserve
