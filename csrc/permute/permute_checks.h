// Argument checks of moestream::permute, unpermute and unpermute_backward shared by the CPU and
// CUDA kernels (same messages on both). Index values (ids in [0, num_experts), perm in [0, N)) are
// checked always on the CPU and, on CUDA, with the tuning key check_inputs (on a host copy: a
// synchronisation).
#pragma once
#include <ATen/ATen.h>

#include <climits>
#include <optional>

#include "common/checks.h"

namespace moestream {

struct PermuteDims {
  int64_t T, H, k;
};

// x [T, H] float, ids [T, k] int32 | int64 on x's device, 1 <= num_experts < 2^31 - 1.
inline PermuteDims check_permute_args(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts) {
  constexpr const char* op = "permute";
  check_dim(x, 2, op, "x");
  check_float(x, op, "x");
  check_dim(ids, 2, op, "ids");
  check_index(ids, op, "ids");
  check_same_device(x, ids, op, "x", "ids");
  MS_CHECK(ids.size(0) == x.size(0), op, "ids must have one row per token of x (", x.size(0), "), got shape ",
           shape_str(ids));
  MS_CHECK(num_experts >= 1 && num_experts < INT_MAX, op, "num_experts must be >= 1 and < 2^31 - 1, got ",
           num_experts);
  return {x.size(0), x.size(1), ids.size(1)};
}

// The error for ids' flat entry `pos` holding `value`, outside [0, num_experts).
inline void fail_expert_id(int64_t num_experts, int64_t value, int64_t pos) {
  MS_CHECK(false, "permute", "ids must lie in [0, num_experts) = [0, ", num_experts, "), got ", value,
           " at flat position ", pos);
}

// Every entry of ids (a contiguous host tensor) in [0, num_experts); names the first that is not.
inline void check_expert_ids_range(const at::Tensor& ids, int64_t num_experts) {
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "check_expert_ids_range", [&] {
    const index_t* p = ids.const_data_ptr<index_t>();
    for (int64_t i = 0, n = ids.numel(); i < n; ++i) {
      const int64_t e = static_cast<int64_t>(p[i]);
      if (e < 0 || e >= num_experts) fail_expert_id(num_experts, e, i);
    }
  });
}

// Every entry of perm (a contiguous int64 host tensor) in [0, N), N = y_sorted's rows.
inline void check_perm_range(const at::Tensor& perm, int64_t N, const char* op) {
  const int64_t* p = perm.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = perm.numel(); i < n; ++i) {
    MS_CHECK(p[i] >= 0 && p[i] < N, op, "perm must lie in [0, N) = [0, ", N,
             ") where N is y_sorted's row count, got ", p[i], " at flat position ", i);
  }
}

struct UnpermuteDims {
  int64_t N, H, T, k;
};

// y_sorted [N, H] float, perm [T, k] int64 (int32 accepted), weights [T, k] any float dtype
// (optional), all on y_sorted's device.
inline UnpermuteDims check_unpermute_args(const at::Tensor& y_sorted, const at::Tensor& perm,
                                          const std::optional<at::Tensor>& weights, const char* op = "unpermute") {
  check_dim(y_sorted, 2, op, "y_sorted");
  check_float(y_sorted, op, "y_sorted");
  check_dim(perm, 2, op, "perm");
  check_index(perm, op, "perm");
  check_same_device(perm, y_sorted, op, "perm", "y_sorted");
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    check_float(w, op, "weights");
    check_same_device(w, y_sorted, op, "weights", "y_sorted");
    MS_CHECK(w.dim() == 2 && w.size(0) == perm.size(0) && w.size(1) == perm.size(1), op,
             "weights must have perm's shape ", shape_str(perm), ", got ", shape_str(w));
  }
  return {y_sorted.size(0), y_sorted.size(1), perm.size(0), perm.size(1)};
}

// grad_y [T, H] in y_sorted's dtype, and unpermute's arguments.
inline UnpermuteDims check_unpermute_backward_args(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                   const at::Tensor& perm, const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "unpermute_backward";
  check_dim(grad_y, 2, op, "grad_y");
  check_same_device(grad_y, y_sorted, op, "grad_y", "y_sorted");
  const UnpermuteDims d = check_unpermute_args(y_sorted, perm, weights, op);
  MS_CHECK(grad_y.scalar_type() == y_sorted.scalar_type(), op, "grad_y must have y_sorted's dtype ",
           y_sorted.scalar_type(), ", got ", grad_y.scalar_type());
  MS_CHECK(grad_y.size(0) == d.T && grad_y.size(1) == d.H, op, "grad_y must have shape [", d.T, ", ", d.H,
           "] (perm's rows, y_sorted's columns), got ", shape_str(grad_y));
  return d;
}

}  // namespace moestream
