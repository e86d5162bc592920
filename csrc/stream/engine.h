// The weight streaming engine: a host memory pool, disk reader threads and a streamer that moves
// whole units (one decoder layer each) from host memory or safetensors files into a ring of
// device slots, ahead of the compute that needs them.
//
// Threads:
//   - the caller (Python) thread: acquire()/release()/prefetch(); on CUDA it is also the compute thread;
//   - one scheduler thread: takes load jobs in FIFO order and starts each on the device backend;
//   - N reader threads: pread() byte ranges of files into slots (CPU) or staging buffers (CUDA), and
//     do the host memcpy work on CPU.
// The Streamer owns the slot ring, the job queue and eviction; a DeviceBackend owns how a job's bytes
// reach a slot: the CPU backend (backend_cpu.cpp) reads and copies straight into RAM slots; the
// CUDA backend (stream_cuda.cpp) stages file reads in pinned buffers and issues host-to-device copies
// on its copy stream, ordered against compute by per-slot events. The host only blocks when the data
// is not even read from disk yet.
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

// Alignment of O_DIRECT transfers (file offset, length and buffer); 4096 covers every common
// logical block size.
constexpr int64_t kAlign = 4096;

// Bytes currently held by live pools and slots in this process (for reports and leak tests).
int64_t live_host_bytes();
int64_t live_slot_bytes();
void add_live_slot_bytes(int64_t delta);  // device slots (host slots are counted by their HostPool)

// How a HostPool is page-locked: not at all, with mlock (CPU streaming), or with cudaHostRegister.
enum class PinMode : int { kNone = 0, kMlock = 1, kCuda = 2 };

// One aligned host allocation, made once, reused for the lifetime of the streamer. pin() page-locks
// it per its PinMode; when locking is refused (memlock limits, no driver) the memory stays pageable
// and pin_error() says why. Callers pin after filling it, so the pages are not all resident before
// the tensors they copy are freed.
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

struct FileHandle {
  std::string path;
  int fd = -1;
  int dfd = -1;  // O_DIRECT descriptor, -1 when direct I/O is off or not supported by the file system
  int64_t size = 0;
};

// A byte range to place at dst_offset of a slot (or of a destination tensor for read_into).
// file >= 0: the bytes come from file `file` at src_offset; file == kFromPool: from the host pool.
struct Segment {
  static constexpr int kFromPool = -1;
  int64_t dst_offset = 0;
  int64_t nbytes = 0;
  int file = kFromPool;
  int64_t src_offset = 0;
  std::string name;  // the tensor the bytes belong to, for error messages
  std::shared_ptr<FileHandle> fh;  // resolved from `file` when the segment is registered
};

// Which loaded unit a load evicts when no slot is free: the least recently used, or the least
// frequently requested (ties: the least recently used). Slots in use are never evicted.
enum class Eviction : int { kLRU = 0, kLFU = 1 };

// Everything that shapes a Streamer, fixed at construction.
struct StreamerConfig {
  std::string device = "cpu";  // "cpu" or "cuda:N"
  int64_t slot_bytes = 0;      // bytes of one slot (> 0)
  int num_slots = 1;           // slots in the ring (>= 1)
  int num_readers = 4;         // reader threads (1..256)
  int64_t chunk_bytes = 4 << 20;  // granularity of reads and copies (>= 4096)
  int num_staging = 0;         // staging buffers of chunk_bytes: file reads on CUDA, O_DIRECT bounces on CPU
  bool direct_io = false;      // read files with O_DIRECT where the file system allows it
  PinMode staging_pin = PinMode::kNone;  // how the staging buffers are page-locked
  // One allocation of num_slots * slot_bytes with slot i at byte i * slot_bytes (slot_array()), so a
  // tensor of every slot is one strided view (an expert cache: [slots, ...] weights for grouped_mm).
  bool contiguous_slots = false;
  Eviction eviction = Eviction::kLRU;
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

// The host side of loading, shared by the backends: the weights pool, the staging buffers, the reader
// threads and the file reader, with the byte counters.
class LoadIO {
 public:
  LoadIO(std::shared_ptr<HostPool> pool, const StreamerConfig& cfg);
  ~LoadIO();  // runs what the readers have queued, then joins them

  // Bytes of one staging buffer: a chunk plus room to widen an unaligned range to whole blocks.
  static int64_t staging_size(int64_t chunk_bytes);
  const uint8_t* pool_data() const { return pool_ ? pool_->data() : nullptr; }
  int64_t pool_bytes() const { return pool_ ? pool_->capacity() : 0; }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  bool direct_io() const { return direct_io_; }
  const std::vector<uint8_t*>& staging() const { return staging_; }
  const HostPool* staging_pool() const { return staging_pool_.get(); }
  const HostPool* pool() const { return pool_.get(); }
  void submit(std::function<void()> fn) { readers_->submit(std::move(fn)); }
  int num_readers() const { return readers_->size(); }
  // Reads seg's [off, off + n) into dst (or into `staging` when given); *data_out is where the bytes
  // landed. O_DIRECT where everything is block aligned (or through the staging buffer). Returns "" or
  // an error naming the tensor and the file.
  std::string read(const Segment& seg, int64_t off, int64_t n, uint8_t* dst, uint8_t* staging, uint8_t** data_out);
  void count_copied(int64_t n) { bytes_copied_ += n; }

  std::atomic<int64_t> bytes_read{0};
  std::atomic<int64_t> read_ns{0};
  int64_t bytes_copied() const { return bytes_copied_.load(); }
  void reset_counters();

