// Argument checks of moestream::moe_experts shared by the CPU and CUDA kernels (each checks kind
// and layout itself, then calls this).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace moestream {

struct ExpertsDims {
  int64_t T, H, k, E, I;
};

// x [T, H]; ids [T, k] int32 | int64; weights [T, k] any float dtype; w_gate_up [E, H, 2I] and
// w_down [E, I, H] (transpose_b: [E, 2I, H] and [E, H, I]) in x's dtype; b_gate_up [E, 2I],
// b_down [E, H] optional, any float dtype; everything on x's device. Expert id ranges are left to
// the caller (checking them on a GPU would need a host synchronisation).
inline ExpertsDims check_moe_experts_args(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                                          const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                          const std::optional<at::Tensor>& b_gate_up,
                                          const std::optional<at::Tensor>& b_down, bool transpose_b) {
  constexpr const char* op = "moe_experts";
  check_float(x, op, "x");
  check_dim(x, 2, op, "x");
  check_index(ids, op, "ids");
  check_dim(ids, 2, op, "ids");
  check_float(weights, op, "weights");
  check_dim(weights, 2, op, "weights");
  check_dim(w_gate_up, 3, op, "w_gate_up");
  check_dim(w_down, 3, op, "w_down");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&ids, "ids"}, {&weights, "weights"},
                                {&w_gate_up, "w_gate_up"}, {&w_down, "w_down"}})
    check_same_device(x, *t, op, "x", name);
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  MS_CHECK(ids.size(0) == T, op, "ids must have shape [T, k] with T = ", T, " (x's rows), got shape ",
           shape_str(ids));
  MS_CHECK(weights.sizes() == ids.sizes(), op, "weights must have ids' shape ", shape_str(ids), ", got shape ",
           shape_str(weights));
  MS_CHECK(w_gate_up.scalar_type() == x.scalar_type(), op, "w_gate_up must have x's dtype ", x.scalar_type(),
           ", got ", w_gate_up.scalar_type());
  MS_CHECK(w_down.scalar_type() == x.scalar_type(), op, "w_down must have x's dtype ", x.scalar_type(), ", got ",
           w_down.scalar_type());
  const int64_t E = w_gate_up.size(0);
  const int64_t two_i = transpose_b ? w_gate_up.size(1) : w_gate_up.size(2);
  const int64_t h_in = transpose_b ? w_gate_up.size(2) : w_gate_up.size(1);
  MS_CHECK(h_in == H && two_i % 2 == 0, op, "w_gate_up must have shape ", transpose_b ? "[E, 2I, H]" : "[E, H, 2I]",
           " with H = ", H, " (x's columns) and an even 2I, got shape ", shape_str(w_gate_up));
  const int64_t I = two_i / 2;
  const std::vector<int64_t> down_shape = transpose_b ? std::vector<int64_t>{E, H, I} : std::vector<int64_t>{E, I, H};
  MS_CHECK(w_down.sizes().vec() == down_shape, op, "w_down must have shape ", c10::IntArrayRef(down_shape),
           transpose_b ? " ([E, H, I])" : " ([E, I, H])", ", got shape ", shape_str(w_down));
  if (b_gate_up.has_value()) {
    const at::Tensor& b = *b_gate_up;
    check_float(b, op, "b_gate_up");
    check_same_device(x, b, op, "x", "b_gate_up");
    MS_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == 2 * I, op, "b_gate_up must have shape [E, 2I] = [", E,
             ", ", 2 * I, "], got shape ", shape_str(b));
  }
  if (b_down.has_value()) {
    const at::Tensor& b = *b_down;
    check_float(b, op, "b_down");
    check_same_device(x, b, op, "x", "b_down");
    MS_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == H, op, "b_down must have shape [E, H] = [", E, ", ", H,
             "], got shape ", shape_str(b));
  }
  return {T, H, k, E, I};
}

}  // namespace moestream
