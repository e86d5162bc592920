// CUDA implementation of the whole expert path (moestream::moe_experts): the moestream ops composed
// through the dispatcher, so this file depends on no other file's C++ symbols:
//
//   permute -> grouped_mm (gate/up, + b_gate_up) -> gated_activation -> grouped_mm (down, + b_down)
//   -> weighted unpermute.
//
// Every step runs on the current stream without host synchronisation. Expert ids are not range
// checked here (that would need a sync); the permute kernel handles them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace moestream {
namespace {

constexpr const char* kOp = "moe_experts";

using PermuteFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t);
using GroupedMmFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                               const std::optional<at::Tensor>&);
using GatedActivationFn = at::Tensor(const at::Tensor&, c10::string_view, c10::string_view, double, double);
using UnpermuteFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

// Typed handles, looked up once (the schemas are registered when the library loads).
struct Ops {
  c10::TypedOperatorHandle<PermuteFn> permute;
  c10::TypedOperatorHandle<GroupedMmFn> grouped_mm;
  c10::TypedOperatorHandle<GatedActivationFn> gated_activation;
  c10::TypedOperatorHandle<UnpermuteFn> unpermute;
};

const Ops& ops() {
  static const Ops o{
      c10::Dispatcher::singleton().findSchemaOrThrow("moestream::permute", "").typed<PermuteFn>(),
      c10::Dispatcher::singleton().findSchemaOrThrow("moestream::grouped_mm", "").typed<GroupedMmFn>(),
      c10::Dispatcher::singleton().findSchemaOrThrow("moestream::gated_activation", "").typed<GatedActivationFn>(),
      c10::Dispatcher::singleton().findSchemaOrThrow("moestream::unpermute", "").typed<UnpermuteFn>(),
  };
  return o;
}

// x [T, H]; ids [T, k] int32 | int64 in [0, E) (not checked: no host sync); weights [T, k] any float
// dtype; w_gate_up [E, H, 2I] and w_down [E, I, H] (transpose_b: [E, 2I, H] and [E, H, I]) in x's
// dtype; b_gate_up [E, 2I], b_down [E, H] optional, any float dtype -> out [T, H] in x's dtype.
at::Tensor moe_experts_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                            const at::Tensor& w_gate_up, const at::Tensor& w_down,
                            const std::optional<at::Tensor>& b_gate_up, const std::optional<at::Tensor>& b_down,
                            c10::string_view kind, c10::string_view layout, bool transpose_b, double alpha,
                            double limit) {
  check_float(x, kOp, "x");
  check_dim(x, 2, kOp, "x");
  check_index(ids, kOp, "ids");
  check_dim(ids, 2, kOp, "ids");
  check_float(weights, kOp, "weights");
  check_dim(weights, 2, kOp, "weights");
  check_dim(w_gate_up, 3, kOp, "w_gate_up");
  check_dim(w_down, 3, kOp, "w_down");
  const std::string kind_s(kind), layout_s(layout);
  MS_CHECK(kind_s == "swiglu" || kind_s == "geglu" || kind_s == "gptoss", kOp,
           "kind must be one of swiglu, geglu, gptoss, got '", kind_s, "'");
  MS_CHECK(layout_s == "concat" || layout_s == "interleaved", kOp, "layout must be one of concat, interleaved, got '",
           layout_s, "'");
  MS_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got device ", x.device());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&ids, "ids"}, {&weights, "weights"},
                                {&w_gate_up, "w_gate_up"}, {&w_down, "w_down"}})
    check_same_device(x, *t, kOp, "x", name);
  const int64_t T = x.size(0), H = x.size(1);
  MS_CHECK(ids.size(0) == T, kOp, "ids must have shape [T, k] with T = ", T, " (x's rows), got shape ",
           shape_str(ids));
  MS_CHECK(weights.sizes() == ids.sizes(), kOp, "weights must have ids' shape ", shape_str(ids), ", got shape ",
           shape_str(weights));
  MS_CHECK(w_gate_up.scalar_type() == x.scalar_type(), kOp, "w_gate_up must have x's dtype ", x.scalar_type(),
           ", got ", w_gate_up.scalar_type());
  MS_CHECK(w_down.scalar_type() == x.scalar_type(), kOp, "w_down must have x's dtype ", x.scalar_type(), ", got ",
           w_down.scalar_type());
  const int64_t E = w_gate_up.size(0);
  const int64_t two_i = transpose_b ? w_gate_up.size(1) : w_gate_up.size(2);
  const int64_t h_in = transpose_b ? w_gate_up.size(2) : w_gate_up.size(1);
  MS_CHECK(h_in == H && two_i % 2 == 0, kOp, "w_gate_up must have shape ", transpose_b ? "[E, 2I, H]" : "[E, H, 2I]",
           " with H = ", H, " (x's columns) and an even 2I, got shape ", shape_str(w_gate_up));
  const int64_t I = two_i / 2;
  const std::vector<int64_t> down_shape = transpose_b ? std::vector<int64_t>{E, H, I} : std::vector<int64_t>{E, I, H};
  MS_CHECK(w_down.sizes().vec() == down_shape, kOp, "w_down must have shape ", c10::IntArrayRef(down_shape),
           transpose_b ? " ([E, H, I])" : " ([E, I, H])", ", got shape ", shape_str(w_down));
  if (b_gate_up.has_value()) {
    const at::Tensor& b = *b_gate_up;
    check_float(b, kOp, "b_gate_up");
    check_same_device(x, b, kOp, "x", "b_gate_up");
    MS_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == 2 * I, kOp, "b_gate_up must have shape [E, 2I] = [", E,
             ", ", 2 * I, "], got shape ", shape_str(b));
  }
  if (b_down.has_value()) {
    const at::Tensor& b = *b_down;
    check_float(b, kOp, "b_down");
    check_same_device(x, b, kOp, "x", "b_down");
    MS_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == H, kOp, "b_down must have shape [E, H] = [", E, ", ", H,
             "], got shape ", shape_str(b));
  }
  c10::cuda::CUDAGuard guard(x.device());
  if (ids.size(1) == 0 || T == 0) return at::zeros({T, H}, x.options());

  const Ops& o = ops();
  auto [x_sorted, perm, offsets] = o.permute.call(x, ids, E);
  const at::Tensor h = o.grouped_mm.call(x_sorted, w_gate_up, offsets, transpose_b, b_gate_up);
  const at::Tensor act = o.gated_activation.call(h, kind, layout, alpha, limit);
  const at::Tensor y = o.grouped_mm.call(act, w_down, offsets, transpose_b, b_down);
  return o.unpermute.call(y, perm, weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) { m.impl("moe_experts", &moe_experts_cuda); }

}  // namespace moestream
