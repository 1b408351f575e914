// `shardserve serve`: one command that serves a model on this machine. It writes a cluster config
// with one group, starts shardserve-coordinator and the group's workers as child processes (from
// the folder of this binary), waits until the group is serving, prints the address, and stops them
// all on Ctrl-C (SIGINT) or SIGTERM. If any child dies, it stops the others and fails.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/cli/commands.h"

extern char** environ;

namespace shardserve::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct ServeArgs {
  std::string model;
  std::string synthetic;
  std::string served_model_name;
  int tp_size = 1;
  std::string backend = "cpu";
  std::string quantization = "none";
  std::string dtype = "auto";
  std::string host = "127.0.0.1";
  int port = 50051;
  int metrics_port = -1;
  int http_port = -1;
  int64_t num_kv_blocks = 0;
  int64_t max_model_len = 0;
  int64_t max_num_seqs = 0;
  double shutdown_timeout = 30;
  double start_timeout = 600;
  int max_worker_restarts = 5;
};

struct Child {
  std::string name;
  pid_t pid = -1;
  bool is_worker() const { return name.rfind("shardserve-worker", 0) == 0; }
};

std::string default_model() {
  // The tiny checkpoint with the real Llama 3.1 tokenizer (text in, text out) when it is there.
  const fs::path data = fs::path(SHARDSERVE_SOURCE_DIR) / "tests/data/tiny";
  if (fs::exists(data / "llama3-tokenizer-bf16/config.json")) return (data / "llama3-tokenizer-bf16").string();
  return (data / "llama3-gqa-bf16").string();
}

pid_t spawn(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, ours;
  sigemptyset(&none);
  sigemptyset(&ours);
  sigaddset(&ours, SIGINT);
  sigaddset(&ours, SIGTERM);
  posix_spawnattr_setsigmask(&attr, &none);     // children handle their own signals,
  posix_spawnattr_setsigdefault(&attr, &ours);  // even if ours were ignored
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], nullptr, &attr, args.data(), environ);
  posix_spawnattr_destroy(&attr);
  return rc == 0 ? pid : -1;
}

// The first child that has exited, if any (reaped).
const Child* exited_child(std::vector<Child>& children, int* status) {
  for (Child& c : children) {
    if (c.pid > 0 && waitpid(c.pid, status, WNOHANG) == c.pid) {
      c.pid = -1;
      return &c;
    }
  }
  return nullptr;
}

void stop_all(std::vector<Child>& children, double timeout_s) {
  for (const Child& c : children) if (c.pid > 0) kill(c.pid, SIGTERM);
  const auto give_up = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000) + 5000);
  for (Child& c : children) {
    while (c.pid > 0) {
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.pid = -1;
      } else if (Clock::now() > give_up) {
        std::cerr << "shardserve: " << c.name << " did not stop; killing it\n";
        kill(c.pid, SIGKILL);
        waitpid(c.pid, &status, 0);
        c.pid = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling a child's exit
      }
    }
  }
}

// SIGINT/SIGTERM received within `timeout` (they are blocked; this is where they are taken).
bool got_signal(std::chrono::milliseconds timeout) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  timespec ts{static_cast<time_t>(timeout.count() / 1000), static_cast<long>((timeout.count() % 1000) * 1000000)};
  return sigtimedwait(&signals, nullptr, &ts) > 0;
}

