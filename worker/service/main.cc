// shardserve-worker: one rank of a worker group (see worker_service.h).
//   shardserve-worker --coordinator HOST:PORT --group NAME [--rank R]
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "worker/service/worker_service.h"

int main(int argc, char** argv) {
  // A parent may have left them ignored (background jobs of a script): an ignored signal is
  // dropped, never waited for. Then blocked before any thread starts, so that only the worker's sigwait sees them.
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  CLI::App app{"shardserve-worker: one rank of a worker group"};
  shardserve::WorkerOptions o;
  int64_t register_timeout_ms = o.register_timeout.count();
  double shutdown_timeout_s = 30;
  std::string log_level = "info";
  app.add_option("--coordinator", o.coordinator, "The coordinator, host:port")->required();
  app.add_option("--group", o.group, "The group of the cluster config this worker joins")->required();
  app.add_option("--rank", o.rank, "Rank in the group (a StatefulSet ordinal, say)")->capture_default_str();
  app.add_option("--host", o.host, "Address the Worker service listens on")->capture_default_str();
  app.add_option("--port", o.port, "Port of the Worker service (0: any free port)")->capture_default_str();
  app.add_option("--advertise-host", o.advertise_host, "Host the coordinator dials (default: --host)");
  app.add_option("--metrics-port", o.metrics_port, "Prometheus /metrics port (0: any free port; -1: off)")
      ->capture_default_str();
  app.add_option("--register-timeout-ms", register_timeout_ms, "Give up registering after this long")
      ->capture_default_str();
  app.add_option("--shutdown-timeout", shutdown_timeout_s, "Seconds in-flight requests get to finish on SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")->capture_default_str();
  int64_t collective_timeout_ms = o.collective_timeout.count();
  app.add_option("--group-port", o.group_port, "Rank 0 of a group of processes: port its followers connect to (0: any)")
      ->capture_default_str();
  app.add_option("--collective-timeout-ms", collective_timeout_ms,
                 "A group of processes fails (loudly) when a collective takes longer than this: a rank stuck or gone")
      ->capture_default_str();
  app.add_option("--device", o.device,
                 "GPU index (among those visible) for this process; -1: its rank in a group of processes, else 0")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  o.register_timeout = std::chrono::milliseconds(register_timeout_ms);
  o.collective_timeout = std::chrono::milliseconds(collective_timeout_ms);
  o.shutdown_timeout = std::chrono::milliseconds(static_cast<int64_t>(shutdown_timeout_s * 1000));
  const absl::Status st = shardserve::run_worker(o);
  if (!st.ok()) {
    std::cerr << "error: " << st.message() << "\n";
    return 1;
  }
  return 0;
}
