// Host interface of the grouped-matmul CUDA kernels (grouped_mm_cuda.cu). Plain C++: raw pointers,
// sizes, leading dimensions and a stream; no torch types, so the kernels compile with plain nvcc.
//
// Layouts (row-major, unit stride along the last dimension):
//   a       [M, K] with leading dimension lda (>= K)
//   b       [E, K, N], or [E, N, K] when transpose_b; dense
//   offsets [E] int32 or int64, cumulative row ends of the groups (read on the device only)
//   bias    [E, N] float32 (float64 when dtype is float64), dense, or nullptr
//   out     [M, N] with leading dimension ldo
// Offsets are never read by the host. They are clamped on the device (running maximum, then into
// [0, M]), so malformed offsets give wrong groups but never out-of-bounds accesses.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/tuning.h"
#include "common/types.h"

namespace moestream {
namespace gmm {

// Kernel families (the tuning key gmm_impl, common/tuning.h). kAuto picks by dtype, alignment and
// shape among gemv (a few rows per group), mma (bf16/fp16, aligned, sm_80+) and simt (everything
// else); it does not pick kWgmma (sm_90a, forward only), which runs only when requested. A
// requested family that does not apply to the call (dtype, alignment, device, binary) falls back:
// kWgmma -> kMma -> kSimt, kGemv -> kSimt, kMma -> kSimt. The weight gradient has mma and simt
// kernels only.
using Impl = GmmImpl;

struct Device {
  int sm_count = 1;   // multiprocessors of the current device
  int cc_major = 0;   // compute capability
  int cc_minor = 0;
};

// What every entry point takes: the dtype of the operands and of out, the offsets and the sizes.
struct GroupArgs {
  FloatKind dtype = FloatKind::kFloat32;
  const void* offsets = nullptr;
  bool offsets_int64 = true;
  void* out = nullptr;
  int64_t M = 0, N = 0, E = 0;
};

struct ForwardArgs : GroupArgs {
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  const void* bias = nullptr;
  int64_t ldo = 0;
  int64_t K = 0;
  bool transpose_b = false;
};

// int32 elements of device workspace grouped_mm_forward needs (the tile schedule).
int64_t forward_workspace_ints(int64_t E);

// Whether the forward's int32 tile and row arithmetic covers these sizes (each below 2^30).
bool forward_shape_supported(int64_t M, int64_t N, int64_t K, int64_t E);

// The kernel family grouped_mm_forward will run for these arguments.
Impl forward_impl(const ForwardArgs& p, Impl requested, const Device& dev);

// out = grouped a @ b (+ bias), rows past offsets[-1] zero. workspace: forward_workspace_ints(E)
// int32 on the device, no initialisation needed. Asynchronous on `stream`; returns the first CUDA
// error of its launches.
cudaError_t grouped_mm_forward(const ForwardArgs& p, Impl requested, const Device& dev, int* workspace,
                               cudaStream_t stream);

// out: dense [E, K, N], or [E, N, K] when transpose_b.
struct WeightGradArgs : GroupArgs {
  const void* a = nullptr;  // [M, K], leading dimension lda
  int64_t lda = 0;
  const void* dy = nullptr;  // [M, N], leading dimension ldd
  int64_t ldd = 0;
  int64_t K = 0;
  bool transpose_b = false;
};

Impl weight_grad_impl(const WeightGradArgs& p, Impl requested, const Device& dev);

// out[g] = a_g^T dy_g ([K, N]) or dy_g^T a_g ([N, K]) over the rows of group g; zero for empty
// groups. One CTA per output tile, rows reduced in order: deterministic.
cudaError_t grouped_mm_weight_grad(const WeightGradArgs& p, Impl requested, const Device& dev,
                                   cudaStream_t stream);

// out: dense [E, N] in dy's dtype.
struct BiasGradArgs : GroupArgs {
  const void* dy = nullptr;  // [M, N], leading dimension ldd
  int64_t ldd = 0;
};

// out[g] = sum of dy's rows of group g, float32 (float64) accumulation in a fixed order.
cudaError_t grouped_bias_grad(const BiasGradArgs& p, cudaStream_t stream);

}  // namespace gmm
}  // namespace moestream
