// The streaming engine (see engine.h): host pool, reader threads, the slot ring with its job
// scheduler, and the CPU backend.
#include "stream/engine.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

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

// ---------------------------------------------------------------------------------------------- Streamer

struct Streamer::Job {
  enum State : int { kQueued = 0, kRunning = 1, kDone = 2, kFailed = 3, kCancelled = 4 };
  int unit = -1;
  int slot = -1;
  std::shared_ptr<const std::vector<Segment>> segs;
  std::shared_ptr<Job> prev;  // the job that filled this slot before (host slots: must finish first)
  int state = kQueued;        // mu_
  bool cancelled = false;     // mu_
  std::string error;          // mu_
  int64_t bytes = 0;
};

int64_t Streamer::staging_bytes(int64_t chunk_bytes, int num_staging) {
  return static_cast<int64_t>(num_staging) * LoadIO::staging_size(chunk_bytes);
}

Streamer::Streamer(std::shared_ptr<HostPool> pool, const StreamerConfig& cfg) : cfg_(cfg) {
  TORCH_CHECK(cfg.slot_bytes > 0, "moestream.Streamer: slot_bytes must be > 0, got ", cfg.slot_bytes);
  TORCH_CHECK(cfg.num_slots >= 1, "moestream.Streamer: num_slots must be >= 1, got ", cfg.num_slots);
  TORCH_CHECK(cfg.num_readers >= 1 && cfg.num_readers <= 256,
              "moestream.Streamer: num_readers must be in [1, 256], got ", cfg.num_readers);
  TORCH_CHECK(cfg.chunk_bytes >= kAlign, "moestream.Streamer: chunk_bytes must be >= ", kAlign, ", got ",
              cfg.chunk_bytes);
  TORCH_CHECK(cfg.num_staging >= 0, "moestream.Streamer: num_staging must be >= 0, got ", cfg.num_staging);
  c10::Device dev(cfg.device);
  if (dev.is_cuda()) {
    TORCH_CHECK(cuda_hooks().make_backend != nullptr, "moestream.Streamer: device '", cfg.device,
                "' needs moestream built with CUDA; this build has no CUDA support");
    TORCH_CHECK(dev.has_index(), "moestream.Streamer: device must name its index (cuda:N), got '", cfg.device, "'");
    backend_ = cuda_hooks().make_backend(dev.index(), cfg);
  } else {
    TORCH_CHECK(dev.is_cpu(), "moestream.Streamer: device must be cpu or cuda:N, got '", cfg.device, "'");
    backend_ = make_cpu_backend(cfg);
  }
  slots_.resize(cfg.num_slots);
  for (auto& s : slots_) {
    s.mem = backend_->alloc_slot(cfg.slot_bytes);
    s.ptr = s.mem.data_ptr<uint8_t>();
  }
  io_ = std::make_unique<LoadIO>(std::move(pool), cfg);
  scheduler_ = std::thread([this] { scheduler_loop(); });
}

Streamer::~Streamer() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (scheduler_.joinable()) scheduler_.join();
  io_.reset();  // the readers run what is queued, then join
  try {
    backend_->synchronize();
  } catch (...) {
  }
  for (auto& f : files_) {
    if (f->fd >= 0) ::close(f->fd);
    if (f->dfd >= 0) ::close(f->dfd);
  }
  slots_.clear();
  backend_.reset();
}

bool Streamer::staging_pinned() const { return io_->staging_pool() == nullptr || io_->staging_pool()->pinned(); }

std::string Streamer::staging_pin_error() const {
  return io_->staging_pool() == nullptr ? std::string() : io_->staging_pool()->pin_error();
}

int Streamer::add_file(const std::string& path) {
  auto f = std::make_shared<FileHandle>();
  f->path = path;
  f->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(f->fd >= 0, "moestream.Streamer.add_file: cannot open '", path, "': ", errno_str(errno));
  f->size = file_size_now(f->fd);
  if (cfg_.direct_io) {
    // Not every file system takes O_DIRECT (tmpfs refuses it): those files are read through the cache.
    f->dfd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  }
  std::lock_guard<std::mutex> lk(mu_);
  files_.push_back(f);
  return static_cast<int>(files_.size()) - 1;
}

