// Argument checks of moestream::grouped_mm and grouped_mm_weight_grad shared by the CPU and CUDA
// kernels. Offsets values are checked by each kernel (on a GPU only on request: host sync).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace moestream {

inline void check_pair_dtype(const at::Tensor& x, const at::Tensor& y, const char* op, const char* nx,
                             const char* ny) {
  MS_CHECK(x.scalar_type() == y.scalar_type(), op, nx, " and ", ny, " must have the same dtype, got ", nx, " ",
           x.scalar_type(), " and ", ny, " ", y.scalar_type());
}

struct GmmDims {
  int64_t M, K, N, E;
};

// a [M, K]; b [E, K, N] ([E, N, K] if transpose_b) in a's dtype; offsets [E]; bias [E, N]
// optional, any float dtype; everything on a's device.
inline GmmDims check_grouped_mm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                     bool transpose_b, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "grouped_mm";
  check_dim(a, 2, op, "a");
  check_float(a, op, "a");
  check_dim(b, 3, op, "b");
  check_pair_dtype(a, b, op, "a", "b");
  check_same_device(a, b, op, "a", "b");
  check_same_device(a, offsets, op, "a", "offsets");
  const int64_t M = a.size(0), K = a.size(1), E = b.size(0);
  const int64_t bK = transpose_b ? b.size(2) : b.size(1);
  const int64_t N = transpose_b ? b.size(1) : b.size(2);
  MS_CHECK(bK == K, op, "inner dimensions differ: a is ", shape_str(a), " and b is ", shape_str(b),
           transpose_b ? " ([E, N, K] with transpose_b)" : " ([E, K, N])", ", so K = ", K, " vs ", bK);
  if (bias.has_value()) {
    check_float(*bias, op, "bias");
    check_same_device(a, *bias, op, "a", "bias");
    MS_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, op, "bias must have shape [", E, ", ", N,
             "] (E, N), got ", shape_str(*bias));
  }
  return {M, K, N, E};
}

// a [M, K], grad_out [M, N] in a's dtype, offsets [E] (1-D), all on a's device.
inline GmmDims check_grouped_mm_weight_grad_args(const at::Tensor& a, const at::Tensor& grad_out,
                                                 const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm_weight_grad";
  check_dim(a, 2, op, "a");
  check_float(a, op, "a");
  check_dim(grad_out, 2, op, "grad_out");
  check_pair_dtype(a, grad_out, op, "a", "grad_out");
  check_same_device(a, grad_out, op, "a", "grad_out");
  check_same_device(a, offsets, op, "a", "offsets");
  const int64_t M = a.size(0), K = a.size(1), N = grad_out.size(1);
  MS_CHECK(grad_out.size(0) == M, op, "grad_out must have a's ", M, " rows, got shape ", shape_str(grad_out));
  check_dim(offsets, 1, op, "offsets");
  return {M, K, N, offsets.size(0)};
}

}  // namespace moestream
