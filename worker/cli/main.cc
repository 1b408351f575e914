// shardserve: the command a person types.
#include <CLI/CLI.hpp>

#include "worker/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"shardserve: serve Llama-family models from GPU workers"};
  app.require_subcommand(1);
  shardserve::cli::register_generate(app);
  shardserve::cli::register_tokenize(app);
  shardserve::cli::register_serve(app);
  shardserve::cli::register_client(app);
  shardserve::cli::register_plan(app);
  shardserve::cli::register_bench(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
