// Host launchers of the gated activation CUDA kernels (activation_cuda.cu). x is viewed as
// [rows, 2 * inter] contiguous; the output as [rows, inter]. Each launcher returns the first CUDA
// error it meets, enqueues its work on `stream` and never synchronises.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/types.h"

namespace moestream {

struct GatedActParams {
  const void* x = nullptr;  // [rows, 2 * inter], dtype
  FloatKind dtype = FloatKind::kFloat32;
  int64_t rows = 0;
  int64_t inter = 0;
  ActKind kind = ActKind::kSwiglu;
  bool interleaved = false;  // gate/up alternate (g0, u0, g1, u1, ...) instead of [gate | up]
  double alpha = 1.702;      // gptoss only
  double limit = 7.0;        // gptoss only
  void* out = nullptr;       // [rows, inter], dtype
};
cudaError_t gated_activation_launch(const GatedActParams& p, cudaStream_t stream);

struct GatedActBackwardParams {
  const void* grad = nullptr;  // [rows, inter], dtype
  const void* x = nullptr;     // [rows, 2 * inter], dtype
  FloatKind dtype = FloatKind::kFloat32;
  int64_t rows = 0;
  int64_t inter = 0;
  ActKind kind = ActKind::kSwiglu;
  bool interleaved = false;
  double alpha = 1.702;
  double limit = 7.0;
  void* grad_x = nullptr;  // [rows, 2 * inter], dtype
};
cudaError_t gated_activation_backward_launch(const GatedActBackwardParams& p, cudaStream_t stream);

}  // namespace moestream
