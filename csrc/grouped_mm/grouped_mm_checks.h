// Argument checks of moestream::grouped_mm, grouped_mm_weight_grad and grouped_bias_grad shared by
// the CPU and CUDA kernels (same messages on both). Offsets values are read by check_offsets:
// always on the CPU, on CUDA with the tuning key check_inputs (host copy: a synchronisation).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

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

// a [M, K] float; t (b or grad_out) with t_dim dimensions in a's dtype; t and offsets on a's device.
inline void check_a_and(const at::Tensor& a, const at::Tensor& t, int64_t t_dim, const char* t_name,
                        const at::Tensor& offsets, const char* op) {
  check_dim(a, 2, op, "a");
  check_float(a, op, "a");
  check_dim(t, t_dim, op, t_name);
  check_pair_dtype(a, t, op, "a", t_name);
  check_same_device(a, t, op, "a", t_name);
  check_same_device(a, offsets, op, "a", "offsets");
}

// a [M, K]; b [E, K, N] ([E, N, K] if transpose_b) in a's dtype; offsets [E]; bias [E, N]
// optional, any float dtype; everything on a's device.
inline GmmDims check_grouped_mm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                     bool transpose_b, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "grouped_mm";
  check_a_and(a, b, 3, "b", offsets, op);
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
  check_a_and(a, grad_out, 2, "grad_out", offsets, op);
  const int64_t M = a.size(0), K = a.size(1), N = grad_out.size(1);
  MS_CHECK(grad_out.size(0) == M, op, "grad_out must have a's ", M, " rows, got shape ", shape_str(grad_out));
  check_dim(offsets, 1, op, "offsets");
  return {M, K, N, offsets.size(0)};
}

// grad_out [M, N] float, offsets [E] (1-D) on its device (K is 0).
inline GmmDims check_grouped_bias_grad_args(const at::Tensor& grad_out, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_bias_grad";
  check_dim(grad_out, 2, op, "grad_out");
  check_float(grad_out, op, "grad_out");
  check_same_device(grad_out, offsets, op, "grad_out", "offsets");
  check_dim(offsets, 1, op, "offsets");
  return {grad_out.size(0), 0, grad_out.size(1), offsets.size(0)};
}

// offsets [E] int32 | int64, one entry per group. With read_values, their values too: non-negative,
// non-decreasing cumulative row ends with offsets[-1] <= M, the rows of `rows_of`; returns them
// (nothing without read_values).
inline std::vector<int64_t> check_offsets(const at::Tensor& offsets, int64_t E, int64_t M, const char* op,
                                          const char* rows_of, bool read_values) {
  check_dim(offsets, 1, op, "offsets");
  check_index(offsets, op, "offsets");
  MS_CHECK(offsets.size(0) == E, op, "offsets must have one entry per group (", E, "), got shape ",
           shape_str(offsets));
  if (!read_values) return {};
  const at::Tensor o = offsets.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> ends(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + E);
  int64_t prev = 0;
  for (int64_t g = 0; g < E; ++g) {
    MS_CHECK(ends[g] >= prev, op,
             "offsets do not add up: they must be non-negative, non-decreasing cumulative row ends, got offsets[", g,
             "] = ", ends[g],
             (g ? " after offsets[" + std::to_string(g - 1) + "] = " + std::to_string(prev) : std::string()));
    prev = ends[g];
  }
  MS_CHECK(E == 0 || ends[E - 1] <= M, op, "offsets do not add up: offsets[-1] = ", E ? ends[E - 1] : 0,
           " exceeds the ", M, " rows of ", rows_of);
  return ends;
}

}  // namespace moestream
