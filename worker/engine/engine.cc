#include "worker/engine/engine.h"

#include "absl/strings/str_cat.h"
#include "worker/runtime/backend.h"  // StepError

namespace shardserve {

Engine::Engine(StepExecutor& runner, const EngineConfig& config)
    : runner_(runner),
      config_(config),
      max_model_len_(config.max_model_len > 0 ? config.max_model_len : runner.config().max_position_embeddings),
      blocks_(runner.num_blocks(), runner.block_size(), config.enable_prefix_caching),
      scheduler_(config.scheduler, blocks_) {}

absl::Status Engine::submit(Request request) {
  const int64_t prompt_len = static_cast<int64_t>(request.prompt_token_ids.size());
  if (auto st = validate(request.params, prompt_len, max_model_len_, runner_.vocab_size()); !st.ok()) return st;
  for (size_t i = 0; i < request.prompt_token_ids.size(); ++i) {
    const int32_t id = request.prompt_token_ids[i];
    if (id < 0 || id >= runner_.vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", id, ", outside the vocabulary [0, ",
                                                     runner_.vocab_size(), ")"));
    }
  }
  const int64_t needed = blocks_.blocks_for(prompt_len + request.params.max_tokens);
  if (needed > blocks_.num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("prompt + max_tokens needs ", needed, " KV-cache blocks of ",
                                                     blocks_.block_size(), " tokens; the whole cache has ",
                                                     blocks_.num_blocks()));
  }
  if (sequences_.count(request.request_id)) {
    return absl::AlreadyExistsError(absl::StrCat("request_id '", request.request_id, "' is already in flight"));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->request_id = request.request_id;
  seq->tokens = std::move(request.prompt_token_ids);
  seq->num_prompt_tokens = prompt_len;
  seq->params = std::move(request.params);
  seq->seed = seq->params.seed.value_or(seed_source_());
  scheduler_.add(seq.get());
  sequences_.emplace(seq->request_id, std::move(seq));
  return absl::OkStatus();
}

absl::Status Engine::abort(const std::string& request_id) {
  const auto it = sequences_.find(request_id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("no request '", request_id, "' in flight"));
  scheduler_.abort(it->second.get());
  aborted_.push_back(std::move(it->second));
  sequences_.erase(it);
  return absl::OkStatus();
}

std::vector<RequestOutput> Engine::step() {
  std::vector<RequestOutput> outputs;
  auto output_of = [](const Sequence& seq) {
    RequestOutput o;
    o.request_id = seq.request_id;
    o.num_prompt_tokens = seq.num_prompt_tokens;
    o.num_output_tokens = seq.num_output_tokens();
    o.num_cached_prompt_tokens = seq.num_cached_prompt_tokens;
    o.finished = seq.is_finished();
    o.finish_reason = seq.finish_reason;
    return o;
  };
  for (const auto& seq : aborted_) outputs.push_back(output_of(*seq));
  aborted_.clear();

  const std::vector<ScheduledSequence> scheduled = scheduler_.schedule();
  if (scheduled.empty()) return outputs;

  Batch batch;
  for (const ScheduledSequence& s : scheduled) {
    const Sequence& seq = *s.seq;
    SequenceStep step;
    step.token_ids.assign(seq.tokens.begin() + seq.num_computed_tokens,
                          seq.tokens.begin() + seq.num_computed_tokens + s.num_tokens);
    step.num_cached = static_cast<int32_t>(seq.num_computed_tokens);
    step.block_table = seq.block_table;
    step.sample = s.sample;
    batch.seqs.push_back(std::move(step));
  }
  std::vector<const Sequence*> sampling;
  for (const ScheduledSequence& s : scheduled) {
    if (s.sample) sampling.push_back(s.seq);
  }
  std::vector<SampleResult> results;
  try {
    results = runner_.execute_and_sample(batch, sampling);
  } catch (const StepError& e) {
    // Nothing of this step is kept: its sequences end here, their blocks freed.
    for (const ScheduledSequence& s : scheduled) {
      Sequence* seq = s.seq;
      scheduler_.abort(seq);
      seq->finish_reason = "error";
      RequestOutput o = output_of(*seq);
      o.error = e.what();
      outputs.push_back(std::move(o));
      sequences_.erase(seq->request_id);  // reported here, once: not through aborted_
    }
    return outputs;
  }
  std::vector<int32_t> sampled;
  sampled.reserve(results.size());
  for (const SampleResult& r : results) sampled.push_back(r.token_id);
  const std::vector<Sequence*> finished = scheduler_.update(scheduled, sampled, config_.eos_token_ids, max_model_len_);

  size_t r = 0;
  for (const ScheduledSequence& s : scheduled) {
    if (!s.sample) continue;
    RequestOutput o = output_of(*s.seq);
    o.new_token_ids.push_back(results[r].token_id);
    if (s.seq->params.logprobs >= 0) o.new_logprobs.push_back(std::move(results[r].logprobs));
    ++r;
    outputs.push_back(std::move(o));
  }
  for (Sequence* seq : finished) sequences_.erase(seq->request_id);
  return outputs;
}

EngineStats Engine::stats() const {
  return {scheduler_.num_waiting(), scheduler_.num_running(), blocks_.num_free_blocks(), blocks_.num_blocks(),
          scheduler_.num_preemptions(), blocks_.prefix_cache_hits(), blocks_.prefix_cache_queries()};
}

absl::StatusOr<std::vector<RequestOutput>> run_to_completion(Engine& engine, std::vector<Request> requests) {
  std::unordered_map<std::string, size_t> index;
  std::vector<RequestOutput> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i].request_id.empty()) requests[i].request_id = absl::StrCat("request-", i);
    index[requests[i].request_id] = i;
    results[i].request_id = requests[i].request_id;
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    if (auto st = engine.submit(std::move(requests[i])); !st.ok()) {
      for (size_t j = 0; j < i; ++j) (void)engine.abort(results[j].request_id);
      engine.step();  // reports the aborts; nothing else is queued
      return absl::Status(st.code(), absl::StrCat("request ", i, ": ", st.message()));
    }
  }
  while (engine.has_unfinished()) {
    for (RequestOutput& o : engine.step()) {
      RequestOutput& acc = results[index.at(o.request_id)];
      acc.new_token_ids.insert(acc.new_token_ids.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      for (auto& lp : o.new_logprobs) acc.new_logprobs.push_back(std::move(lp));
      acc.finished = o.finished;
      acc.finish_reason = o.finish_reason;
      acc.error = o.error;
      acc.num_prompt_tokens = o.num_prompt_tokens;
      acc.num_output_tokens = o.num_output_tokens;
      acc.num_cached_prompt_tokens = o.num_cached_prompt_tokens;
    }
  }
  return results;
}

}  // namespace shardserve
