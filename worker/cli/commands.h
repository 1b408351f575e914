// The subcommands of the `shardserve` command line, one registration function per file.
#pragma once

#include <CLI/CLI.hpp>

namespace shardserve::cli {

// `shardserve generate`: an in-process engine, no network (generate_cmd.cc).
void register_generate(CLI::App& app);
// `shardserve tokenize` and `shardserve detokenize` (tokenize_cmd.cc).
void register_tokenize(CLI::App& app);
// `shardserve serve`: a coordinator and its workers as child processes (serve_cmd.cc).
void register_serve(CLI::App& app);
// `shardserve client`: one request to a running server (client_cmd.cc).
void register_client(CLI::App& app);
// `shardserve plan`: the memory planner (plan_cmd.cc).
void register_plan(CLI::App& app);
// `shardserve bench`: a load generator against a running server (bench_cmd.cc).
void register_bench(CLI::App& app);

}  // namespace shardserve::cli
