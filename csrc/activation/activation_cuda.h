// Host launchers of the gated activation CUDA kernels (activation_cuda.cu). x is viewed as
// [rows, 2 * inter] contiguous; the output as [rows, inter]. Each launcher returns the first CUDA
// error it meets, enqueues its work on `stream` and never synchronises.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/types.h"

namespace moestream {

// x viewed as [rows, 2 * inter] and the activation to apply to it.
struct GatedActParams {
  const void* x = nullptr;  // [rows, 2 * inter], dtype
  FloatKind dtype = FloatKind::kFloat32;
  int64_t rows = 0;
  int64_t inter = 0;
  ActKind kind = ActKind::kSwiglu;
  bool interleaved = false;  // gate/up alternate (g0, u0, g1, u1, ...) instead of [gate | up]
  double alpha = 1.702;      // gptoss only
  double limit = 7.0;        // gptoss only
};
// out: [rows, inter], dtype.
cudaError_t gated_activation_launch(const GatedActParams& p, void* out, cudaStream_t stream);
// grad: [rows, inter], grad_x: out [rows, 2 * inter], both dtype.
cudaError_t gated_activation_backward_launch(const GatedActParams& p, const void* grad, void* grad_x,
                                             cudaStream_t stream);

}  // namespace moestream
