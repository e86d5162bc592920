// Torch-side helpers for the CUDA glue files (*_cuda.cpp): turn a cudaError_t returned by a kernel
// launcher into a Python RuntimeError naming the op, map dtypes onto the launchers' FloatKind, and
// read the opt-in input validation switch.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "common/checks.h"
#include "common/cuda_types.h"

namespace moestream {

// Throws "moestream.<kernel>: CUDA error <name>: <description>" unless err == cudaSuccess.
inline void cuda_check(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "moestream.", kernel, ": CUDA error ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

#define MS_CUDA_CHECK(expr, kernel) ::moestream::cuda_check((expr), (kernel))

inline FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kDouble:
      return FloatKind::kFloat64;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    case at::kHalf:
      return FloatKind::kFloat16;
    default:
      TORCH_CHECK(false, "moestream: unsupported floating dtype ", t);
  }
}

// Accumulation dtype of the CUDA kernels: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// MOESTREAM_CHECK_INPUTS=1 turns on value checks (ids / perm in range) that need a device->host
// copy, i.e. a synchronisation. Off by default: CUDA ops never synchronise unless asked to.
inline bool check_inputs_enabled() {
  const char* v = std::getenv("MOESTREAM_CHECK_INPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// All tensors of a CUDA op on the same CUDA device.
inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  MS_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got device ", t.device());
  MS_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ", t.device());
}

}  // namespace moestream