int Streamer::add_unit(std::vector<Segment> segments) {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Segment> segs;
  for (auto& s : segments) {
    TORCH_CHECK(s.nbytes >= 0 && s.dst_offset >= 0 && s.src_offset >= 0, "moestream.Streamer.add_unit: tensor '",
                s.name, "' has a negative offset or size (dst ", s.dst_offset, ", src ", s.src_offset, ", nbytes ",
                s.nbytes, ")");
    TORCH_CHECK(s.dst_offset + s.nbytes <= cfg_.slot_bytes, "moestream.Streamer.add_unit: tensor '", s.name,
                "' at slot bytes [", s.dst_offset, ", ", s.dst_offset + s.nbytes, ") does not fit a slot of ",
                cfg_.slot_bytes, " bytes");
    if (s.nbytes == 0) continue;
    if (s.file >= 0) {
      TORCH_CHECK(s.file < static_cast<int>(files_.size()), "moestream.Streamer.add_unit: tensor '", s.name,
                  "' names file ", s.file, " but only ", files_.size(), " files are registered");
      const auto& f = files_[s.file];
      TORCH_CHECK(s.src_offset + s.nbytes <= f->size, "moestream.Streamer.add_unit: tensor '", s.name,
                  "' needs bytes [", s.src_offset, ", ", s.src_offset + s.nbytes, ") of '", f->path,
                  "' but the file has ", f->size, " bytes (truncated?)");
      TORCH_CHECK(backend_->orders_on_device() == false || !io_->staging().empty(),
                  "moestream.Streamer.add_unit: tensor '", s.name,
                  "' is read from a file, which on CUDA needs staging buffers (num_staging >= 1)");
      s.fh = f;
    } else {
      TORCH_CHECK(s.file == Segment::kFromPool, "moestream.Streamer.add_unit: tensor '", s.name, "' has file index ",
                  s.file, " (use -1 for the host pool)");
      TORCH_CHECK(s.src_offset + s.nbytes <= io_->pool_bytes(), "moestream.Streamer.add_unit: tensor '", s.name,
                  "' needs pool bytes [", s.src_offset, ", ", s.src_offset + s.nbytes, ") but the pool has ",
                  io_->pool_bytes(), " bytes");
    }
    segs.push_back(std::move(s));
  }
  // Read each file front to back, and merge ranges that are contiguous both in the source and in the
  // slot: a layer stored contiguously becomes a few large transfers.
  std::stable_sort(segs.begin(), segs.end(), [](const Segment& a, const Segment& b) {
    return a.file != b.file ? a.file < b.file : a.src_offset < b.src_offset;
  });
  std::vector<Segment> merged;
  for (auto& s : segs) {
    if (!merged.empty()) {
      auto& m = merged.back();
      if (m.file == s.file && m.src_offset + m.nbytes == s.src_offset && m.dst_offset + m.nbytes == s.dst_offset) {
        m.nbytes += s.nbytes;
        if (m.name.find(" .. ") == std::string::npos) {
          m.name += " .. " + s.name;
        } else {
          m.name = m.name.substr(0, m.name.find(" .. ")) + " .. " + s.name;
        }
        continue;
      }
    }
    merged.push_back(std::move(s));
  }
  units_.push_back(std::make_shared<const std::vector<Segment>>(std::move(merged)));
  unit_slot_.push_back(-1);
  return static_cast<int>(units_.size()) - 1;
}

int Streamer::num_units() const { return static_cast<int>(units_.size()); }

at::Tensor Streamer::slot(int i) const {
  TORCH_CHECK(i >= 0 && i < static_cast<int>(slots_.size()), "moestream.Streamer.slot: index must be in [0, ",
              slots_.size(), "), got ", i);
  return slots_[i].mem;
}

int Streamer::ensure_loaded(int unit, const std::unordered_set<int>& keep, bool required) {
  int s = unit_slot_[unit];
  if (s >= 0) {
    slots_[s].last_use = ++clock_;
    return s;
  }
  // Victim: a slot nobody computes on; for a prefetch also not one holding a unit wanted soon.
  // Empty slots first, then the least recently used.
  int victim = -1;
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    const Slot& c = slots_[i];
    if (c.in_use > 0) continue;
    if (!required && c.unit >= 0 && keep.count(c.unit)) continue;
    if (c.unit < 0) {
      victim = i;
      break;
    }
    if (victim < 0 || c.last_use < slots_[victim].last_use) victim = i;
  }
  if (victim < 0) {
    TORCH_CHECK(!required, "moestream.Streamer: all ", slots_.size(),
                " slots are in use (streamed modules nested or running concurrently?); cannot load unit ", unit);
    return -1;
  }
  Slot& v = slots_[victim];
  if (v.unit >= 0) unit_slot_[v.unit] = -1;
  if (v.job && v.job->state == Job::kQueued) v.job->cancelled = true;
  auto job = std::make_shared<Job>();
  job->unit = unit;
  job->slot = victim;
  job->segs = units_[unit];
  job->prev = v.job;
  for (const auto& sg : *job->segs) job->bytes += sg.nbytes;
  v.unit = unit;
  v.job = job;
  v.last_use = ++clock_;
  unit_slot_[unit] = victim;
  queue_.push_back(job);
  cv_.notify_all();
  return victim;
}

