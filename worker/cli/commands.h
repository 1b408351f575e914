// The subcommands of the `shardserve` command line, one registration function per file.
#pragma once

#include <CLI/CLI.hpp>

namespace shardserve::cli {

// `shardserve generate`: an in-process engine, no network (generate_cmd.cc).
void register_generate(CLI::App& app);
// `shardserve tokenize` and `shardserve detokenize` (tokenize_cmd.cc).
void register_tokenize(CLI::App& app);

}  // namespace shardserve::cli
