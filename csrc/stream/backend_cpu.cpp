// The CPU backend of the streamer (see engine.h): reader threads read and copy straight into RAM slots.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "stream/engine.h"

namespace moestream {
namespace stream {

// ---------------------------------------------------------------------------------------------- CPU backend

namespace {

// Reader threads write straight into the RAM slot: host segments by memcpy, file ranges by pread
// (O_DIRECT into the slot when block aligned, through a bounce buffer otherwise).
class CpuBackend final : public DeviceBackend {
 public:
  bool orders_on_device() const override { return false; }

  at::Tensor alloc_slot(int64_t nbytes) override {
    // RAM slots page aligned, so block-aligned file ranges are read into them with O_DIRECT.
    auto host = std::make_shared<HostPool>(nbytes, PinMode::kNone, /*is_slot=*/true);
    host->populate(0, nbytes);
    return host->view(0, nbytes);
  }

  void start(LoadTask task, LoadIO& io) override {
    if (busy_.size() != io.staging().size()) busy_.assign(io.staging().size(), 0);
    // One count per chunk plus one for the issuing loop, so done() runs once, after the last chunk.
    auto state = std::make_shared<TaskState>();
    state->task = std::move(task);
    state->pending.store(1);
    try {
      issue(state, io);
    } catch (const std::exception& e) {
      // e.g. out of memory queueing tasks: the job fails, the engine keeps serving later jobs
      state->fail(std::string("moestream.Streamer: loading unit ") + std::to_string(state->task.unit) +
                  " failed: " + e.what());
    }
    state->finish("");
  }

 private:
  struct TaskState {
    LoadTask task;
    std::atomic<int> pending{0};
    std::mutex mu;
    std::string error;
    void fail(const std::string& e) {
      std::lock_guard<std::mutex> lk(mu);
      if (error.empty()) error = e;
    }
    void finish(const std::string& e) {
      if (!e.empty()) fail(e);
      if (pending.fetch_sub(1) == 1) task.done(error);
    }
  };

  void issue(const std::shared_ptr<TaskState>& state, LoadIO& io) {
    const auto& segs = state->task.segs;
    const int64_t chunk = io.chunk_bytes();
    for (size_t i = 0; i < segs->size(); ++i) {
      const Segment& seg = (*segs)[i];
      for (int64_t off = 0; off < seg.nbytes; off += chunk) {
        const int64_t n = std::min(chunk, seg.nbytes - off);
        uint8_t* dst = state->task.dst + seg.dst_offset + off;
        state->pending.fetch_add(1);
        if (seg.file == Segment::kFromPool) {
          const uint8_t* src = io.pool_data() + seg.src_offset + off;
          io.submit([state, &io, dst, src, n] {
            std::memcpy(dst, src, static_cast<size_t>(n));
            io.count_copied(n);
            state->finish("");
          });
          continue;
        }
        const int64_t pos = seg.src_offset + off;
        const bool aligned = pos % kAlign == 0 && n % kAlign == 0 && reinterpret_cast<uintptr_t>(dst) % kAlign == 0;
        const bool staged = io.direct_io() && !io.staging().empty() && seg.fh->dfd >= 0 && !aligned;
        const int buf = staged ? acquire_staging() : -1;
        io.submit([this, state, &io, i, off, n, dst, buf] {
          const Segment& sg = (*state->task.segs)[i];
          uint8_t* data = nullptr;
          std::string err = io.read(sg, off, n, dst, buf >= 0 ? io.staging()[buf] : nullptr, &data);
          if (err.empty() && data != dst) std::memcpy(dst, data, static_cast<size_t>(n));
          if (buf >= 0) release_staging(buf);
          state->finish(err);
        });
      }
    }
  }

  // Bounce buffers for unaligned O_DIRECT reads, taken by one reader task at a time.
  int acquire_staging() {
    std::unique_lock<std::mutex> lk(mu_);
    int found = -1;
    cv_.wait(lk, [&] {
      for (size_t i = 0; i < busy_.size(); ++i) {
        const int b = static_cast<int>((next_ + i) % busy_.size());
        if (!busy_[b]) {
          found = b;
          return true;
        }
      }
      return false;
    });
    busy_[found] = 1;
    next_ = (found + 1) % static_cast<int>(busy_.size());
    return found;
  }

  void release_staging(int buf) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      busy_[buf] = 0;
    }
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<char> busy_;
  int next_ = 0;
};

}  // namespace

std::unique_ptr<DeviceBackend> make_cpu_backend(const StreamerConfig& cfg) {
  (void)cfg;
  return std::make_unique<CpuBackend>();
}

}  // namespace stream
}  // namespace moestream
