// The streamer (see engine.h): the slot ring, the job queue and its scheduler thread, eviction, and
// the synchronous reads of resident tensors. The host side is in host_io.cpp, the backends in
// backend_cpu.cpp and stream_cuda.cpp.
#include "stream/engine.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "stream/io_util.h"

namespace moestream {
namespace stream {

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
  if (cfg.contiguous_slots) {
    slot_array_ = backend_->alloc_slot(cfg.slot_bytes * cfg.num_slots);
    for (int i = 0; i < cfg.num_slots; ++i) {
      slots_[i].mem = slot_array_.narrow(0, static_cast<int64_t>(i) * cfg.slot_bytes, cfg.slot_bytes);
      slots_[i].ptr = slots_[i].mem.data_ptr<uint8_t>();
    }
  } else {
    for (auto& s : slots_) {
      s.mem = backend_->alloc_slot(cfg.slot_bytes);
      s.ptr = s.mem.data_ptr<uint8_t>();
    }
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
  slot_array_ = at::Tensor();
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
  uses_.push_back(0);
  return static_cast<int>(units_.size()) - 1;
}

int Streamer::num_units() const { return static_cast<int>(units_.size()); }

at::Tensor Streamer::slot_array() const {
  TORCH_CHECK(slot_array_.defined(), "moestream.Streamer.slot_array: the streamer was not configured with "
              "contiguous_slots=True");
  return slot_array_;
}

int Streamer::checked_unit(int unit, const char* fn) const {
  TORCH_CHECK(unit >= 0 && unit < static_cast<int>(units_.size()), "moestream.Streamer.", fn,
              ": unit must be in [0, ", units_.size(), "), got ", unit);
  return unit;
}

bool Streamer::evicts_before(const Slot& a, const Slot& b) const {
  if (cfg_.eviction == Eviction::kLFU && uses_[a.unit] != uses_[b.unit]) return uses_[a.unit] < uses_[b.unit];
  return a.last_use < b.last_use;
}

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
    if (victim < 0 || evicts_before(c, slots_[victim])) victim = i;
  }
  if (victim < 0) {
    TORCH_CHECK(!required, "moestream.Streamer: all ", slots_.size(),
                " slots are in use (streamed modules nested or running concurrently?); cannot load unit ", unit);
    return -1;
  }
  Slot& v = slots_[victim];
  if (v.unit >= 0) {
    unit_slot_[v.unit] = -1;
    evictions_++;
  }
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
  uses_[unit]++;
  for (int a : ahead) {
    if (a < 0 || a >= static_cast<int>(units_.size()) || a == unit) continue;
    ensure_loaded(a, keep, false);
  }
  at::Tensor mem = slots_[s].mem;
  wait_ready(lk, unit, s, t0);
  return {mem, s};
}

int Streamer::request(int unit) {
  std::lock_guard<std::mutex> lk(mu_);
  checked_unit(unit, "request");
  const int s = ensure_loaded(unit, {unit}, true);
  slots_[s].in_use++;
  uses_[unit]++;
  return s;
}

void Streamer::wait(int unit) {
  const int64_t t0 = now_ns();
  std::unique_lock<std::mutex> lk(mu_);
  checked_unit(unit, "wait");
  const int s = unit_slot_[unit];
  TORCH_CHECK(s >= 0 && slots_[s].in_use > 0, "moestream.Streamer.wait: unit ", unit, " is not requested");
  wait_ready(lk, unit, s, t0);
}

void Streamer::wait_ready(std::unique_lock<std::mutex>& lk, int unit, int s, int64_t t0) {
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
  lk.unlock();
  // The slot is in use, so no later job can re-record its ready event before this wait is enqueued.
  backend_->consumer_wait_ready(s);
}

bool Streamer::is_cached(int unit) {
  std::lock_guard<std::mutex> lk(mu_);
  checked_unit(unit, "is_cached");
  const int s = unit_slot_[unit];
  return s >= 0 && slots_[s].job && slots_[s].job->state != Job::kFailed && slots_[s].job->state != Job::kCancelled;
}

bool Streamer::is_ready(int unit) {
  std::lock_guard<std::mutex> lk(mu_);
  checked_unit(unit, "is_ready");
  const int s = unit_slot_[unit];
  return s >= 0 && slots_[s].job && slots_[s].job->state == Job::kDone;
}

std::vector<int> Streamer::slot_units() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int> out;
  out.reserve(slots_.size());
  for (const auto& s : slots_) out.push_back(s.unit);
  return out;
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
  s["evictions"] = static_cast<double>(evictions_);
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
  evictions_ = 0;
  wait_ns_ = 0;
}

}  // namespace stream
}  // namespace moestream
