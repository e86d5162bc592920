// Torch glue for the gated activation CUDA kernels (activation_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "activation/activation_cuda.h"
#include "common/checks.h"
#include "common/cuda_error.h"

namespace moestream {
namespace {

ActKind parse_kind(c10::string_view kind, const char* op) {
  const std::string s(kind.data(), kind.size());
  if (s == "swiglu") return ActKind::kSwiglu;
  if (s == "geglu") return ActKind::kGeglu;
  if (s == "gptoss") return ActKind::kGptoss;
  MS_CHECK(false, op, "kind must be \"swiglu\", \"geglu\" or \"gptoss\", got \"", s, "\"");
  return ActKind::kSwiglu;
}

bool parse_layout(c10::string_view layout, const char* op) {
  const std::string s(layout.data(), layout.size());
  MS_CHECK(s == "concat" || s == "interleaved", op, "layout must be \"concat\" or \"interleaved\", got \"", s, "\"");
  return s == "interleaved";
}

void check_x(const at::Tensor& x, const char* op) {
  MS_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got device ", x.device());
  check_float(x, op, "x");
  MS_CHECK(x.dim() >= 1, op, "x must have at least 1 dimension, got shape ", shape_str(x));
  MS_CHECK(x.size(-1) % 2 == 0, op, "x's last dimension must be even (gate and up halves), got shape ", shape_str(x));
}

std::vector<int64_t> out_shape(const at::Tensor& x) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() /= 2;
  return s;
}

// x [..., 2I] float; kind "swiglu" | "geglu" | "gptoss"; layout "concat" | "interleaved"
// -> [..., I] in x's dtype.
at::Tensor gated_activation_cuda(const at::Tensor& x, c10::string_view kind, c10::string_view layout, double alpha,
                                 double limit) {
  const char* op = "gated_activation";
  check_x(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const ActKind k = parse_kind(kind, op);
  const bool inter = parse_layout(layout, op);
  const at::Tensor xc = x.contiguous();
  auto out = at::empty(out_shape(x), x.options());
  const int64_t I = x.size(-1) / 2;

  GatedActParams p;
  p.x = xc.data_ptr();
  p.dtype = float_kind(xc.scalar_type());
  p.rows = I > 0 ? xc.numel() / (2 * I) : 0;
  p.inter = I;
  p.kind = k;
  p.interleaved = inter;
  p.alpha = alpha;
  p.limit = limit;
  p.out = out.data_ptr();
  MS_CUDA_CHECK(gated_activation_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "gated_activation");
  return out;
}

// grad [..., I], x [..., 2I] -> grad_x [..., 2I] in x's dtype.
at::Tensor gated_activation_backward_cuda(const at::Tensor& grad, const at::Tensor& x, c10::string_view kind,
                                          c10::string_view layout, double alpha, double limit) {
  const char* op = "gated_activation_backward";
  check_x(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const ActKind k = parse_kind(kind, op);
  const bool inter = parse_layout(layout, op);
  check_cuda_tensor(grad, x, op, "grad");
  check_float(grad, op, "grad");
  const std::vector<int64_t> oshape = out_shape(x);
  MS_CHECK(grad.sizes() == at::IntArrayRef(oshape), op, "grad must have shape ", at::IntArrayRef(oshape),
           " (x's with the last dimension halved), got ", shape_str(grad));
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  const int64_t I = x.size(-1) / 2;

  GatedActBackwardParams p;
  p.grad = gc.data_ptr();
  p.x = xc.data_ptr();
  p.dtype = float_kind(xc.scalar_type());
  p.rows = I > 0 ? xc.numel() / (2 * I) : 0;
  p.inter = I;
  p.kind = k;
  p.interleaved = inter;
  p.alpha = alpha;
  p.limit = limit;
  p.grad_x = grad_x.data_ptr();
  MS_CUDA_CHECK(gated_activation_backward_launch(p, c10::cuda::getCurrentCUDAStream().stream()),
                "gated_activation_backward");
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
}

}  // namespace moestream
