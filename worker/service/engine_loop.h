// EngineLoop: the one thread that drives an Engine (whose contract is single-threaded), and the
// hand-off between it and the many gRPC handler threads of the worker service.
//
//   handler --submit/abort--> command queue --> loop thread: Engine.submit/abort, Engine.step
//   handler <--RequestStream-- loop thread: each step's RequestOutput, in order, then the end
//
// A request's stream ends (done) when its last output is delivered, when the engine rejects it
// (status), or when it is aborted. abort() frees the request's KV blocks on the loop thread before
// the loop runs another step. Thread-safe; the loop owns the model and the engine.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/engine.h"
#include "worker/engine/executor.h"

namespace shardserve {

// One request's outputs, written by the loop thread, read by its handler.
struct RequestStream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<RequestOutput> outputs;
  absl::Status status;  // not OK when the engine rejected the request or the loop stopped
  bool done = false;

  void push(RequestOutput output, bool last);
  void fail(absl::Status s);
};

struct EngineLoopHooks {
  // Seconds from submit to the start of the step that produced the request's first token.
  std::function<void(double)> on_queue_time;
  // A request ended: "stop", "length" or "abort".
  std::function<void(const std::string&)> on_finished;
  // After every iteration of the loop: the engine's counters and the requests in flight.
  std::function<void(const EngineStats&, int64_t in_flight)> on_stats;
  // The model failed a step (a device error, a rank of its group lost or stuck): the engine's
  // state is gone. Every open stream has ended with UNAVAILABLE naming the cause; the loop stops
  // after this returns. The worker exits here, so the orchestrator restarts the group.
  std::function<void(const std::string&)> on_fatal;
};

class EngineLoop {
 public:
  EngineLoop(LoadedModel model, const EngineConfig& config, EngineLoopHooks hooks = {});
  // Stops the thread; streams still open end with UNAVAILABLE.
  ~EngineLoop();

  // The request's stream; a rejection (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) arrives on it.
  std::shared_ptr<RequestStream> submit(Request request);
  // Ends the request now (its blocks are freed before the next step); its stream ends CANCELLED.
  void abort(const std::string& request_id);

  EngineStats stats() const;
  int64_t num_in_flight() const;
  const ModelConfig& model_config() const { return model_.config; }
  int64_t max_model_len() const { return max_model_len_; }
  int64_t block_size() const { return model_.executor->block_size(); }

 private:
  struct Submit {
    Request request;
    std::shared_ptr<RequestStream> stream;
  };
  struct Abort {
    std::string request_id;
  };
  struct Active {
    std::shared_ptr<RequestStream> stream;
    std::chrono::steady_clock::time_point submitted;
    bool has_token = false;
  };
  void run();

  LoadedModel model_;
  Engine engine_;
  int64_t max_model_len_;
  EngineLoopHooks hooks_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::variant<Submit, Abort>> commands_;
  bool stop_ = false;
  bool has_work_ = false;  // the engine has unfinished requests (loop thread writes)
  EngineStats stats_;
  int64_t in_flight_ = 0;

  std::unordered_map<std::string, Active> active_;  // loop thread only
  std::thread thread_;
};

}  // namespace shardserve
