// CUDA error checks, for the kernel launchers (*.cu) and the torch-side CUDA code (*_cuda.cpp):
//
//   MS_CUDA_TRY(expr)          inside a launcher returning cudaError_t: returns expr's error
//   MS_CUDA_LAUNCH_CHECK()     after a kernel launch: returns the launch's configuration error
//   MS_CUDA_CHECK(expr, where) host C++ only: throws a c10::Error (a Python RuntimeError)
//                              "moestream.<where>: <expr> failed: CUDA error <name>: <description>"
//
// Kernel files include no torch headers (they compile with plain nvcc), so the throwing half is
// compiled only outside nvcc; it needs nothing from torch but c10's exception.
#pragma once
#include <cuda_runtime_api.h>

#define MS_CUDA_TRY(expr)                       \
  do {                                          \
    const cudaError_t ms_err_ = (expr);         \
    if (ms_err_ != cudaSuccess) return ms_err_; \
  } while (0)

// Configuration errors (bad grid, too much shared memory) surface right after the launch.
#define MS_CUDA_LAUNCH_CHECK() MS_CUDA_TRY(cudaGetLastError())

#if !defined(__CUDACC__)
#include <c10/util/Exception.h>

namespace moestream {

inline void cuda_check(cudaError_t err, const char* where, const char* expr) {
  TORCH_CHECK(err == cudaSuccess, "moestream.", where, ": ", expr, " failed: CUDA error ", cudaGetErrorName(err),
              ": ", cudaGetErrorString(err));
}

}  // namespace moestream

#define MS_CUDA_CHECK(expr, where) ::moestream::cuda_check((expr), (where), #expr)
#endif
