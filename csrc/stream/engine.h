// The weight streaming engine: a host memory pool, disk reader threads and a streamer that moves
// whole units (one decoder layer each) from host memory or safetensors files into a ring of
// device slots, ahead of the compute that needs them.
//
// Threads:
//   - the caller (Python) thread: acquire()/release()/prefetch(); on CUDA it is also the compute thread;
//   - one scheduler thread: takes load jobs in FIFO order, issues host->device copies on a dedicated
//     copy stream (CUDA) and hands file reads to the readers;
//   - N reader threads: pread() byte ranges of files into slots (CPU) or pinned staging buffers (CUDA),
//     and do the host memcpy work on CPU.
// Ordering (CUDA): a copy into slot s waits (on the device) for the event recorded when compute
// released s; compute waits (on the device) for the event recorded after the last copy into s.
// The host only blocks when the data is not even read from disk yet.
// On CPU the same pipeline streams into RAM slots; "device" waits become host waits.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

namespace moestream {
namespace stream {

// Bytes currently held by live pools and slots in this process (for reports and leak tests).
int64_t live_host_bytes();
int64_t live_slot_bytes();

enum class PinMode : int { kNone = 0, kMlock = 1, kCuda = 2 };

// One aligned host allocation, made once, reused for the lifetime of the streamer. pin() page-locks
// it, with cudaHostRegister (kCuda, through the CUDA glue) or mlock (kMlock); when locking is refused
// (memlock limits, no driver) the memory stays pageable and pin_error() says why. Callers pin after
// filling it, so the pages are not all resident before the tensors they copy are freed.
class HostPool : public std::enable_shared_from_this<HostPool> {
 public:
  // is_slot: a RAM slot of a CPU streamer (counted in live_slot_bytes, not live_host_bytes).
  HostPool(int64_t nbytes, PinMode pin, bool is_slot = false);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  uint8_t* data() const { return data_; }
  int64_t capacity() const { return capacity_; }
  bool pinned() const { return pinned_; }
  PinMode pin_mode() const { return pin_mode_; }
  const std::string& pin_error() const { return pin_error_; }
  // Page-locks the whole pool per pin_mode(); returns pinned(). Idempotent.
  bool pin();
  // Touches every page of [offset, offset + nbytes).
  void populate(int64_t offset, int64_t nbytes);
  // A uint8 CPU tensor aliasing [offset, offset + nbytes); it keeps the pool alive.
  at::Tensor view(int64_t offset, int64_t nbytes);

 private:
  uint8_t* data_ = nullptr;
  int64_t capacity_ = 0;
  int64_t mapped_ = 0;
  int64_t page_ = 4096;
  bool pinned_ = false;
  std::mutex pin_mu_;
  bool is_slot_ = false;
  PinMode pin_mode_ = PinMode::kNone;
  std::string pin_error_;
};

// The device side of the streamer. The CPU backend is a set of no-ops (host waits do the ordering);
// the CUDA backend lives in stream_cuda.cpp (built only with MOESTREAM_WITH_CUDA).
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual bool is_cuda() const { return false; }
  // Called once on the scheduler thread before it issues anything (binds the device).
  virtual void thread_init() {}
  // Scheduler thread, in job order.
  virtual void producer_wait_released(int slot) { (void)slot; }
  virtual void copy_h2d(void* dst, const void* src, int64_t nbytes) {
    (void)dst;
    (void)src;
    (void)nbytes;
  }
  virtual void record_ready(int slot) { (void)slot; }
  virtual void record_staging(int buf) { (void)buf; }
  // Blocks the calling host thread until the last copy out of staging buffer buf has finished.
  virtual void wait_staging(int buf) { (void)buf; }
  // Caller (compute) thread: the current stream waits for slot's data / marks slot's use finished.
  virtual void consumer_wait_ready(int slot) { (void)slot; }
  virtual void record_released(int slot) { (void)slot; }
  // Waits for every copy issued so far.
  virtual void synchronize() {}
};

// Entry points provided by the CUDA glue when it is compiled in (all null otherwise).
struct CudaHooks {
  bool (*host_register)(void* ptr, int64_t nbytes, std::string* error) = nullptr;
  void (*host_unregister)(void* ptr) = nullptr;
  std::unique_ptr<DeviceBackend> (*make_backend)(int device_index, int num_slots, int num_staging) = nullptr;
};
CudaHooks& cuda_hooks();

// A byte range to place at dst_offset of a slot (or of a destination tensor for read_into).
// file >= 0: the bytes come from file `file` at src_offset; file == -1: from the host pool at src_offset.
struct FileHandle {
  std::string path;
  int fd = -1;
  int dfd = -1;  // O_DIRECT descriptor, -1 when direct I/O is off or not supported by the file system
  int64_t size = 0;
};

struct Segment {
  int64_t dst_offset = 0;
  int64_t nbytes = 0;
  int file = -1;
  int64_t src_offset = 0;
  std::string name;  // the tensor the bytes belong to, for error messages
  std::shared_ptr<FileHandle> fh;  // resolved from `file` when the segment is registered
};

// A fixed set of worker threads running submitted tasks in FIFO order.
class TaskPool {
 public:
  explicit TaskPool(int num_threads);
  ~TaskPool();
  void submit(std::function<void()> fn);
  int size() const { return static_cast<int>(threads_.size()); }

