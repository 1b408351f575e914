// Scheduler + BlockManager overhead per engine step, without a model: 256 running sequences in
// decode with prefix caching on (every prompt shares a 256-token system prefix), so each step
// schedules 256 tokens, grows block tables at block boundaries and hashes every block that fills.
//   build/bin/scheduler_bench [--benchmark_min_time=2]
#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "worker/engine/block_manager.h"
#include "worker/engine/scheduler.h"

namespace shardserve {
namespace {

void BM_DecodeStep(benchmark::State& state) {
  const int64_t num_seqs = state.range(0);
  const int64_t prompt_len = 512;
  const int64_t block_size = 16;
  // Room for every sequence to grow by 4096 tokens: no preemption in the timed loop.
  BlockManager blocks(num_seqs * (prompt_len + 4096) / block_size, block_size, /*prefix caching=*/true);
  Scheduler scheduler({.max_num_seqs = num_seqs, .max_num_batched_tokens = 8192}, blocks);
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (int64_t i = 0; i < num_seqs; ++i) {
    auto s = std::make_unique<Sequence>();
    s->id = i;
    for (int64_t t = 0; t < prompt_len; ++t) s->tokens.push_back(static_cast<int32_t>(t < 256 ? t : 1000 + i * 7 + t));
    s->num_prompt_tokens = prompt_len;
    s->params.max_tokens = 1 << 30;
    scheduler.add(s.get());
    seqs.push_back(std::move(s));
  }
  std::vector<int32_t> sampled;
  auto run_step = [&] {
    const auto scheduled = scheduler.schedule();
    sampled.clear();
    for (const auto& s : scheduled) {
      if (s.sample) sampled.push_back(static_cast<int32_t>(s.seq->size() % 50000));
    }
    scheduler.update(scheduled, sampled, {}, 1 << 30);
    return scheduled.size();
  };
  while (scheduler.num_waiting() > 0) run_step();  // prefill everything first
  for (auto _ : state) benchmark::DoNotOptimize(run_step());
  if (scheduler.num_running() != static_cast<size_t>(num_seqs)) state.SkipWithError("sequences left the running set");
  state.counters["running"] = static_cast<double>(scheduler.num_running());
  state.counters["prefix_hit_blocks"] = static_cast<double>(blocks.prefix_cache_hits());
}
// 2000 decode steps stay inside the 4096 tokens of headroom per sequence.
BENCHMARK(BM_DecodeStep)->Arg(256)->Arg(1024)->Iterations(2000)->Repetitions(3)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace shardserve

BENCHMARK_MAIN();
