// Communicator: the collectives tensor parallelism needs, between the ranks of one group.
// Every rank of a group calls the same collectives in the same order with tensors of the same
// shape and dtype; a call returns when the result is in place on this rank. A collective that
// cannot complete (a rank lost or out of step) never returns normally: it throws// CollectiveError saying why (InProcessGroup after its timeout; NcclCommunicator from its
// watchdog).
#pragma once

#include <stdexcept>
#include <string>

#include "worker/runtime/tensor.h"

namespace shardserve {

// A collective that cannot complete: the group is broken for good (its ranks' KV caches are no
// longer in step), so the process running it must end or rebuild the group.
class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // In place: x = sum over ranks of x.
  virtual void all_reduce(Tensor& x) = 0;
  // out [world_size * x.dim(0), ...] = x of rank 0, then rank 1, ... along dimension 0.
  virtual void all_gather(const Tensor& x, Tensor& out) = 0;
  // ok -> broken, for the whole group: collectives waiting now or called later, on every rank,
  // throw CollectiveError(reason) (the first reason is kept). For a rank that fails outside a
  // collective, so its peers stop at once instead of waiting out a timeout. Thread-safe.
  virtual void abort(const std::string& reason) { (void)reason; }
};

// The communicator of a group of one: every collective is the identity.
class SingleRankCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_reduce(Tensor&) override {}
  // With one rank the gathered tensor is x itself: callers pass out == x (or skip the call).
  void all_gather(const Tensor&, Tensor&) override {}
};

}  // namespace shardserve
