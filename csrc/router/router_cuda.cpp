// Torch glue for the router CUDA kernels (router_cuda.cu): argument checks, dtype conversion of the
// small side inputs, output allocation on the current stream, registration for the CUDA key.
// Nothing here synchronises with the host, unless the tuning key check_inputs asks for the expert
// ids to be range checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_error.h"
#include "common/tuning.h"
#include "router/router_checks.h"
#include "router/router_cuda.h"

namespace moestream {
namespace {

// ids [T, k] (checked by router_checks.h) -> contiguous int64; their values are checked to lie in
// [0, E) only with the tuning key check_inputs (a host copy: synchronises).
at::Tensor ids_as_long(const at::Tensor& ids, int64_t E, const char* op) {
  at::Tensor ids64 = ids.to(at::kLong).contiguous();
  if (tuning().check_inputs) check_router_ids_range(ids64.cpu(), E, op);
  return ids64;
}

// The checked inputs of router_aux_loss and its backward, converted for the kernels.
struct AuxLossInputs {
  RouterDims d;
  at::Tensor logits;  // contiguous
  at::Tensor ids;     // contiguous int64
  at::Tensor mask;    // contiguous, accumulation dtype, or undefined
};

AuxLossInputs aux_loss_inputs(const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                              const char* op) {
  AuxLossInputs in;
  in.d = check_router_aux_loss_args(logits, ids, mask, op);
  check_cuda(logits, op, "logits");
  in.logits = logits.contiguous();
  in.ids = ids_as_long(ids, in.d.E, op);
  if (mask.has_value()) in.mask = mask->to(acc_dtype(logits.scalar_type())).contiguous();
  return in;
}

// grad of a scalar loss -> contiguous 1-element tensor in the accumulation dtype
at::Tensor scalar_grad(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  check_router_scalar_grad(grad, logits, op);
  return grad.to(acc_dtype(logits.scalar_type())).contiguous();
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// logits [T, E] float; k in [1, E]; score "softmax" | "sigmoid"; bias [E] optional;
// num_groups divides E, topk_groups in [1, num_groups] (router_checks.h)
// -> weights [T, k] float32 (float64 for float64 logits), ids [T, k] int64.
std::tuple<at::Tensor, at::Tensor> router_topk_cuda(const at::Tensor& logits, int64_t k, c10::string_view score,
                                                    bool topk_first, const std::optional<at::Tensor>& bias,
                                                    int64_t num_groups, int64_t topk_groups, bool normalize,
                                                    double scale) {
  const char* op = "router_topk";
  const RouterDims d = check_router_topk_args(logits, k, score, bias, num_groups, topk_groups);
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = d.T, E = d.E;
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();

  const at::Tensor lg = logits.contiguous();
  auto weights = at::empty({T, k}, logits.options().dtype(acc));
  auto ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  const int64_t ws_elems = router_topk_group_workspace_elems(T, E, num_groups);
  at::Tensor ws = ws_elems > 0 ? at::empty({ws_elems}, logits.options().dtype(acc)) : at::Tensor();

  RouterTopkParams p;
  p.logits = lg.data_ptr();
  p.dtype = float_kind(lg.scalar_type());
  p.tokens = T;
  p.experts = E;
  p.k = k;
  p.sigmoid = d.score == RouterScore::kSigmoid;
  p.topk_first = topk_first;
  p.bias = bias_acc.defined() ? bias_acc.data_ptr() : nullptr;
  p.num_groups = num_groups;
  p.topk_groups = num_groups > 1 ? topk_groups : 1;
  p.normalize = normalize;
  p.scale = scale;
  p.weights = weights.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.group_workspace = ws.defined() ? ws.data_ptr() : nullptr;
  MS_CUDA_CHECK(router_topk_launch(p, current_stream()), op);
  return {weights, ids};
}

// grad_weights [T, k], logits [T, E], ids [T, k] (from router_topk) -> grad_logits [T, E] in logits' dtype.
// ids outside [0, E) contribute nothing (they cannot come from router_topk).
at::Tensor router_topk_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& ids,
                                     c10::string_view score, bool topk_first, bool normalize, double scale) {
  const char* op = "router_topk_backward";
  const RouterDims d = check_router_topk_backward_args(grad_weights, logits, ids, score);
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor ids64 = ids_as_long(ids, d.E, op);
  const at::Tensor lg = logits.contiguous();
  const at::Tensor gw = grad_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  auto grad_logits = at::empty({d.T, d.E}, logits.options());

  RouterTopkBackwardParams p;
  p.grad_weights = gw.data_ptr();
  p.logits = lg.data_ptr();
  p.dtype = float_kind(lg.scalar_type());
  p.ids = ids64.data_ptr<int64_t>();
  p.tokens = d.T;
  p.experts = d.E;
  p.k = d.k;
  p.sigmoid = d.score == RouterScore::kSigmoid;
  p.topk_first = topk_first;
  p.normalize = normalize;
  p.scale = scale;
  p.grad_logits = grad_logits.data_ptr();
  MS_CUDA_CHECK(router_topk_backward_launch(p, current_stream()), op);
  return grad_logits;
}

// logits [T, E], ids [T, k] (entries outside [0, E) are not counted), mask [T] optional
// -> scalar, float32 (float64 for float64 logits).
at::Tensor router_aux_loss_cuda(const at::Tensor& logits, const at::Tensor& ids,
                                const std::optional<at::Tensor>& mask) {
  const char* op = "router_aux_loss";
  c10::cuda::CUDAGuard guard(logits.device());
  const AuxLossInputs in = aux_loss_inputs(logits, ids, mask, op);
  const auto acc = acc_dtype(logits.scalar_type());
  auto out = at::empty({}, logits.options().dtype(acc));
  auto ws = at::empty({router_aux_loss_workspace_elems(in.d.T, in.d.E)}, logits.options().dtype(acc));
  MS_CUDA_CHECK(router_aux_loss_launch(in.logits.data_ptr(), float_kind(logits.scalar_type()), in.d.T, in.d.E,
                                       in.ids.data_ptr<int64_t>(), in.d.k,
                                       in.mask.defined() ? in.mask.data_ptr() : nullptr, out.data_ptr(),
                                       ws.data_ptr(), current_stream()),
                op);
  return out;
}

// grad (scalar), logits [T, E], ids [T, k], mask [T] optional -> grad_logits [T, E] in logits' dtype.
at::Tensor router_aux_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ids,
                                         const std::optional<at::Tensor>& mask) {
  const char* op = "router_aux_loss_backward";
  c10::cuda::CUDAGuard guard(logits.device());
  const AuxLossInputs in = aux_loss_inputs(logits, ids, mask, op);
  const at::Tensor g = scalar_grad(grad, logits, op);
  auto grad_logits = at::empty({in.d.T, in.d.E}, logits.options());
  auto ws = at::empty({router_aux_loss_workspace_elems(in.d.T, in.d.E)},
                      logits.options().dtype(acc_dtype(logits.scalar_type())));
  MS_CUDA_CHECK(router_aux_loss_backward_launch(g.data_ptr(), in.logits.data_ptr(), float_kind(logits.scalar_type()),
                                                in.d.T, in.d.E, in.ids.data_ptr<int64_t>(), in.d.k,
                                                in.mask.defined() ? in.mask.data_ptr() : nullptr,
                                                grad_logits.data_ptr(), ws.data_ptr(), current_stream()),
                op);
  return grad_logits;
}

// logits [T, E] -> scalar mean_t logsumexp(logits_t)^2, float32 (float64 for float64 logits).
at::Tensor router_z_loss_cuda(const at::Tensor& logits) {
  const char* op = "router_z_loss";
  check_router_logits(logits, op);
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());

