// CUDA side of the streaming engine (compiled only with MOESTREAM_WITH_CUDA): page-locking of the
// host pool, and the device backend of the streamer, which runs its load jobs: device slots, a
// dedicated non-blocking copy stream, one "ready" and one "released" event per slot, one event per
// staging buffer, and the pipeline of file reads into staging buffers and copies out of them.
//
//   copy stream:    [wait released[s]] -> H2D copies into slot s -> record ready[s]
//   compute stream: [wait ready[s]] -> kernels of the layer in slot s -> record released[s]
//
// Neither stream ever blocks the host; the host only waits on a staging event before a reader
// thread overwrites a staging buffer whose copy may still be running.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/cuda_error.h"
#include "stream/engine.h"

namespace moestream {
namespace stream {
namespace {

bool cuda_host_register(void* ptr, int64_t nbytes, std::string* error) {
  // Portable: usable as pinned memory from every device's context.
  cudaError_t err = cudaHostRegister(ptr, static_cast<size_t>(nbytes), cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    *error = std::string("cudaHostRegister of ") + std::to_string(nbytes) + " bytes failed: " +
             cudaGetErrorString(err) + " (memlock limit or not enough lockable memory)";
    (void)cudaGetLastError();  // clear the (non-sticky) error so later CUDA calls do not report it
    return false;
  }
  return true;
}

void cuda_host_unregister(void* ptr) {
  (void)cudaHostUnregister(ptr);
  (void)cudaGetLastError();
}

class CudaBackend final : public DeviceBackend {
 public:
  CudaBackend(int device, const StreamerConfig& cfg) : device_(device) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    MS_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "Streamer");
    auto make = [](std::vector<cudaEvent_t>& v, int n) {
      v.resize(n);
      for (auto& e : v) MS_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "Streamer");
    };
    make(ready_, cfg.num_slots);
    make(released_, cfg.num_slots);
    make(staging_, cfg.num_staging);
    owner_.resize(cfg.num_staging);
  }

