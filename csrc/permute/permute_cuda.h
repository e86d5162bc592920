// Host launchers of the permute / unpermute CUDA kernels (permute_cuda.cu). Raw pointers to
// contiguous device memory; "acc" is float64 for float64 data, else float32. Each launcher returns
// the first CUDA error it meets, enqueues its work on `stream` and never synchronises.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/types.h"

namespace moestream {

struct PermuteParams {
  const void* x = nullptr;  // [tokens, hidden], elem_size bytes per element
  int64_t tokens = 0;
  int64_t hidden = 0;
  int elem_size = 0;
  const void* ids = nullptr;  // [tokens, k], int32 or int64
  bool ids_int64 = true;
  int64_t k = 0;
  int64_t num_experts = 0;    // 1 .. 2^31 - 2
  void* x_sorted = nullptr;   // out [tokens * k, hidden]
  int64_t* perm = nullptr;    // out [tokens, k]
  int64_t* offsets = nullptr; // out [num_experts]
  void* workspace = nullptr;  // permute_workspace_bytes() bytes
  size_t workspace_bytes = 0;
};

// Scratch bytes for n = tokens * k entries (n < 2^31). Host-only computation, no launch.
cudaError_t permute_workspace_bytes(int64_t n, int64_t num_experts, size_t* bytes);
cudaError_t permute_launch(const PermuteParams& p, cudaStream_t stream);

struct UnpermuteParams {
  const void* y_sorted = nullptr;  // [rows, hidden], dtype
  FloatKind dtype = FloatKind::kFloat32;
  int64_t rows = 0;
  int64_t hidden = 0;
  const int64_t* perm = nullptr;  // [tokens, k]; entries outside [0, rows) contribute nothing
  int64_t tokens = 0;
  int64_t k = 0;
  const void* weights = nullptr;  // [tokens, k] acc, or nullptr
  void* out = nullptr;            // [tokens, hidden], dtype
};
cudaError_t unpermute_launch(const UnpermuteParams& p, cudaStream_t stream);

struct UnpermuteBackwardParams {
  const void* grad_y = nullptr;    // [tokens, hidden], dtype
  const void* y_sorted = nullptr;  // [rows, hidden], dtype (read only when grad_weights is set)
  FloatKind dtype = FloatKind::kFloat32;
  int64_t rows = 0;
  int64_t hidden = 0;
  const int64_t* perm = nullptr;  // [tokens, k], tokens * k < 2^31
  int64_t tokens = 0;
  int64_t k = 0;
  const void* weights = nullptr;     // [tokens, k] acc, or nullptr
  void* grad_y_sorted = nullptr;     // out [rows, hidden], dtype
  void* grad_weights = nullptr;      // out [tokens, k] acc, or nullptr when not needed
  int32_t* inverse = nullptr;        // scratch [rows]
};
cudaError_t unpermute_backward_launch(const UnpermuteBackwardParams& p, cudaStream_t stream);

}  // namespace moestream
