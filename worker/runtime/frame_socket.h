// FrameSocket: a TCP connection that carries length-prefixed frames (u32 little-endian length,
// then the bytes), and the listener that makes them. The step channel of a tensor-parallel group
// of processes: rank 0 sends each step's packed batch to its followers.
//
// Every wait has a deadline and every failure is a Status naming the peer and the cause; a peer
// that closes its end reads as UNAVAILABLE ("closed"). Frames above kMaxFrameBytes are refused
// before anything is allocated.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace shardserve {

class FrameSocket {
 public:
  static constexpr uint32_t kMaxFrameBytes = 64u << 20;

  // Connects to host:port, retrying refused connections until `timeout` (the peer may still be
  // starting).
  static absl::StatusOr<std::unique_ptr<FrameSocket>> connect(const std::string& address,
                                                              std::chrono::milliseconds timeout);
  explicit FrameSocket(int fd, std::string peer);
  ~FrameSocket();
  FrameSocket(const FrameSocket&) = delete;
  FrameSocket& operator=(const FrameSocket&) = delete;

  absl::Status send(const std::string& frame);
  // Waits at most `timeout` for the next whole frame (negative: forever).
  absl::StatusOr<std::string> receive(std::chrono::milliseconds timeout);
  // True once the peer has closed its end or the connection broke (a non-blocking check).
  bool peer_closed() const;
  int fd() const { return fd_; }
  const std::string& peer() const { return peer_; }

 private:
  absl::Status read_exact(char* out, size_t n, std::chrono::steady_clock::time_point deadline, bool forever);
  int fd_;
  std::string peer_;
};

class FrameListener {
 public:
  // Listens on host:port (port 0: any free port).
  static absl::StatusOr<std::unique_ptr<FrameListener>> listen(const std::string& host, int port);
  ~FrameListener();
  int port() const { return port_; }
  absl::StatusOr<std::unique_ptr<FrameSocket>> accept(std::chrono::milliseconds timeout);

 private:
  FrameListener(int fd, int port) : fd_(fd), port_(port) {}
  int fd_;
  int port_;
};

}  // namespace shardserve