void Streamer::prefetch(int unit) {
  std::lock_guard<std::mutex> lk(mu_);
  TORCH_CHECK(unit >= 0 && unit < static_cast<int>(units_.size()), "moestream.Streamer.prefetch: unit must be in [0, ",
              units_.size(), "), got ", unit);
  ensure_loaded(unit, {unit}, false);
}

std::pair<at::Tensor, int> Streamer::acquire(int unit, const std::vector<int>& ahead) {
  const int64_t t0 = now_ns();
  std::unique_lock<std::mutex> lk(mu_);
  TORCH_CHECK(unit >= 0 && unit < static_cast<int>(units_.size()), "moestream.Streamer.acquire: unit must be in [0, ",
              units_.size(), "), got ", unit);
  std::unordered_set<int> keep(ahead.begin(), ahead.end());
  keep.insert(unit);
  const int s = ensure_loaded(unit, keep, true);
  slots_[s].in_use++;
  for (int a : ahead) {
    if (a < 0 || a >= static_cast<int>(units_.size()) || a == unit) continue;
    ensure_loaded(a, keep, false);
  }
  std::shared_ptr<Job> job = slots_[s].job;
  const bool hit = job->state >= Job::kDone;
  cv_.wait(lk, [&] { return job->state >= Job::kDone; });
  acquires_++;
  hits_ += hit ? 1 : 0;
  wait_ns_ += now_ns() - t0;
  if (job->state != Job::kDone) {
    slots_[s].in_use--;
    if (slots_[s].job == job) {
      slots_[s].unit = -1;
      unit_slot_[unit] = -1;
    }
    std::string err = job->error.empty() ? std::string("moestream.Streamer: the load of unit ") +
                                               std::to_string(unit) + " was cancelled"
                                         : job->error;
    lk.unlock();
    TORCH_CHECK(false, err);
  }
  at::Tensor mem = slots_[s].mem;
  lk.unlock();
  // The slot is in use, so no later job can re-record its ready event before this wait is enqueued.
  backend_->consumer_wait_ready(s);
  return {mem, s};
}

void Streamer::release(int unit) {
  std::lock_guard<std::mutex> lk(mu_);
  TORCH_CHECK(unit >= 0 && unit < static_cast<int>(units_.size()), "moestream.Streamer.release: unit must be in [0, ",
              units_.size(), "), got ", unit);
  const int s = unit_slot_[unit];
  TORCH_CHECK(s >= 0 && slots_[s].in_use > 0, "moestream.Streamer.release: unit ", unit, " is not acquired");
  backend_->record_released(s);
  slots_[s].in_use--;
  slots_[s].last_use = ++clock_;
  cv_.notify_all();
}

void Streamer::synchronize() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] {
      if (!queue_.empty()) return false;
      for (const auto& s : slots_)
        if (s.job && s.job->state < Job::kDone) return false;
      return true;
    });
  }
  backend_->synchronize();
}

void Streamer::complete(const std::shared_ptr<Job>& job, const std::string& error) {
  std::lock_guard<std::mutex> lk(mu_);
  if (job->error.empty()) job->error = error;
  job->state = job->error.empty() ? Job::kDone : Job::kFailed;
  if (job->state == Job::kDone) bytes_loaded_ += job->bytes;
  cv_.notify_all();
}

void Streamer::scheduler_loop() {
  std::string init_error;
  try {
    backend_->thread_init();
  } catch (const std::exception& e) {
    init_error = e.what();
  }
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    if (queue_.empty() && backend_->pending() && !stop_) {
      // Nothing new to issue: complete what is in flight so the jobs waiting on it become usable.
      lk.unlock();
      backend_->drain();
      lk.lock();
      continue;
    }
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) break;
    std::shared_ptr<Job> job = queue_.front();
    queue_.pop_front();
    if (job->cancelled) {
      job->state = Job::kCancelled;
      job->prev.reset();
      cv_.notify_all();
      continue;
    }
    if (!init_error.empty()) {
      job->error = "moestream.Streamer: the copy thread could not start: " + init_error;
      job->state = Job::kFailed;
      cv_.notify_all();
      continue;
    }
    if (!backend_->orders_on_device() && job->prev) {
      // Readers of the previous occupant may still write into this slot (it was evicted before use).
      auto prev = job->prev;
      cv_.wait(lk, [&] { return prev->state >= Job::kDone; });
    }
    job->prev.reset();
    job->state = Job::kRunning;
    jobs_++;
    LoadTask task;
    task.unit = job->unit;
    task.slot = job->slot;
    task.dst = slots_[job->slot].ptr;
    task.segs = job->segs;
    task.done = [this, job](const std::string& error) { complete(job, error); };
    lk.unlock();
    backend_->start(std::move(task), *io_);  // never throws: errors reach task.done
    lk.lock();
  }
  for (auto& j : queue_) j->state = Job::kCancelled;
  queue_.clear();
  cv_.notify_all();
  lk.unlock();
  try {
    backend_->drain();
  } catch (...) {
  }
}

