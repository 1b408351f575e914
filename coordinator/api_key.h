// The API key check that both doors (the gRPC API in server.cc, the HTTP API in http_server.cc)
// apply to every call of the public API when the coordinator has a key: the client sends
// `authorization: Bearer KEY` (gRPC metadata, or the HTTP header OpenAI's SDKs send).
#pragma once

#include <algorithm>
#include <cctype>
#include <string_view>

#include "absl/status/status.h"

namespace shardserve {

// Constant time in the contents, so that a caller cannot find the key a byte at a time by timing
// its guesses. (Its length is not worth hiding.)
inline bool same_api_key(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// OK when `expected` is empty (no key configured) or `authorization` is "Bearer <expected>"
// ("bearer" in any case); else UNAUTHENTICATED saying what is wrong, never what the key is.
inline absl::Status check_api_key(std::string_view expected, std::string_view authorization) {
  if (expected.empty()) return absl::OkStatus();
  if (authorization.empty()) {
    return absl::UnauthenticatedError("this server needs an API key: send the header 'authorization: Bearer <key>'");
  }
  constexpr std::string_view kBearer = "bearer ";
  const bool bearer = authorization.size() > kBearer.size() &&
                      std::equal(kBearer.begin(), kBearer.end(), authorization.begin(), [](char want, char got) {
                        return want == std::tolower(static_cast<unsigned char>(got));
                      });
  if (!bearer) return absl::UnauthenticatedError("the authorization header must be 'Bearer <key>'");
  if (!same_api_key(authorization.substr(kBearer.size()), expected)) {
    return absl::UnauthenticatedError("the API key is not valid");
  }
  return absl::OkStatus();
}

}  // namespace shardserve
