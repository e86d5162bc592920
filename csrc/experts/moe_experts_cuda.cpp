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
#include "experts/moe_experts_checks.h"

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
  const std::string kind_s(kind), layout_s(layout);
  MS_CHECK(kind_s == "swiglu" || kind_s == "geglu" || kind_s == "gptoss", kOp,
           "kind must be one of swiglu, geglu, gptoss, got '", kind_s, "'");
  MS_CHECK(layout_s == "concat" || layout_s == "interleaved", kOp, "layout must be one of concat, interleaved, got '",
           layout_s, "'");
  MS_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got device ", x.device());
  const ExpertsDims d =
      check_moe_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, transpose_b);
  const int64_t T = d.T, H = d.H, k = d.k, E = d.E;
  c10::cuda::CUDAGuard guard(x.device());
  if (k == 0 || T == 0) return at::zeros({T, H}, x.options());

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