void Streamer::read_into(const at::Tensor& dst, std::vector<Segment> segments) {
  // dst: a contiguous CPU tensor; each segment's dst_offset is a byte offset into it.
  TORCH_CHECK(dst.device().is_cpu(), "moestream.Streamer.read_into: dst must be a CPU tensor, got ", dst.device());
  TORCH_CHECK(dst.is_contiguous(), "moestream.Streamer.read_into: dst must be contiguous");
  const int64_t cap = dst.numel() * static_cast<int64_t>(dst.element_size());
  uint8_t* base = static_cast<uint8_t*>(dst.data_ptr());
  std::vector<std::shared_ptr<FileHandle>> files;
  {
    std::lock_guard<std::mutex> lk(mu_);
    files = files_;
  }
  for (const auto& s : segments) {
    TORCH_CHECK(s.nbytes >= 0 && s.dst_offset >= 0 && s.dst_offset + s.nbytes <= cap,
                "moestream.Streamer.read_into: tensor '", s.name, "' at bytes [", s.dst_offset, ", ",
                s.dst_offset + s.nbytes, ") does not fit dst of ", cap, " bytes");
    TORCH_CHECK(s.file >= 0 && s.file < static_cast<int>(files.size()), "moestream.Streamer.read_into: tensor '",
                s.name, "' names file ", s.file, " but ", files.size(), " files are registered");
    TORCH_CHECK(s.src_offset >= 0 && s.src_offset + s.nbytes <= files[s.file]->size,
                "moestream.Streamer.read_into: tensor '", s.name, "' needs bytes [", s.src_offset, ", ",
                s.src_offset + s.nbytes, ") of '", files[s.file]->path, "' which has ", files[s.file]->size,
                " bytes (truncated?)");
  }
  for (auto& s : segments) s.fh = files[s.file];
  auto segs = std::make_shared<const std::vector<Segment>>(std::move(segments));
  std::mutex m;
  std::condition_variable cv;
  int64_t pending = 0;
  std::string first_error;
  const int64_t chunk = io_->chunk_bytes();
  for (size_t i = 0; i < segs->size(); ++i) {
    const Segment& seg = (*segs)[i];
    for (int64_t off = 0; off < seg.nbytes; off += chunk) {
      const int64_t n = std::min(chunk, seg.nbytes - off);
      {
        std::lock_guard<std::mutex> lk(m);
        pending++;
      }
      io_->submit([&, segs, i, off, n] {
        const Segment& sg = (*segs)[i];
        uint8_t* data = nullptr;
        std::string err = io_->read(sg, off, n, base + sg.dst_offset + off, nullptr, &data);
        std::lock_guard<std::mutex> lk(m);
        if (!err.empty() && first_error.empty()) first_error = err;
        if (--pending == 0) cv.notify_all();
      });
    }
  }
  std::unique_lock<std::mutex> lk(m);
  cv.wait(lk, [&] { return pending == 0; });
  TORCH_CHECK(first_error.empty(), first_error);
}

std::map<std::string, double> Streamer::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  std::map<std::string, double> s;
  const HostPool* pool = io_->pool();
  const HostPool* staging = io_->staging_pool();
  s["bytes_loaded"] = static_cast<double>(bytes_loaded_);
  s["bytes_read"] = static_cast<double>(io_->bytes_read.load());
  s["bytes_copied"] = static_cast<double>(io_->bytes_copied());
  s["read_seconds"] = static_cast<double>(io_->read_ns.load()) * 1e-9;
  s["loads"] = static_cast<double>(jobs_);
  s["acquires"] = static_cast<double>(acquires_);
  s["hits"] = static_cast<double>(hits_);
  s["wait_seconds"] = static_cast<double>(wait_ns_) * 1e-9;
  s["num_slots"] = static_cast<double>(slots_.size());
  s["slot_bytes"] = static_cast<double>(cfg_.slot_bytes);
  s["pool_bytes"] = static_cast<double>(io_->pool_bytes() + (staging ? staging->capacity() : 0));
  // pinned: every host byte the copies read from is page-locked (the weights pool and the staging buffers)
  const bool any = io_->pool_bytes() > 0 || staging != nullptr;
  const bool pinned = any && (pool == nullptr || pool->capacity() == 0 || pool->pinned()) &&
                      (staging == nullptr || staging->pinned());
  s["pool_pinned"] = pinned ? 1.0 : 0.0;
  s["staging_buffers"] = static_cast<double>(io_->staging().size());
  s["readers"] = static_cast<double>(io_->num_readers());
  return s;
}

void Streamer::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  bytes_loaded_ = 0;
  io_->reset_counters();
  jobs_ = 0;
  acquires_ = 0;
  hits_ = 0;
  wait_ns_ = 0;
}

}  // namespace stream
}  // namespace moestream
