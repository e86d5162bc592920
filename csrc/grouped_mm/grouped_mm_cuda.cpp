// Torch glue of the grouped-matmul CUDA kernels (grouped_mm_cuda.cu): argument checks, device
// guard, current stream, workspace, and TORCH_LIBRARY_IMPL(moestream, CUDA, m).
//
// Offsets live on the device and are not read by the host (no synchronisation), so their values
// (non-negative, non-decreasing, offsets[-1] <= rows) cannot be validated here: the kernels clamp
// them so malformed offsets give wrong groups but never out-of-bounds accesses. The tuning key
// check_inputs (initially MOESTREAM_CHECK_INPUTS=1) validates them anyway (one device-to-host copy
// and sync per call).
//
// The tuning key gmm_impl = auto | simt | mma | wgmma | gemv (common/tuning.h) forces a kernel
// family where it applies (dtype, alignment, device); elsewhere the generic SIMT kernel runs. auto:
// decode GEMV for a few rows per group, mma.sync tensor cores for aligned bf16/fp16, SIMT
// otherwise; float32 is computed in true float32 (FFMA, never TF32), float64 in float64.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"
#include "common/cuda_error.h"
#include "common/tuning.h"
#include "grouped_mm/grouped_mm_checks.h"
#include "grouped_mm/grouped_mm_cuda.h"

namespace moestream {
namespace {

gmm::Device current_device() {
  int dev = 0;
  MS_CUDA_CHECK(cudaGetDevice(&dev), "grouped_mm");
  gmm::Device d;
  MS_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev), "grouped_mm");
  MS_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev), "grouped_mm");
  MS_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev), "grouped_mm");
  return d;
}

// A 2-D operand as (pointer, leading dimension) with unit stride along columns; copies only when
// the rows are not unit-stride.
at::Tensor rows_unit_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }
int64_t leading_dim(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// The fields every argument struct shares; dtype is the operands'.
void set_group_args(gmm::GroupArgs& p, at::ScalarType dtype, const at::Tensor& offs, const at::Tensor& out,
                    const GmmDims& d) {
  p.dtype = float_kind(dtype);
  p.offsets = offs.const_data_ptr();
  p.offsets_int64 = offs.scalar_type() == at::kLong;
  p.out = out.data_ptr();
  p.M = d.M;
  p.N = d.N;
  p.E = d.E;
}

constexpr int64_t kSizeLimit = int64_t(1) << 30;

// ---- grouped_mm ---------------------------------------------------------------------------------

at::Tensor grouped_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets, bool transpose_b,
                           const c10::optional<at::Tensor>& bias) {
  // a [M, K] rows sorted by group, b [E, K, N] ([E, N, K] if transpose_b), offsets [E] int32|int64
  // cumulative row ends (offsets[-1] <= M; values not checked without the tuning key check_inputs),
  // bias [E, N] (optional) -> out [M, N] in a's dtype; rows past offsets[-1] are zero.
  constexpr const char* op = "grouped_mm";
  const GmmDims d = check_grouped_mm_args(a_in, b_in, offsets, transpose_b, bias);
  check_cuda(a_in, op, "a");
  const int64_t M = d.M, K = d.K, N = d.N, E = d.E;
  MS_CHECK(gmm::forward_shape_supported(M, N, K, E), op, "sizes too large for the CUDA kernels: a ", shape_str(a_in),
           ", b ", shape_str(b_in), " (each of M, N, K and E must be below 2^30)");
  c10::cuda::CUDAGuard guard(a_in.device());
  check_offsets(offsets, E, M, op, "a", tuning().check_inputs);

  auto out = at::empty({M, N}, a_in.options());
  if (M == 0 || N == 0) return out;

  const auto a = rows_unit_stride(a_in);
  const auto b = b_in.contiguous();
  const auto offs = offsets.contiguous();
  at::Tensor bias_acc;
  if (bias.has_value()) {
    bias_acc = bias->to(acc_dtype(a.scalar_type())).contiguous();
    // the tensor-core epilogue reads bias pairs as 8-byte vectors
    if (reinterpret_cast<uintptr_t>(bias_acc.const_data_ptr()) % 16 != 0) bias_acc = bias_acc.clone();
  }
  auto ws = at::empty({gmm::forward_workspace_ints(E)}, a.options().dtype(at::kInt));

  gmm::ForwardArgs p;
  set_group_args(p, a.scalar_type(), offs, out, d);
  p.a = a.const_data_ptr();
  p.lda = leading_dim(a);
  p.b = b.const_data_ptr();
  p.bias = bias_acc.defined() ? bias_acc.const_data_ptr() : nullptr;
  p.ldo = N;
  p.K = K;
  p.transpose_b = transpose_b;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const gmm::Impl impl = tuning().gmm_impl;
  MS_CUDA_CHECK(gmm::grouped_mm_forward(p, impl, current_device(), ws.data_ptr<int>(), stream), op);
  return out;
}

