// Encoding throughput on English prose, one thread: MB/s with a cold pre-token cache (a fresh
// tokenizer's first pass over the text) and a warm one (later passes). Not a test: numbers vary
// with the machine. Usage:
//   bench_tokenizer TOKENIZER_DIR_OR_JSON [PROSE_FILE...]   (default: /usr/share/common-licenses/*)
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Request-sized chunks (about 4 KiB, cut at line ends), as the coordinator would see them.
std::vector<std::string> chunk(const std::string& text) {
  std::vector<std::string> chunks;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + 4096);
    const size_t newline = text.find('\n', end);
    end = newline == std::string::npos ? text.size() : newline + 1;
    chunks.push_back(text.substr(start, end - start));
    start = end;
  }
  return chunks;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s TOKENIZER_DIR_OR_JSON [PROSE_FILE...]\n", argv[0]);
    return 2;
  }
  std::vector<std::string> files(argv + 2, argv + argc);
  if (files.empty()) {
    for (const auto& entry : std::filesystem::directory_iterator("/usr/share/common-licenses")) {
      if (entry.is_regular_file() && !entry.is_symlink()) files.push_back(entry.path().string());
    }
  }
  std::string text;
  for (const std::string& file : files) {
    std::ifstream in(file, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    text += buffer.str();
  }
  const std::vector<std::string> chunks = chunk(text);
  const double mb = static_cast<double>(text.size()) / 1e6;

  auto start = Clock::now();
  auto tokenizer = shardserve::Tokenizer::load(argv[1]);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  std::printf("load: %.2f s\n", seconds_since(start));

  size_t tokens = 0;
  start = Clock::now();
  for (const std::string& c : chunks) tokens += (*tokenizer)->encode(c).value().size();
  const double cold = seconds_since(start);
  std::printf("text: %.3f MB in %zu chunks, %zu tokens (%.2f bytes/token)\n", mb, chunks.size(), tokens,
              text.size() / static_cast<double>(tokens));
  std::printf("cold cache (first pass): %.1f MB/s\n", mb / cold);

  int passes = 0;
  start = Clock::now();
  while (passes == 0 || seconds_since(start) < 2.0) {
    for (const std::string& c : chunks) tokens += (*tokenizer)->encode(c).value().size();
    ++passes;
  }
  std::printf("warm cache (%d passes): %.1f MB/s\n", passes, passes * mb / seconds_since(start));

  shardserve::EncodeOptions parse_special;
  parse_special.parse_special = true;
  passes = 0;
  start = Clock::now();
  while (passes == 0 || seconds_since(start) < 2.0) {
    for (const std::string& c : chunks) tokens += (*tokenizer)->encode(c, parse_special).value().size();
    ++passes;
  }
  std::printf("warm cache, parse_special (%d passes): %.1f MB/s\n", passes, passes * mb / seconds_since(start));
  return 0;
}