  const at::Tensor lg = logits.contiguous();
  auto out = at::empty({}, logits.options().dtype(acc));
  auto ws = at::empty({router_z_loss_workspace_elems(T)}, logits.options().dtype(acc));
  MS_CUDA_CHECK(router_z_loss_launch(lg.data_ptr(), float_kind(lg.scalar_type()), T, E, out.data_ptr(),
                                     ws.data_ptr(), current_stream()),
                op);
  return out;
}

// grad (scalar), logits [T, E] -> grad_logits [T, E] in logits' dtype.
at::Tensor router_z_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "router_z_loss_backward";
  check_router_logits(logits, op);
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = scalar_grad(grad, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1);

  const at::Tensor lg = logits.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options());
  MS_CUDA_CHECK(router_z_loss_backward_launch(g.data_ptr(), lg.data_ptr(), float_kind(lg.scalar_type()), T, E,
                                              grad_logits.data_ptr(), current_stream()),
                op);
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("router_topk", &router_topk_cuda);
  m.impl("router_topk_backward", &router_topk_backward_cuda);
  m.impl("router_aux_loss", &router_aux_loss_cuda);
  m.impl("router_aux_loss_backward", &router_aux_loss_backward_cuda);
  m.impl("router_z_loss", &router_z_loss_cuda);
  m.impl("router_z_loss_backward", &router_z_loss_backward_cuda);
}

}  // namespace moestream