int run_serve(const ServeArgs& args) {
  if (args.port <= 0) {
    std::cerr << "error: --port must be a port number (the workers need to know it in advance)\n";
    return 1;
  }
  if (args.http_port == 0 || args.http_port < -1) {
    std::cerr << "error: --http-port must be a port number, or -1 for no HTTP API\n";
    return 1;
  }
  if (!args.model.empty() && !args.synthetic.empty()) {
    std::cerr << "error: give one of --model and --synthetic\n";
    return 1;
  }
  // --synthetic: a preset's name stays a name; a config.json path becomes absolute.
  const bool synthetic_path = args.synthetic.find('/') != std::string::npos || args.synthetic.ends_with(".json");
  const std::string synthetic = synthetic_path ? fs::absolute(args.synthetic).string() : args.synthetic;
  if (synthetic_path && !fs::is_regular_file(synthetic)) {
    std::cerr << "error: --synthetic " << args.synthetic << ": no such config.json file\n";
    return 1;
  }
  const std::string model_dir =
      synthetic.empty() ? fs::absolute(args.model.empty() ? default_model() : args.model).string() : "";
  if (synthetic.empty() && !fs::exists(fs::path(model_dir) / "config.json")) {
    std::cerr << "error: " << model_dir << " has no config.json: not a Hugging Face checkpoint\n";
    return 1;
  }
  const std::string default_name =
      synthetic.empty() ? fs::path(model_dir).filename().string()
                        : (synthetic_path ? fs::path(synthetic).parent_path().filename().string() : synthetic);
  const std::string name = args.served_model_name.empty() ? default_name : args.served_model_name;
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  char tmpl[] = "/tmp/shardserve-serve-XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::cerr << "error: cannot create a temporary folder\n";
    return 1;
  }
  const fs::path work = tmpl;
  const fs::path config = work / "cluster.yaml";
  const fs::path ready = work / "ready.json";
  {
    std::ofstream out(config);
    out << "# written by shardserve serve\n"
        << "models:\n  - name: \"" << name << "\"\n    "
        << (synthetic.empty() ? "checkpoint: \"" + model_dir : "synthetic: \"" + synthetic) << "\"\n"
        << "groups:\n  - name: main\n    model: \"" << name << "\"\n    tp_size: " << args.tp_size
        << "\n    backend: " << args.backend << "\n    quantization: " << args.quantization
        << "\n    dtype: " << args.dtype << "\n    num_kv_blocks: " << args.num_kv_blocks
        << "\n    max_model_len: " << args.max_model_len << "\n    max_num_seqs: " << args.max_num_seqs << "\n";
  }
  const std::string connect_host = args.host == "0.0.0.0" ? "127.0.0.1" : args.host;
  const std::string coordinator = absl::StrCat(connect_host, ":", args.port);
  const std::string shutdown = std::to_string(args.shutdown_timeout);

  std::vector<Child> children;
  auto start = [&](const std::string& what, const std::vector<std::string>& argv) {
    const pid_t pid = spawn(argv);
    if (pid < 0) {
      std::cerr << "error: cannot start " << argv[0] << "\n";
      return false;
    }
    children.push_back({what, pid});
    return true;
  };
  bool ok = start("shardserve-coordinator",
                  {(bin / "shardserve-coordinator").string(), "--config", config.string(), "--host", args.host,
                   "--port", std::to_string(args.port), "--metrics-port", std::to_string(args.metrics_port),
                   "--http-port", std::to_string(args.http_port), "--ready-file", ready.string(),
                   "--shutdown-timeout", shutdown});
  // CPU ranks are threads of one process; GPU ranks are one process each.
  const int processes = args.backend == "cpu" ? 1 : args.tp_size;
  auto start_worker = [&](int rank) {
    return start(absl::StrCat("shardserve-worker rank ", rank),
                 {(bin / "shardserve-worker").string(), "--coordinator", coordinator, "--group", "main", "--rank",
                  std::to_string(rank), "--metrics-port", args.metrics_port >= 0 ? "0" : "-1", "--shutdown-timeout",
                  shutdown});
  };
  for (int rank = 0; ok && rank < processes; ++rank) ok = start_worker(rank);

  int exit_code = 0;
  bool stopping = !ok;
  const auto give_up = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(args.start_timeout * 1000));
  while (!stopping && !fs::exists(ready)) {
    int status = 0;
    if (const Child* c = exited_child(children, &status)) {
      std::cerr << "error: " << c->name << " exited during start-up (status " << status << ")\n";
      exit_code = 1;
      stopping = true;
    } else if (got_signal(std::chrono::milliseconds(100))) {
      stopping = true;
    } else if (Clock::now() > give_up) {
      std::cerr << "error: the model was not serving after " << args.start_timeout << " s\n";
      exit_code = 1;
      stopping = true;
    }
  }
  if (!stopping) {
    std::cout << "shardserve: serving model '" << name << "' (" << (synthetic.empty() ? model_dir : "synthetic " + synthetic) << ") at " << coordinator;
    if (args.metrics_port >= 0) std::cout << ", metrics at http://" << connect_host << ":" << args.metrics_port << "/metrics";
    if (args.http_port > 0) {
      std::cout << ", OpenAI-compatible HTTP API at http://" << connect_host << ":" << args.http_port << "/v1";
    }
    std::cout << "\n  try: " << (bin / "shardserve").string() << " client --address " << coordinator
              << " --prompt 'Hello'   (Ctrl-C stops the server)\n";
    if (args.http_port > 0) {
      std::cout << "  or:  curl http://" << connect_host << ":" << args.http_port
                << "/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],"
                   "\"max_tokens\":32}'\n";
    }
    std::cout << std::flush;
  }
  // A worker that exits while serving (a failed GPU step ends the process: its device state is
  // gone) is started again, as Kubernetes restarts its pod; the coordinator routes to the group
  // again once it has reloaded. A GPU group restarts whole (its ranks share collectives). The
  // coordinator exiting, or more than --max-worker-restarts restarts, stops everything.
  int restarts = 0;
  while (!stopping) {
    int status = 0;
    if (const Child* c = exited_child(children, &status)) {
      const bool worker = c->is_worker();
      if (!worker || restarts >= args.max_worker_restarts) {
        std::cerr << "error: " << c->name << " exited (status " << status << ")"
                  << (worker ? absl::StrCat(" after ", restarts, " restarts") : "") << "; stopping\n";
        exit_code = 1;
        break;
      }
      ++restarts;
      std::cerr << "shardserve: " << c->name << " exited (status " << status << "); restarting the worker group ("
                << restarts << " of at most " << args.max_worker_restarts << ")\n";
      std::vector<Child> workers;
      for (Child& other : children) {
        if (other.pid > 0 && other.is_worker()) workers.push_back(other), other.pid = -1;
      }
      stop_all(workers, args.shutdown_timeout);
      std::erase_if(children, [](const Child& ch) { return ch.pid <= 0; });
      for (int rank = 0; rank < processes; ++rank) {
        if (!start_worker(rank)) {
          exit_code = 1;
          stopping = true;
          break;
        }
      }
      continue;
    }
    if (got_signal(std::chrono::milliseconds(200))) break;
  }
  std::cerr << "shardserve: stopping\n";
  stop_all(children, args.shutdown_timeout);
  std::error_code ec;
  fs::remove_all(work, ec);
  return exit_code;
}

}  // namespace