 private:
  void loop();
  std::vector<std::thread> threads_;
  std::deque<std::function<void()>> tasks_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

class Streamer {
 public:
  // pool: host memory (weights for host segments, plus staging buffers at staging_offset).
  // slot_bytes x num_slots: the device (or RAM) ring. chunk_bytes: granularity of reads and copies.
  Streamer(std::shared_ptr<HostPool> pool, const std::string& device, int64_t slot_bytes, int num_slots,
           int num_readers, int64_t chunk_bytes, int64_t staging_offset, int num_staging, bool direct_io);
  ~Streamer();
  Streamer(const Streamer&) = delete;
  Streamer& operator=(const Streamer&) = delete;

  // Bytes of pool needed by num_staging staging buffers for chunk_bytes chunks.
  static int64_t staging_bytes(int64_t chunk_bytes, int num_staging);

  int add_file(const std::string& path);
  // Registers a unit (what one slot holds); returns its id. Segments are checked against the slot,
  // the pool and the file sizes here, so a bad plan fails before anything runs.
  int add_unit(std::vector<Segment> segments);
  // Starts loading unit into a slot unless it is there already (a hint: skipped if no slot is free).
  void prefetch(int unit);
  // Returns (slot buffer, slot index) holding unit, once usable by the caller's current stream.
  // `ahead` are units to start loading next (in order). Blocks only until the data is issued (CUDA)
  // or present (CPU). A failed read raises, naming the file and tensor.
  std::pair<at::Tensor, int> acquire(int unit, const std::vector<int>& ahead);
  // Compute on unit's slot has been issued; the slot may be refilled once that compute is done.
  void release(int unit);
  // Waits for every queued load.
  void synchronize();
  // Synchronous read of file segments into a CPU tensor (dst_offset in bytes from its data pointer).
  void read_into(const at::Tensor& dst, std::vector<Segment> segments);

  std::map<std::string, double> stats();
  void reset_stats();
  int num_slots() const { return static_cast<int>(slots_.size()); }
  int64_t slot_bytes() const { return slot_bytes_; }
  int num_units() const;
  at::Tensor slot(int i) const;
  const std::string& device_str() const { return device_str_; }

 private:
  struct Job;
  struct ReadTask;
  struct Slot {
    at::Tensor mem;
    uint8_t* ptr = nullptr;
    int unit = -1;
    int in_use = 0;
    uint64_t last_use = 0;
    std::shared_ptr<Job> job;
  };
  struct Inflight;  // a staged chunk waiting for its read (CUDA), or a job to finalise

  int ensure_loaded(int unit, const std::unordered_set<int>& keep, bool required);  // mu_ held
  void scheduler_loop();
  void run_job_cpu(const std::shared_ptr<Job>& job);
  void run_job_cuda(const std::shared_ptr<Job>& job);
  void drain_inflight(size_t keep);  // completes inflight entries until at most `keep` remain
  void finish_task(const std::shared_ptr<Job>& job, const std::string& error);
  void set_job_error(const std::shared_ptr<Job>& job, const std::string& error);
  // Reads seg's [off, off + n) into dst; staging is used for O_DIRECT. Returns "" or an error message.
  std::string read_range(const Segment& seg, int64_t off, int64_t n, uint8_t* dst, uint8_t* staging,
                         uint8_t** data_out);
  int acquire_staging();  // mu_ not held; CPU staged reads only
  void release_staging(int buf);

  std::shared_ptr<HostPool> pool_;
  std::string device_str_;
  bool cuda_ = false;
  int64_t slot_bytes_ = 0;
  int64_t chunk_bytes_ = 0;
  bool direct_io_ = false;
  std::unique_ptr<DeviceBackend> backend_;

  std::vector<std::shared_ptr<FileHandle>> files_;
  std::vector<std::shared_ptr<const std::vector<Segment>>> units_;
  std::vector<int> unit_slot_;
  std::vector<Slot> slots_;
  uint64_t clock_ = 0;
  uint64_t seq_ = 0;

  // staging buffers (CUDA file reads, CPU O_DIRECT reads)
  std::vector<uint8_t*> staging_;
  int64_t staging_size_ = 0;
  std::vector<char> staging_busy_;  // CPU: taken by a reader task
  int staging_next_ = 0;
  std::deque<std::shared_ptr<Inflight>> inflight_;  // scheduler thread only (CUDA)
  std::vector<std::shared_ptr<Inflight>> staging_owner_;  // CUDA: the inflight chunk using each buffer

  std::deque<std::shared_ptr<Job>> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread scheduler_;
  std::unique_ptr<TaskPool> readers_;

  // statistics (mu_ held, or atomics)
  std::atomic<int64_t> bytes_read_{0};
  std::atomic<int64_t> bytes_copied_{0};
  std::atomic<int64_t> read_ns_{0};
  int64_t bytes_loaded_ = 0;  // bytes of units whose load completed (issued, on CUDA)
  int64_t jobs_ = 0;
  int64_t acquires_ = 0;
  int64_t hits_ = 0;
  int64_t wait_ns_ = 0;
};

// Reads whole files with `threads` threads in chunk_bytes pieces into scratch memory and returns the
// seconds taken: the raw disk (or page cache) read rate the streamer is compared with.
double read_files_seconds(const std::vector<std::string>& paths, int64_t chunk_bytes, int threads,
                          bool direct_io);

}  // namespace stream
}  // namespace moestream