 private:
  std::shared_ptr<HostPool> pool_;
  std::shared_ptr<HostPool> staging_pool_;
  std::vector<uint8_t*> staging_;
  int64_t chunk_bytes_;
  bool direct_io_;
  std::atomic<int64_t> bytes_copied_{0};
  std::unique_ptr<TaskPool> readers_;
};

// One load as a backend sees it: put the unit's segments into the slot at `dst`.
struct LoadTask {
  int unit = -1;
  int slot = -1;
  uint8_t* dst = nullptr;
  std::shared_ptr<const std::vector<Segment>> segs;
  // Called exactly once, from any thread, with "" once the bytes are usable by the consumer (CPU:
  // in the slot; CUDA: copies issued and the slot's ready event recorded), or with the error.
  std::function<void(const std::string&)> done;
};

// The device side of the streamer.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  // Device slots are ordered by device events (a job may start before the previous job in its slot
  // has finished); host slots are not, so the scheduler waits for it.
  virtual bool orders_on_device() const = 0;
  virtual at::Tensor alloc_slot(int64_t nbytes) = 0;
  // Scheduler thread, once, before the first start().
  virtual void thread_init() {}
  // Scheduler thread, in job order. Must not throw: errors go to task.done.
  virtual void start(LoadTask task, LoadIO& io) = 0;
  // Scheduler thread: whether started work waits for drain() to complete (CUDA's staged chunks).
  virtual bool pending() const { return false; }
  virtual void drain() {}
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
  std::unique_ptr<DeviceBackend> (*make_backend)(int device_index, const StreamerConfig& cfg) = nullptr;
};
CudaHooks& cuda_hooks();

class Streamer {
 public:
  // pool: host memory holding the weights of host segments (may be null when every unit reads files).
  Streamer(std::shared_ptr<HostPool> pool, const StreamerConfig& cfg);
  ~Streamer();
  Streamer(const Streamer&) = delete;
  Streamer& operator=(const Streamer&) = delete;

  // Host bytes the streamer allocates for num_staging staging buffers of chunk_bytes chunks.
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
  // acquire() in two steps, for callers that hold several units at once (an expert cache): request()
  // pins unit to a slot and queues its load if it is not there (never blocks; raises when every slot
  // is pinned), wait() blocks until the requested unit is usable (a failed load raises and unpins it:
  // do not release it then). Both count as one acquire; release() unpins.
  int request(int unit);
  void wait(int unit);
  // Whether unit holds a slot (loaded or loading), and whether its load has completed.
  bool is_cached(int unit);
  bool is_ready(int unit);
  // The units currently holding a slot, in slot order (-1: empty slot).
  std::vector<int> slot_units();
  // Waits for every queued load.
  void synchronize();
  // Synchronous read of file segments into a CPU tensor (dst_offset in bytes from its data pointer).
  void read_into(const at::Tensor& dst, std::vector<Segment> segments);

  std::map<std::string, double> stats();
  void reset_stats();
  int num_slots() const { return static_cast<int>(slots_.size()); }
  int64_t slot_bytes() const { return cfg_.slot_bytes; }
  int num_units() const;
  at::Tensor slot(int i) const;
  // Every slot as one uint8 tensor [num_slots * slot_bytes] (contiguous_slots only).
  at::Tensor slot_array() const;
  const std::string& device_str() const { return cfg_.device; }
  const StreamerConfig& config() const { return cfg_; }
  bool staging_pinned() const;
  std::string staging_pin_error() const;

 private:
  struct Job;
  struct Slot {
    at::Tensor mem;
    uint8_t* ptr = nullptr;
    int unit = -1;
    int in_use = 0;
    uint64_t last_use = 0;
    std::shared_ptr<Job> job;
  };

  int ensure_loaded(int unit, const std::unordered_set<int>& keep, bool required);  // mu_ held
  bool evicts_before(const Slot& a, const Slot& b) const;                          // mu_ held
  // Waits (lk holding mu_) for the load in slot s of the pinned unit; unlocks. A failed load
  // unpins the unit and raises.
  void wait_ready(std::unique_lock<std::mutex>& lk, int unit, int s, int64_t t0);
  int checked_unit(int unit, const char* fn) const;
  void scheduler_loop();
  void complete(const std::shared_ptr<Job>& job, const std::string& error);

  StreamerConfig cfg_;
  std::unique_ptr<LoadIO> io_;
  std::unique_ptr<DeviceBackend> backend_;

  std::vector<std::shared_ptr<FileHandle>> files_;
  std::vector<std::shared_ptr<const std::vector<Segment>>> units_;
  std::vector<int> unit_slot_;
  std::vector<Slot> slots_;
  at::Tensor slot_array_;
  std::vector<int64_t> uses_;  // requests per unit (LFU)
  uint64_t clock_ = 0;

  std::deque<std::shared_ptr<Job>> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread scheduler_;

  // statistics (mu_ held)
  int64_t bytes_loaded_ = 0;  // bytes of units whose load completed (issued, on CUDA)
  int64_t jobs_ = 0;
  int64_t acquires_ = 0;
  int64_t hits_ = 0;
  int64_t evictions_ = 0;
  int64_t wait_ns_ = 0;
};

// The CPU backend: reader threads read and copy straight into RAM slots (backend_cpu.cpp).
std::unique_ptr<DeviceBackend> make_cpu_backend(const StreamerConfig& cfg);

}  // namespace stream
}  // namespace moestream
