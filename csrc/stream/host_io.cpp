// The host side of the streaming engine (see engine.h): the host pool, the reader threads, LoadIO
// (staging buffers and file reads) and the process-wide byte counters.
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "stream/engine.h"
#include "stream/io_util.h"

namespace moestream {
namespace stream {

namespace {

std::atomic<int64_t> g_host_bytes{0};
std::atomic<int64_t> g_slot_bytes{0};

}  // namespace

int64_t live_host_bytes() { return g_host_bytes.load(); }
int64_t live_slot_bytes() { return g_slot_bytes.load(); }
void add_live_slot_bytes(int64_t delta) { g_slot_bytes += delta; }

CudaHooks& cuda_hooks() {
  static CudaHooks hooks;
  return hooks;
}

// ---------------------------------------------------------------------------------------------- HostPool

HostPool::HostPool(int64_t nbytes, PinMode pin, bool is_slot) : is_slot_(is_slot) {
  TORCH_CHECK(nbytes >= 0, "moestream.HostPool: nbytes must be >= 0, got ", nbytes);
  capacity_ = nbytes;
  pin_mode_ = pin;
  if (nbytes == 0) return;
  page_ = std::max<int64_t>(::sysconf(_SC_PAGESIZE), kAlign);
  mapped_ = round_up(nbytes, page_);
  // An anonymous mapping: page aligned (O_DIRECT, cudaHostRegister), handed back to the OS on free,
  // and faulted in lazily, so filling it while the source tensors are freed never doubles memory.
  void* p = ::mmap(nullptr, static_cast<size_t>(mapped_), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "moestream.HostPool: could not allocate ", nbytes, " bytes of host memory: ",
              errno_str(errno));
  data_ = static_cast<uint8_t*>(p);
  (is_slot_ ? g_slot_bytes : g_host_bytes) += mapped_;
#ifdef MADV_HUGEPAGE
  if (mapped_ >= (int64_t{2} << 20)) (void)::madvise(data_, static_cast<size_t>(mapped_), MADV_HUGEPAGE);
#endif
}

void HostPool::populate(int64_t offset, int64_t nbytes) {
  TORCH_CHECK(offset >= 0 && nbytes >= 0 && offset + nbytes <= capacity_, "moestream.HostPool.populate: range [",
              offset, ", ", offset + nbytes, ") is outside the pool of ", capacity_, " bytes");
  // Fault the pages in now, so first-touch faults do not stall the first reads and copies.
  for (int64_t off = offset / page_ * page_; off < offset + nbytes; off += page_) data_[off] = 0;
}

bool HostPool::pin() {
  std::lock_guard<std::mutex> lk(pin_mu_);
  if (pinned_ || data_ == nullptr || pin_mode_ == PinMode::kNone) return pinned_;
  pin_error_.clear();
  if (pin_mode_ == PinMode::kCuda) {
    auto& hooks = cuda_hooks();
    if (hooks.host_register == nullptr) {
      pin_error_ = "this build of moestream has no CUDA support";
    } else {
      pinned_ = hooks.host_register(data_, mapped_, &pin_error_);
    }
  } else if (::mlock(data_, static_cast<size_t>(mapped_)) == 0) {
    pinned_ = true;
  } else {
    pin_error_ = "mlock of " + std::to_string(mapped_) + " bytes failed: " + errno_str(errno) +
                 " (raise the memlock limit, ulimit -l)";
  }
  return pinned_;
}

HostPool::~HostPool() {
  if (data_ == nullptr) return;
  if (pinned_) {
    if (pin_mode_ == PinMode::kCuda && cuda_hooks().host_unregister != nullptr) {
      cuda_hooks().host_unregister(data_);
    } else if (pin_mode_ == PinMode::kMlock) {
      ::munlock(data_, static_cast<size_t>(mapped_));
    }
  }
  ::munmap(data_, static_cast<size_t>(mapped_));
  (is_slot_ ? g_slot_bytes : g_host_bytes) -= mapped_;
}

at::Tensor HostPool::view(int64_t offset, int64_t nbytes) {
  TORCH_CHECK(offset >= 0 && nbytes >= 0 && offset + nbytes <= capacity_, "moestream.HostPool.view: range [",
              offset, ", ", offset + nbytes, ") is outside the pool of ", capacity_, " bytes");
  auto self = shared_from_this();
  uint8_t* ptr = data_ == nullptr ? reinterpret_cast<uint8_t*>(kAlign) : data_ + offset;
  return at::from_blob(
      ptr, {nbytes}, [self](void*) {}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

// ---------------------------------------------------------------------------------------------- TaskPool

TaskPool::TaskPool(int num_threads) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { loop(); });
}

TaskPool::~TaskPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void TaskPool::submit(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    tasks_.push_back(std::move(fn));
  }
  cv_.notify_one();
}

void TaskPool::loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !tasks_.empty(); });
      // queued tasks still run after stop: they write into memory their owner waits for
      if (tasks_.empty()) return;
      fn = std::move(tasks_.front());
      tasks_.pop_front();
    }
    fn();
  }
}