void register_serve(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand("serve", "Serve a model on this machine: a coordinator and its workers");
  cmd->add_option("--model", args->model, "Hugging Face checkpoint directory (default: the bundled tiny checkpoint)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--synthetic", args->synthetic,
                  "Serve random weights of this shape instead of a checkpoint: a preset (llama-3.1-8b, "
                  "llama-3.1-70b, llama-3.2-1b) or a config.json; token ids in and out (for benchmarks)");
  cmd->add_option("--max-worker-restarts", args->max_worker_restarts,
                  "Times a worker group that exits while serving is started again before serve stops")
      ->capture_default_str();
  cmd->add_option("--served-model-name", args->served_model_name, "The model's name in requests (default: the folder's)");
  cmd->add_option("--tp-size", args->tp_size, "Tensor-parallel ranks")->capture_default_str();
  cmd->add_option("--backend", args->backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--quantization", args->quantization,
                  "none (the checkpoint as published, whatever its format), awq, gptq or fp8 (checked against the "
                  "checkpoint), or fp8 / int8 to quantize a 16-bit checkpoint at load")
      ->check(CLI::IsMember({"none", "awq", "gptq", "int8", "fp8"}))->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "auto, bfloat16 or float16")->capture_default_str();
  cmd->add_option("--host", args->host, "Address the coordinator listens on")->capture_default_str();
  cmd->add_option("--port", args->port, "gRPC port")->capture_default_str();
  cmd->add_option("--metrics-port", args->metrics_port, "Coordinator /metrics port (-1: off; workers pick free ports)")
      ->capture_default_str();
  cmd->add_option("--http-port", args->http_port,
                  "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /generate; -1: off)")
      ->capture_default_str();
  cmd->add_option("--num-kv-blocks", args->num_kv_blocks, "KV-cache blocks (default: from the cache budget)");
  cmd->add_option("--max-model-len", args->max_model_len, "Longest prompt + output (default: the model's)");
  cmd->add_option("--max-num-seqs", args->max_num_seqs, "Most sequences per step (default: the engine's)");
  cmd->add_option("--shutdown-timeout", args->shutdown_timeout, "Seconds in-flight requests get on Ctrl-C")
      ->capture_default_str();
  cmd->add_option("--start-timeout", args->start_timeout, "Seconds to wait for the model to load")->capture_default_str();
  cmd->callback([args] {
    // Taken by sigtimedwait in run_serve; blocked before any child exists. Not left ignored (as a
    // script's background job has them), or they would be dropped instead of waited for.
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    const int rc = run_serve(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shardserve::cli
