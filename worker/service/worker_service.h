// shardserve-worker: one rank of a worker group. Every rank registers with the coordinator and gets
// its assignment (checkpoint, rank, TP size); rank 0 loads the model into an EngineLoop and serves
// the Worker service (proto/shardserve/worker/v1) to the coordinator, and /metrics.
//
// Life of a worker: LOADING (serving GetStats, so the coordinator sees it) -> SERVING ->
// DRAINING on SIGTERM/SIGINT (new requests get UNAVAILABLE; in-flight ones get shutdown_timeout)
// -> exit. On the CPU backend, rank 0 runs all tp_size ranks as threads; followers in their own
// processes (GPU groups) need the NCCL executor, which this build does not have yet.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace shardserve {

struct WorkerOptions {
  std::string coordinator;  // host:port
  std::string group;
  int rank = 0;
  std::string host = "127.0.0.1";  // where the Worker service listens
  int port = 0;                    // 0: any free port
  std::string advertise_host;      // what the coordinator dials; default: host
  int metrics_port = -1;           // -1: off; 0: any free port
  std::chrono::milliseconds register_timeout{60000};
  std::chrono::milliseconds shutdown_timeout{30000};
  // Groups of one process per rank (process_group.h): rank 0's port for its followers (0: any
  // free port), and how long a collective may take before the group is declared broken.
  int group_port = 0;
  std::chrono::milliseconds collective_timeout{60000};
  // The GPU this process uses, among those it sees; -1: its rank in a group of processes (rank r
  // on GPU r: the ranks of a group share one node, one GPU each), else GPU 0. A group run as
  // threads of one process takes GPUs device .. device + tp_size - 1.
  int device = -1;
};

// Runs until SIGTERM/SIGINT (which the caller has blocked in every thread). An error for a failed
// registration or load.
absl::Status run_worker(const WorkerOptions& options);

}  // namespace shardserve