// ---------------------------------------------------------------------------------------------- LoadIO

int64_t LoadIO::staging_size(int64_t chunk_bytes) { return round_up(chunk_bytes + 2 * kAlign, kAlign); }

LoadIO::LoadIO(std::shared_ptr<HostPool> pool, const StreamerConfig& cfg)
    : pool_(std::move(pool)), chunk_bytes_(cfg.chunk_bytes), direct_io_(cfg.direct_io) {
  if (cfg.num_staging > 0) {
    const int64_t size = staging_size(cfg.chunk_bytes);
    staging_pool_ = std::make_shared<HostPool>(size * cfg.num_staging, cfg.staging_pin);
    staging_pool_->populate(0, staging_pool_->capacity());
    staging_pool_->pin();  // refused pinning leaves pageable buffers; Streamer::staging_pin_error() says why
    for (int i = 0; i < cfg.num_staging; ++i) staging_.push_back(staging_pool_->data() + i * size);
  }
  readers_ = std::make_unique<TaskPool>(cfg.num_readers);
}

LoadIO::~LoadIO() { readers_.reset(); }

void LoadIO::reset_counters() {
  bytes_read = 0;
  read_ns = 0;
  bytes_copied_ = 0;
}

std::string LoadIO::read(const Segment& seg, int64_t off, int64_t n, uint8_t* dst, uint8_t* staging,
                         uint8_t** data_out) {
  const FileHandle& f = *seg.fh;
  const int64_t pos = seg.src_offset + off;
  const int64_t t0 = now_ns();
  auto fail = [&](const std::string& why) {
    return "moestream.offload: reading tensor '" + seg.name + "' from '" + f.path + "' (bytes " +
           std::to_string(pos) + ".." + std::to_string(pos + n) + ") failed: " + why;
  };
  auto short_read = [&](int64_t got) {
    return fail("short read, got " + std::to_string(got) + " of " + std::to_string(n) + " bytes (the file now has " +
                std::to_string(file_size_now(f.fd)) + " bytes; truncated or replaced since it was opened?)");
  };
  if (f.dfd >= 0 && dst != nullptr && pos % kAlign == 0 && n % kAlign == 0 &&
      reinterpret_cast<uintptr_t>(dst) % kAlign == 0) {
    // O_DIRECT straight into the destination: everything is block aligned (layered files, page-aligned
    // slots), so no bounce buffer and no copy.
    int64_t got = pread_all(f.dfd, dst, n, pos);
    if (got == -EINVAL) got = pread_all(f.fd, dst, n, pos);
    if (got < 0) return fail(errno_str(static_cast<int>(-got)));
    if (got < n) return short_read(got);
    *data_out = dst;
  } else if (staging != nullptr && f.dfd >= 0) {
    // O_DIRECT: read the aligned superset of the range into the aligned staging buffer.
    const int64_t a0 = pos / kAlign * kAlign;
    const int64_t a1 = round_up(pos + n, kAlign);
    int64_t got = pread_all(f.dfd, staging, a1 - a0, a0);
    if (got == -EINVAL) {
      got = pread_all(f.fd, staging + (pos - a0), n, pos);  // the file system refused direct I/O here
      if (got < 0) return fail(errno_str(static_cast<int>(-got)));
      if (got < n) return short_read(got);
    } else {
      if (got < 0) return fail(errno_str(static_cast<int>(-got)));
      if (got < pos + n - a0) return short_read(std::max<int64_t>(0, got - (pos - a0)));
    }
    *data_out = staging + (pos - a0);
  } else {
    uint8_t* target = staging != nullptr ? staging : dst;
    const int64_t got = pread_all(f.fd, target, n, pos);
    if (got < 0) return fail(errno_str(static_cast<int>(-got)));
    if (got < n) return short_read(got);
    *data_out = target;
  }
  bytes_read += n;
  read_ns += now_ns() - t0;
  return "";
}

}  // namespace stream
}  // namespace moestream
