// CUDA side of the streaming engine (compiled only with MOESTREAM_WITH_CUDA): page-locking of the
// host pool, and the device backend of the streamer: a dedicated non-blocking copy stream, one
// "ready" and one "released" event per slot, one event per staging buffer.
//
//   copy stream:    [wait released[s]] -> H2D copies into slot s -> record ready[s]
//   compute stream: [wait ready[s]] -> kernels of the layer in slot s -> record released[s]
//
// Neither stream ever blocks the host; the host only waits on a staging event before a reader
// thread overwrites a staging buffer whose copy may still be running.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "stream/engine.h"

namespace moestream {
namespace stream {
namespace {

#define MS_CUDA_OK(expr)                                                                              \
  do {                                                                                                \
    cudaError_t _err = (expr);                                                                        \
    TORCH_CHECK(_err == cudaSuccess, "moestream.Streamer: ", #expr, " failed: ", cudaGetErrorString(_err)); \
  } while (0)

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
  CudaBackend(int device, int num_slots, int num_staging) : device_(device) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    MS_CUDA_OK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
    auto make = [](std::vector<cudaEvent_t>& v, int n) {
      v.resize(n);
      for (auto& e : v) MS_CUDA_OK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    };
    make(ready_, num_slots);
    make(released_, num_slots);
    make(staging_, num_staging);
  }

  ~CudaBackend() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    (void)cudaStreamSynchronize(copy_);
    for (auto* v : {&ready_, &released_, &staging_})
      for (auto e : *v) (void)cudaEventDestroy(e);
    (void)cudaStreamDestroy(copy_);
  }

  bool is_cuda() const override { return true; }

  void thread_init() override { MS_CUDA_OK(cudaSetDevice(device_)); }

  void producer_wait_released(int slot) override { MS_CUDA_OK(cudaStreamWaitEvent(copy_, released_[slot], 0)); }

  void copy_h2d(void* dst, const void* src, int64_t nbytes) override {
    MS_CUDA_OK(cudaMemcpyAsync(dst, src, static_cast<size_t>(nbytes), cudaMemcpyHostToDevice, copy_));
  }

  void record_ready(int slot) override { MS_CUDA_OK(cudaEventRecord(ready_[slot], copy_)); }

  void record_staging(int buf) override { MS_CUDA_OK(cudaEventRecord(staging_[buf], copy_)); }

  void wait_staging(int buf) override { MS_CUDA_OK(cudaEventSynchronize(staging_[buf])); }

  void consumer_wait_ready(int slot) override {
    cudaStream_t compute = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    MS_CUDA_OK(cudaStreamWaitEvent(compute, ready_[slot], 0));
  }

  void record_released(int slot) override {
    cudaStream_t compute = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    MS_CUDA_OK(cudaEventRecord(released_[slot], compute));
  }

  void synchronize() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    MS_CUDA_OK(cudaStreamSynchronize(copy_));
  }

 private:
  int device_;
  cudaStream_t copy_ = nullptr;
  std::vector<cudaEvent_t> ready_, released_, staging_;
};

std::unique_ptr<DeviceBackend> make_cuda_backend(int device, int num_slots, int num_staging) {
  return std::make_unique<CudaBackend>(device, num_slots, num_staging);
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
