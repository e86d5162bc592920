// The raw read rate of files, for the benchmark's disk ceiling (moestream._C.read_files_seconds): the
// files are read whole, in chunk_bytes pieces by `threads` threads, the way the engine's readers read
// them, so the streamer's bandwidth can be judged against what the disk gives. Not used by the engine.
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "stream/engine.h"
#include "stream/io_util.h"

namespace moestream {
namespace stream {
namespace {

double read_files_seconds(const std::vector<std::string>& paths, int64_t chunk_bytes, int threads,
                          bool direct_io) {
  TORCH_CHECK(chunk_bytes >= kAlign && chunk_bytes % kAlign == 0,
              "moestream.read_files_seconds: chunk_bytes must be a multiple of ", kAlign, ", got ", chunk_bytes);
  TORCH_CHECK(threads >= 1, "moestream.read_files_seconds: threads must be >= 1, got ", threads);
  struct Piece {
    int fd;
    int64_t off, n;
    std::string path;
  };
  std::vector<int> fds;
  std::vector<Piece> pieces;
  for (const auto& p : paths) {
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | (direct_io ? O_DIRECT : 0));
    if (fd < 0 && direct_io) fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      for (int f : fds) ::close(f);
      TORCH_CHECK(false, "moestream.read_files_seconds: cannot open '", p, "': ", errno_str(errno));
    }
    fds.push_back(fd);
    const int64_t size = file_size_now(fd);
    for (int64_t off = 0; off < size; off += chunk_bytes) pieces.push_back({fd, off, std::min(chunk_bytes, size - off), p});
  }
  std::atomic<size_t> next{0};
  std::string error;
  std::mutex em;
  const int64_t t0 = now_ns();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&] {
      // The reader's buffer is memory like the engine's slots: 2 MiB aligned on transparent huge
      // pages. An O_DIRECT read into 4 KiB pages becomes a scatter list of single pages that the
      // block layer splits into many small requests; on a virtual disk such reads ran at
      // 1.0-1.5 GB/s where reads into huge pages ran at 2.3-2.6 GB/s.
      constexpr size_t kHuge = size_t(2) << 20;
      const size_t cap = (static_cast<size_t>(chunk_bytes) + kHuge - 1) / kHuge * kHuge;
      void* buf = nullptr;
      if (::posix_memalign(&buf, kHuge, cap) != 0) return;
#ifdef MADV_HUGEPAGE
      (void)::madvise(buf, cap, MADV_HUGEPAGE);
#endif
      for (size_t i = next++; i < pieces.size(); i = next++) {
        const Piece& pc = pieces[i];
        // O_DIRECT lengths must be aligned: the last piece reads up to the next block (short at EOF)
        const int64_t got = pread_all(pc.fd, static_cast<uint8_t*>(buf), round_up(pc.n, kAlign), pc.off);
        if (got < 0) {
          std::lock_guard<std::mutex> lk(em);
          if (error.empty()) error = "reading '" + pc.path + "' failed: " + errno_str(static_cast<int>(-got));
        }
      }
      std::free(buf);
    });
  }
  for (auto& t : ts) t.join();
  const double secs = static_cast<double>(now_ns() - t0) * 1e-9;
  for (int f : fds) ::close(f);
  TORCH_CHECK(error.empty(), "moestream.read_files_seconds: ", error);
  return secs;
}

}  // namespace
}  // namespace stream

void bind_disk_probe(pybind11::module_& m) {
  m.def("read_files_seconds", &stream::read_files_seconds, pybind11::arg("paths"), pybind11::arg("chunk_bytes"),
        pybind11::arg("threads"), pybind11::arg("direct_io") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "reads the files whole with `threads` threads and returns the seconds taken (raw read rate probe)");
}

}  // namespace moestream
