// Torch glue for the router CUDA kernels (router_cuda.cu): argument checks, dtype conversion of the
// small side inputs, output allocation on the current stream, registration for the CUDA key.
// Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/cuda_error.h"
#include "router/router_cuda.h"

namespace moestream {
namespace {

bool parse_score(c10::string_view score, const char* op) {
  const std::string s(score.data(), score.size());
  MS_CHECK(s == "softmax" || s == "sigmoid", op, "score must be \"softmax\" or \"sigmoid\", got \"", s, "\"");
  return s == "sigmoid";
}

void check_logits(const at::Tensor& logits, const char* op) {
  MS_CHECK(logits.is_cuda(), op, "logits must be a CUDA tensor, got device ", logits.device());
  check_dim(logits, 2, op, "logits");
  check_float(logits, op, "logits");
  MS_CHECK(logits.size(1) < INT_MAX, op, "logits must have fewer than 2^31 - 1 experts (columns), got ",
           logits.size(1));
}

// ids [T, k] of an integer dtype on logits' device -> contiguous int64
at::Tensor ids_as_long(const at::Tensor& ids, const at::Tensor& logits, const char* op) {
  check_cuda_tensor(ids, logits, op, "ids");
  check_dim(ids, 2, op, "ids");
  check_index(ids, op, "ids");
  MS_CHECK(ids.size(0) == logits.size(0), op, "ids must have one row per token (", logits.size(0),
           "), got shape ", shape_str(ids));
  return ids.to(at::kLong).contiguous();
}

// grad of a scalar loss -> contiguous 1-element tensor in the accumulation dtype
at::Tensor scalar_grad(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  check_cuda_tensor(grad, logits, op, "grad");
  MS_CHECK(grad.numel() == 1, op, "grad must have one element (the loss is a scalar), got shape ",
           shape_str(grad));
  return grad.to(acc_dtype(logits.scalar_type())).contiguous();
}

// mask [T] (any shape with T elements, any dtype) -> contiguous accumulation dtype, or undefined
at::Tensor mask_as_acc(const std::optional<at::Tensor>& mask, const at::Tensor& logits, const char* op) {
  if (!mask.has_value()) return at::Tensor();
  check_cuda_tensor(*mask, logits, op, "mask");
  MS_CHECK(mask->numel() == logits.size(0), op, "mask must have one entry per token (", logits.size(0),
           "), got shape ", shape_str(*mask));
  return mask->reshape({logits.size(0)}).to(acc_dtype(logits.scalar_type())).contiguous();
}

// logits [T, E] float; k in [1, E]; score "softmax" | "sigmoid"; bias [E] optional;
// num_groups divides E, topk_groups in [1, num_groups] when num_groups > 1
// -> weights [T, k] float32 (float64 for float64 logits), ids [T, k] int64.
std::tuple<at::Tensor, at::Tensor> router_topk_cuda(const at::Tensor& logits, int64_t k, c10::string_view score,
                                                    bool topk_first, const std::optional<at::Tensor>& bias,
                                                    int64_t num_groups, int64_t topk_groups, bool normalize,
                                                    double scale) {
  const char* op = "router_topk";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const bool sigmoid = parse_score(score, op);
  const int64_t T = logits.size(0), E = logits.size(1);
  MS_CHECK(k >= 1 && k <= E, op, "k must be in [1, ", E, "] (the number of experts), got ", k);
  MS_CHECK(num_groups >= 1, op, "num_groups must be >= 1, got ", num_groups);
  MS_CHECK(E % num_groups == 0, op, "num_groups must divide the number of experts ", E, ", got ", num_groups);
  if (num_groups > 1) {
    MS_CHECK(topk_groups >= 1 && topk_groups <= num_groups, op, "topk_groups must be in [1, ", num_groups,
             "] (num_groups), got ", topk_groups);
  }
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor bias_acc;
  if (bias.has_value()) {
    check_cuda_tensor(*bias, logits, op, "bias");
    check_float(*bias, op, "bias");
    MS_CHECK(bias->dim() == 1 && bias->size(0) == E, op, "bias must have shape [", E, "], got ", shape_str(*bias));
    bias_acc = bias->to(acc).contiguous();
  }

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
  p.sigmoid = sigmoid;
  p.topk_first = topk_first;
  p.bias = bias_acc.defined() ? bias_acc.data_ptr() : nullptr;
  p.num_groups = num_groups;
  p.topk_groups = num_groups > 1 ? topk_groups : 1;
  p.normalize = normalize;
  p.scale = scale;
  p.weights = weights.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.group_workspace = ws.defined() ? ws.data_ptr() : nullptr;
  MS_CUDA_CHECK(router_topk_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "router_topk");
  return {weights, ids};
}

// grad_weights [T, k], logits [T, E], ids [T, k] (from router_topk) -> grad_logits [T, E] in logits' dtype.
// ids outside [0, E) contribute nothing (they cannot come from router_topk).
at::Tensor router_topk_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& ids,
                                     c10::string_view score, bool topk_first, bool normalize, double scale) {
  const char* op = "router_topk_backward";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const bool sigmoid = parse_score(score, op);
  const at::Tensor ids64 = ids_as_long(ids, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  check_cuda_tensor(grad_weights, logits, op, "grad_weights");
  check_float(grad_weights, op, "grad_weights");
  MS_CHECK(grad_weights.dim() == 2 && grad_weights.size(0) == T && grad_weights.size(1) == k, op,
           "grad_weights must have shape [", T, ", ", k, "] like ids, got ", shape_str(grad_weights));

  const at::Tensor lg = logits.contiguous();
  const at::Tensor gw = grad_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  auto grad_logits = at::empty({T, E}, logits.options());

  RouterTopkBackwardParams p;
  p.grad_weights = gw.data_ptr();
  p.logits = lg.data_ptr();
  p.dtype = float_kind(lg.scalar_type());
  p.ids = ids64.data_ptr<int64_t>();
  p.tokens = T;
  p.experts = E;
  p.k = k;
  p.sigmoid = sigmoid;
  p.topk_first = topk_first;
  p.normalize = normalize;
  p.scale = scale;
  p.grad_logits = grad_logits.data_ptr();
  MS_CUDA_CHECK(router_topk_backward_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "router_topk_backward");
  return grad_logits;
}

// logits [T, E], ids [T, k] (entries outside [0, E) are not counted), mask [T] optional
// -> scalar, float32 (float64 for float64 logits).
at::Tensor router_aux_loss_cuda(const at::Tensor& logits, const at::Tensor& ids,
                                const std::optional<at::Tensor>& mask) {
  const char* op = "router_aux_loss";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor ids64 = ids_as_long(ids, logits, op);
  const at::Tensor m = mask_as_acc(mask, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  const auto acc = acc_dtype(logits.scalar_type());

  const at::Tensor lg = logits.contiguous();
  auto out = at::empty({}, logits.options().dtype(acc));
  auto ws = at::empty({router_aux_loss_workspace_elems(T, E)}, logits.options().dtype(acc));
  MS_CUDA_CHECK(router_aux_loss_launch(lg.data_ptr(), float_kind(lg.scalar_type()), T, E, ids64.data_ptr<int64_t>(),
                                       k, m.defined() ? m.data_ptr() : nullptr, out.data_ptr(), ws.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream()),
                "router_aux_loss");
  return out;
}

// grad (scalar), logits [T, E], ids [T, k], mask [T] optional -> grad_logits [T, E] in logits' dtype.
at::Tensor router_aux_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ids,
                                         const std::optional<at::Tensor>& mask) {
  const char* op = "router_aux_loss_backward";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor ids64 = ids_as_long(ids, logits, op);
  const at::Tensor m = mask_as_acc(mask, logits, op);
  const at::Tensor g = scalar_grad(grad, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);

  const at::Tensor lg = logits.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options());
  auto ws = at::empty({router_aux_loss_workspace_elems(T, E)}, logits.options().dtype(acc_dtype(lg.scalar_type())));
  MS_CUDA_CHECK(router_aux_loss_backward_launch(g.data_ptr(), lg.data_ptr(), float_kind(lg.scalar_type()), T, E,
                                                ids64.data_ptr<int64_t>(), k, m.defined() ? m.data_ptr() : nullptr,
                                                grad_logits.data_ptr(), ws.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream().stream()),
                "router_aux_loss_backward");
  return grad_logits;
}

// logits [T, E] -> scalar mean_t logsumexp(logits_t)^2, float32 (float64 for float64 logits).
at::Tensor router_z_loss_cuda(const at::Tensor& logits) {
  const char* op = "router_z_loss";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());

  const at::Tensor lg = logits.contiguous();
  auto out = at::empty({}, logits.options().dtype(acc));
  auto ws = at::empty({router_z_loss_workspace_elems(T)}, logits.options().dtype(acc));
  MS_CUDA_CHECK(router_z_loss_launch(lg.data_ptr(), float_kind(lg.scalar_type()), T, E, out.data_ptr(),
                                     ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                "router_z_loss");
  return out;
}

// grad (scalar), logits [T, E] -> grad_logits [T, E] in logits' dtype.
at::Tensor router_z_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "router_z_loss_backward";
  check_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = scalar_grad(grad, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1);

  const at::Tensor lg = logits.contiguous();
  auto grad_logits = at::empty({T, E}, logits.options());
  MS_CUDA_CHECK(router_z_loss_backward_launch(g.data_ptr(), lg.data_ptr(), float_kind(lg.scalar_type()), T, E,
                                              grad_logits.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                "router_z_loss_backward");
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
