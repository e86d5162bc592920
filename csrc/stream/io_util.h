// Small POSIX helpers shared by the streaming engine and the disk read probe.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

namespace moestream {
namespace stream {

inline int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline std::string errno_str(int e) { return std::string(std::strerror(e)); }

// pread until n bytes or end of file; returns bytes read, or -errno.
inline int64_t pread_all(int fd, uint8_t* dst, int64_t n, int64_t off) {
  int64_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, dst + done, static_cast<size_t>(n - done), static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -static_cast<int64_t>(errno);
    }
    if (r == 0) break;
    done += r;
  }
  return done;
}

inline int64_t file_size_now(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return -1;
  return static_cast<int64_t>(st.st_size);
}

}  // namespace stream
}  // namespace moestream
