// Argument checks of moestream::gated_activation and gated_activation_backward shared by the CPU
// and CUDA kernels (same messages on both); the kind / layout parsers also serve moe_experts.
#pragma once
#include <ATen/ATen.h>

#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/types.h"

namespace moestream {

inline ActKind parse_act_kind(std::string_view kind, const char* op) {
  static constexpr const char* kNames[] = {"swiglu", "geglu", "gptoss"};  // ActKind order
  return static_cast<ActKind>(parse_choice(kind, kNames, op, "kind"));
}

inline ActLayout parse_act_layout(std::string_view layout, const char* op) {
  static constexpr const char* kNames[] = {"concat", "interleaved"};  // ActLayout order
  return static_cast<ActLayout>(parse_choice(layout, kNames, op, "layout"));
}

struct GatedActArgs {
  ActKind kind;
  ActLayout layout;
  int64_t rows;  // x viewed as [rows, 2 * I]
  int64_t I;
  std::vector<int64_t> out_shape;  // [..., I]
};

// x [..., 2I] any float dtype; kind "swiglu" | "geglu" | "gptoss"; layout "concat" | "interleaved".
inline GatedActArgs check_gated_activation_args(const at::Tensor& x, std::string_view kind, std::string_view layout,
                                                const char* op = "gated_activation") {
  check_float(x, op, "x");
  MS_CHECK(x.dim() >= 1, op, "x must have at least 1 dimension [..., 2I], got a scalar");
  MS_CHECK(x.size(-1) % 2 == 0, op, "x's last dimension must be even ([gate, up] of size 2I), got shape ",
           shape_str(x));
  GatedActArgs a;
  a.kind = parse_act_kind(kind, op);
  a.layout = parse_act_layout(layout, op);
  a.I = x.size(-1) / 2;
  a.rows = a.I > 0 ? x.numel() / (2 * a.I) : 0;
  a.out_shape = x.sizes().vec();
  a.out_shape.back() = a.I;
  return a;
}

// grad [..., I] any float dtype (the kernels convert it to x's), x [..., 2I], on the same device.
inline GatedActArgs check_gated_activation_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                                         std::string_view kind, std::string_view layout) {
  constexpr const char* op = "gated_activation_backward";
  GatedActArgs a = check_gated_activation_args(x, kind, layout, op);
  check_float(grad, op, "grad");
  check_same_device(grad, x, op, "grad", "x");
  MS_CHECK(grad.sizes().vec() == a.out_shape, op, "grad must have x's shape with the last dimension halved ",
           c10::IntArrayRef(a.out_shape), ", got shape ", shape_str(grad), " (x has shape ", shape_str(x), ")");
  return a;
}

}  // namespace moestream