  ~CudaBackend() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    (void)cudaStreamSynchronize(copy_);
    for (auto* v : {&ready_, &released_, &staging_})
      for (auto e : *v) (void)cudaEventDestroy(e);
    (void)cudaStreamDestroy(copy_);
    add_live_slot_bytes(-slot_bytes_);
  }

  bool orders_on_device() const override { return true; }

  at::Tensor alloc_slot(int64_t nbytes) override {
    auto opts = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, static_cast<c10::DeviceIndex>(device_));
    at::Tensor t = at::empty({nbytes}, opts);
    slot_bytes_ += nbytes;
    add_live_slot_bytes(nbytes);
    return t;
  }

  void thread_init() override { MS_CUDA_CHECK(cudaSetDevice(device_), "Streamer"); }

  // Host segments are copied at once; file ranges are read by the readers into staging buffers in
  // chunk_bytes pieces and copied out in order as their reads complete (drain). The copy stream
  // waits once for the slot's release before the first copy into it.
  void start(LoadTask task, LoadIO& io) override {
    io_ = &io;
    auto job = std::make_shared<Job>();
    job->task = std::move(task);
    const auto& segs = *job->task.segs;
    try {
      for (size_t i = 0; i < segs.size(); ++i) {
        const Segment& seg = segs[i];
        if (seg.file == Segment::kFromPool) {
          // Host segments are issued at once, after the staged chunks still in flight (copy stream order).
          drain_to(0, io);
          wait_released(*job);
          MS_CUDA_CHECK(cudaMemcpyAsync(job->task.dst + seg.dst_offset, io.pool_data() + seg.src_offset,
                                        static_cast<size_t>(seg.nbytes), cudaMemcpyHostToDevice, copy_),
                        "Streamer");
          io.count_copied(seg.nbytes);
          continue;
        }
        for (int64_t off = 0; off < seg.nbytes; off += io.chunk_bytes()) {
          const int64_t n = std::min(io.chunk_bytes(), seg.nbytes - off);
          const int b = next_;
          next_ = (next_ + 1) % static_cast<int>(owner_.size());
          // The buffer's previous chunk must have been copied out: complete the pipeline up to it, then
          // wait until its device copy has finished before a reader overwrites the buffer.
          while (owner_[b]) drain_to(inflight_.size() - 1, io);
          MS_CUDA_CHECK(cudaEventSynchronize(staging_[b]), "Streamer");
          auto c = std::make_shared<Chunk>();
          c->job = job;
          c->buf = b;
          c->dst = job->task.dst + seg.dst_offset + off;
          c->nbytes = n;
          owner_[b] = c;
          inflight_.push_back(c);
          uint8_t* buffer = io.staging()[b];
          io.submit([this, c, &io, &seg, off, n, buffer] {
            uint8_t* data = nullptr;
            std::string err = io.read(seg, off, n, nullptr, buffer, &data);
            {
              std::lock_guard<std::mutex> lk(mu_);
              c->data = data;
              c->error = std::move(err);
              c->done = true;
            }
            cv_.notify_all();
          });
        }
      }
    } catch (const std::exception& ex) {
      job->fail(std::string("moestream.Streamer: loading unit ") + std::to_string(job->task.unit) +
                " failed: " + ex.what());
    }
    // Always finalised, so a waiting acquire() sees success or the error.
    auto fin = std::make_shared<Chunk>();
    fin->job = job;
    fin->finalize = true;
    inflight_.push_back(fin);
    if (inflight_.size() == 1) drain_to(0, io);
  }

  bool pending() const override { return !inflight_.empty(); }

  void drain() override {
    if (io_ != nullptr) drain_to(0, *io_);
  }

  void consumer_wait_ready(int slot) override {
    cudaStream_t compute = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    MS_CUDA_CHECK(cudaStreamWaitEvent(compute, ready_[slot], 0), "Streamer");
  }

  void record_released(int slot) override {
    cudaStream_t compute = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    MS_CUDA_CHECK(cudaEventRecord(released_[slot], compute), "Streamer");
  }

  void synchronize() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    MS_CUDA_CHECK(cudaStreamSynchronize(copy_), "Streamer");
  }

 private:
  struct Job {
    LoadTask task;
    bool released_waited = false;  // the copy stream already waits for the slot's release
    std::string error;             // scheduler thread only
    void fail(const std::string& e) {
      if (error.empty()) error = e;
    }
  };
  // A staged chunk waiting for its read, or the end of a job (finalize).
  struct Chunk {
    std::shared_ptr<Job> job;
    bool finalize = false;
    int buf = -1;
    uint8_t* dst = nullptr;
    int64_t nbytes = 0;
    uint8_t* data = nullptr;  // where the read bytes start in the staging buffer
    bool done = false;        // mu_
    std::string error;        // mu_
  };

  void wait_released(Job& j) {
    if (!j.released_waited) {
      MS_CUDA_CHECK(cudaStreamWaitEvent(copy_, released_[j.task.slot], 0), "Streamer");
      j.released_waited = true;
    }
  }

  // Completes chunks in order until at most `keep` remain in flight (scheduler thread).
  void drain_to(size_t keep, LoadIO& io) {
    while (inflight_.size() > keep) {
      std::shared_ptr<Chunk> c = inflight_.front();
      inflight_.pop_front();
      Job& job = *c->job;
      auto device_error = [&](const std::exception& ex) {
        job.fail(std::string("moestream.Streamer: copying unit ") + std::to_string(job.task.unit) +
                 " to the device failed: " + ex.what());
      };
      if (c->finalize) {
        try {
          wait_released(job);
          MS_CUDA_CHECK(cudaEventRecord(ready_[job.task.slot], copy_), "Streamer");
        } catch (const std::exception& ex) {
          device_error(ex);
        }
        job.task.done(job.error);
        continue;
      }
      std::string err;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return c->done; });
        err = c->error;
      }
      if (!err.empty()) {
        job.fail(err);
      } else {
        try {
          wait_released(job);
          MS_CUDA_CHECK(
              cudaMemcpyAsync(c->dst, c->data, static_cast<size_t>(c->nbytes), cudaMemcpyHostToDevice, copy_),
              "Streamer");
          MS_CUDA_CHECK(cudaEventRecord(staging_[c->buf], copy_), "Streamer");
          io.count_copied(c->nbytes);
        } catch (const std::exception& ex) {
          device_error(ex);
        }
      }
      owner_[c->buf].reset();
    }
  }

  int device_;
  int64_t slot_bytes_ = 0;
  cudaStream_t copy_ = nullptr;
  std::vector<cudaEvent_t> ready_, released_, staging_;
  // scheduler thread only
  std::deque<std::shared_ptr<Chunk>> inflight_;
  std::vector<std::shared_ptr<Chunk>> owner_;  // the chunk using each staging buffer
  int next_ = 0;
  LoadIO* io_ = nullptr;
  // reader threads -> scheduler thread: chunk reads done
  std::mutex mu_;
  std::condition_variable cv_;
};

std::unique_ptr<DeviceBackend> make_cuda_backend(int device, const StreamerConfig& cfg) {
  return std::make_unique<CudaBackend>(device, cfg);
}

struct Registrar {
  Registrar() {
    auto& h = cuda_hooks();
    h.host_register = &cuda_host_register;
    h.host_unregister = &cuda_host_unregister;
    h.make_backend = &make_cuda_backend;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace stream
}  // namespace moestream
