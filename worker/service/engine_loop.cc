#include "worker/service/engine_loop.h"

#include "absl/strings/str_cat.h"

namespace shardserve {

void RequestStream::push(RequestOutput output, bool last) {
  {
    std::lock_guard lock(mu);
    outputs.push_back(std::move(output));
    done = done || last;
  }
  cv.notify_all();
}

void RequestStream::fail(absl::Status s) {
  {
    std::lock_guard lock(mu);
    if (done) return;
    status = std::move(s);
    done = true;
  }
  cv.notify_all();
}

EngineLoop::EngineLoop(LoadedModel model, const EngineConfig& config, EngineLoopHooks hooks)
    : model_(std::move(model)),
      engine_(*model_.executor, config),
      max_model_len_(engine_.max_model_len()),
      hooks_(std::move(hooks)),
      stats_(engine_.stats()) {
  thread_ = std::thread([this] { run(); });
}

EngineLoop::~EngineLoop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& [id, a] : active_) a.stream->fail(absl::UnavailableError("the worker is shutting down"));
  for (auto& c : commands_) {
    if (auto* s = std::get_if<Submit>(&c)) s->stream->fail(absl::UnavailableError("the worker is shutting down"));
  }
}

std::shared_ptr<RequestStream> EngineLoop::submit(Request request) {
  auto stream = std::make_shared<RequestStream>();
  {
    std::lock_guard lock(mu_);
    if (stop_) {
      stream->fail(absl::UnavailableError("the worker is shutting down"));
      return stream;
    }
    commands_.push_back(Submit{std::move(request), stream});
  }
  cv_.notify_all();
  return stream;
}

void EngineLoop::abort(const std::string& request_id) {
  {
    std::lock_guard lock(mu_);
    commands_.push_back(Abort{request_id});
  }
  cv_.notify_all();
}

EngineStats EngineLoop::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

int64_t EngineLoop::num_in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

void EngineLoop::run() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || !commands_.empty() || has_work_; });
    if (stop_) return;
    std::vector<std::variant<Submit, Abort>> commands;
    commands.swap(commands_);
    lock.unlock();

    const auto now = std::chrono::steady_clock::now();
    for (auto& c : commands) {
      if (auto* s = std::get_if<Submit>(&c)) {
        const std::string id = s->request.request_id;
        if (absl::Status st = engine_.submit(std::move(s->request)); !st.ok()) {
          s->stream->fail(std::move(st));
        } else {
          active_[id] = Active{std::move(s->stream), now, false};
        }
      } else {
        const std::string& id = std::get<Abort>(c).request_id;
        const auto it = active_.find(id);
        if (it == active_.end()) continue;  // finished meanwhile
        (void)engine_.abort(id);  // waiting|running -> aborted: blocks freed now
        it->second.stream->fail(absl::CancelledError("aborted"));
        if (hooks_.on_finished) hooks_.on_finished("abort");
        active_.erase(it);
      }
    }
    if (engine_.has_unfinished()) {
      const auto step_start = std::chrono::steady_clock::now();
      std::vector<RequestOutput> outputs;
      try {
        outputs = engine_.step();
      } catch (const std::exception& e) {
        const std::string why = absl::StrCat("the model failed: ", e.what());
        for (auto& [id, a] : active_) a.stream->fail(absl::UnavailableError(why));
        active_.clear();
        if (hooks_.on_fatal) hooks_.on_fatal(why);
        lock.lock();
        stop_ = true;
        has_work_ = false;
        return;
      }
      for (RequestOutput& o : outputs) {
        const auto it = active_.find(o.request_id);
        if (it == active_.end()) continue;  // an abort's report
        Active& a = it->second;
        if (!a.has_token && !o.new_token_ids.empty()) {
          a.has_token = true;
          if (hooks_.on_queue_time) {
            hooks_.on_queue_time(std::chrono::duration<double>(step_start - a.submitted).count());
          }
        }
        if (!o.error.empty()) {  // the step failed; the engine goes on without this request
          if (hooks_.on_finished) hooks_.on_finished(o.finish_reason);
          a.stream->fail(absl::InternalError(absl::StrCat("the step running this request failed: ", o.error)));
          active_.erase(it);
          continue;
        }
        const bool last = o.finished;
        if (last && hooks_.on_finished) hooks_.on_finished(o.finish_reason);
        a.stream->push(std::move(o), last);
        if (last) active_.erase(it);
      }
    }
    const EngineStats stats = engine_.stats();
    const int64_t in_flight = static_cast<int64_t>(active_.size());
    if (hooks_.on_stats) hooks_.on_stats(stats, in_flight);
    lock.lock();
    has_work_ = engine_.has_unfinished();
    stats_ = stats;
    in_flight_ = in_flight;
  }
}

}  // namespace shardserve