// ---- weight gradient ----------------------------------------------------------------------------

at::Tensor grouped_mm_weight_grad_cuda(const at::Tensor& a_in, const at::Tensor& grad_out_in,
                                       const at::Tensor& offsets, bool transpose_b) {
  // a [M, K], grad_out [M, N] (same dtype), offsets [E] -> grad_b [E, K, N] (a_g^T dy_g), or
  // [E, N, K] (dy_g^T a_g) if transpose_b; groups without rows get zero blocks. Deterministic.
  constexpr const char* op = "grouped_mm_weight_grad";
  const GmmDims d = check_grouped_mm_weight_grad_args(a_in, grad_out_in, offsets);
  check_cuda(a_in, op, "a");
  const int64_t M = d.M, K = d.K, N = d.N, E = d.E;
  MS_CHECK(M < kSizeLimit && K < kSizeLimit && N < kSizeLimit, op, "sizes too large for the CUDA kernels: a ",
           shape_str(a_in), ", grad_out ", shape_str(grad_out_in), " (each must be below 2^30)");
  c10::cuda::CUDAGuard guard(a_in.device());
  check_offsets(offsets, E, M, op, "a", tuning().check_inputs);

  auto out = transpose_b ? at::empty({E, N, K}, a_in.options()) : at::empty({E, K, N}, a_in.options());
  if (E == 0 || K == 0 || N == 0) return out;

  const auto a = rows_unit_stride(a_in);
  const auto dy = rows_unit_stride(grad_out_in);
  const auto offs = offsets.contiguous();
  gmm::WeightGradArgs p;
  set_group_args(p, a.scalar_type(), offs, out, d);
  p.a = a.const_data_ptr();
  p.lda = leading_dim(a);
  p.dy = dy.const_data_ptr();
  p.ldd = leading_dim(dy);
  p.K = K;
  p.transpose_b = transpose_b;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MS_CUDA_CHECK(gmm::grouped_mm_weight_grad(p, tuning().gmm_impl, current_device(), stream), op);
  return out;
}

// ---- bias gradient ------------------------------------------------------------------------------

at::Tensor grouped_bias_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& offsets) {
  // grad_out [M, N], offsets [E] -> grad_bias [E, N] in grad_out's dtype: per-group row sums,
  // float32 (float64) accumulation in a fixed order (deterministic).
  constexpr const char* op = "grouped_bias_grad";
  const GmmDims d = check_grouped_bias_grad_args(grad_out_in, offsets);
  check_cuda(grad_out_in, op, "grad_out");
  const int64_t M = d.M, N = d.N, E = d.E;
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  check_offsets(offsets, E, M, op, "grad_out", tuning().check_inputs);

  auto out = at::empty({E, N}, grad_out_in.options());
  if (E == 0 || N == 0) return out;
  const auto dy = rows_unit_stride(grad_out_in);
  const auto offs = offsets.contiguous();
  gmm::BiasGradArgs p;
  set_group_args(p, dy.scalar_type(), offs, out, d);
  p.dy = dy.const_data_ptr();
  p.ldd = leading_dim(dy);
  MS_CUDA_CHECK(gmm::grouped_bias_grad(p, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_cuda);
  m.impl("grouped_bias_grad", &grouped_bias_grad_cuda);
}

}  // namespace moestream
