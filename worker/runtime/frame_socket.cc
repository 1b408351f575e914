#include "worker/runtime/frame_socket.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text() { return std::strerror(errno); }

absl::StatusOr<std::pair<std::string, std::string>> split_address(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' is not host:port"));
  }
  return std::make_pair(address.substr(0, colon), address.substr(colon + 1));
}

}  // namespace

FrameSocket::FrameSocket(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // a step message must not wait for more
}

FrameSocket::~FrameSocket() {
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<FrameSocket>> FrameSocket::connect(const std::string& address,
                                                                   std::chrono::milliseconds timeout) {
  auto parts = split_address(address);
  if (!parts.ok()) return parts.status();
  const auto deadline = Clock::now() + timeout;
  std::string last_error;
  while (true) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (int rc = getaddrinfo(parts->first.c_str(), parts->second.c_str(), &hints, &found); rc != 0) {
      last_error = gai_strerror(rc);
    } else {
      for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
          freeaddrinfo(found);
          return std::make_unique<FrameSocket>(fd, address);
        }
        last_error = errno_text();
        close(fd);
      }
      freeaddrinfo(found);
    }
    if (Clock::now() >= deadline) {
      return absl::UnavailableError(absl::StrCat("cannot connect to ", address, " within ", timeout.count(), " ms: ", last_error));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

absl::Status FrameSocket::send(const std::string& frame) {
  if (frame.size() > kMaxFrameBytes) return absl::InvalidArgumentError("frame too large");
  const uint32_t n = static_cast<uint32_t>(frame.size());
  const unsigned char header[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                                   static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
  std::string buf(reinterpret_cast<const char*>(header), 4);
  buf += frame;
  size_t sent = 0;
  while (sent < buf.size()) {
    ssize_t k = ::send(fd_, buf.data() + sent, buf.size() - sent, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat("sending to ", peer_, ": ", errno_text()));
    }
    sent += static_cast<size_t>(k);
  }
  return absl::OkStatus();
}

absl::Status FrameSocket::read_exact(char* out, size_t n, Clock::time_point deadline, bool forever) {
  size_t got = 0;
  while (got < n) {
    int wait_ms = -1;
    if (!forever) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return absl::DeadlineExceededError(absl::StrCat("no data from ", peer_, " in time"));
      wait_ms = static_cast<int>(std::min<int64_t>(left, 1 << 30));
    }
    pollfd p{fd_, POLLIN, 0};
    const int rc = poll(&p, 1, wait_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat("waiting for ", peer_, ": ", errno_text()));
    }
    if (rc == 0) continue;  // the deadline check above ends it
    ssize_t k = ::recv(fd_, out + got, n - got, 0);
    if (k == 0) return absl::UnavailableError(absl::StrCat(peer_, " closed the connection"));
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return absl::UnavailableError(absl::StrCat("reading from ", peer_, ": ", errno_text()));
    }
    got += static_cast<size_t>(k);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FrameSocket::receive(std::chrono::milliseconds timeout) {
  const bool forever = timeout.count() < 0;
  const auto deadline = Clock::now() + (forever ? std::chrono::milliseconds(0) : timeout);
  unsigned char header[4];
  if (auto st = read_exact(reinterpret_cast<char*>(header), 4, deadline, forever); !st.ok()) return st;
  const uint32_t n = header[0] | (uint32_t{header[1]} << 8) | (uint32_t{header[2]} << 16) | (uint32_t{header[3]} << 24);
  if (n > kMaxFrameBytes) {
    return absl::DataLossError(absl::StrCat(peer_, " sent a frame of ", n, " bytes (limit ", kMaxFrameBytes, ")"));
  }
  std::string frame(n, '\0');
  if (auto st = read_exact(frame.data(), n, deadline, forever); !st.ok()) return st;
  return frame;
}

bool FrameSocket::peer_closed() const {
  pollfd p{fd_, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
  char c;
  return ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

absl::StatusOr<std::unique_ptr<FrameListener>> FrameListener::listen(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve ", host, ": ", gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 64) == 0) {
      sockaddr_storage bound{};
      socklen_t len = sizeof bound;
      getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
      const int bound_port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                                         : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
      freeaddrinfo(found);
      return std::unique_ptr<FrameListener>(new FrameListener(fd, bound_port));
    }
    last_error = errno_text();
    close(fd);
  }
  freeaddrinfo(found);
  return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, ": ", last_error));
}

FrameListener::~FrameListener() { close(fd_); }

absl::StatusOr<std::unique_ptr<FrameSocket>> FrameListener::accept(std::chrono::milliseconds timeout) {
  pollfd p{fd_, POLLIN, 0};
  int rc;
  do {
    rc = poll(&p, 1, static_cast<int>(timeout.count()));
  } while (rc < 0 && errno == EINTR);
  if (rc == 0) return absl::DeadlineExceededError(absl::StrCat("no connection within ", timeout.count(), " ms"));
  if (rc < 0) return absl::UnavailableError(absl::StrCat("accept: ", errno_text()));
  sockaddr_storage peer{};
  socklen_t len = sizeof peer;
  int fd = ::accept4(fd_, reinterpret_cast<sockaddr*>(&peer), &len, SOCK_CLOEXEC);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("accept: ", errno_text()));
  char name[INET6_ADDRSTRLEN] = "?";
  if (peer.ss_family == AF_INET) inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&peer)->sin_addr, name, sizeof name);
  if (peer.ss_family == AF_INET6) inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&peer)->sin6_addr, name, sizeof name);
  return std::make_unique<FrameSocket>(fd, name);
}

}  // namespace shardserve
