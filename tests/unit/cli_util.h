// Runs the built `shardserve` binary for command-line tests.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <string>

namespace shardserve::testing {

// Runs `shardserve ARGS` (through the shell) and returns its standard output; a non-zero exit
// status fails the calling test.
inline std::string run_cli(const std::string& args) {
  const std::string cmd = std::string(SHARDSERVE_BIN_DIR) + "/shardserve " + args;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    ADD_FAILURE() << "cannot run " << cmd;
    return "";
  }
  std::string output;
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), pipe) != nullptr) output += buf.data();
  EXPECT_EQ(pclose(pipe), 0) << cmd << "\n" << output;
  return output;
}

}  // namespace shardserve::testing
