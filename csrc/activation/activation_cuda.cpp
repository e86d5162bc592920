// Torch glue for the gated activation CUDA kernels (activation_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activation/activation_checks.h"
#include "activation/activation_cuda.h"
#include "common/checks.h"
#include "common/cuda_error.h"

namespace moestream {
namespace {

GatedActParams launch_params(const at::Tensor& xc, const GatedActArgs& g, double alpha, double limit) {
  GatedActParams p;
  p.x = xc.data_ptr();
  p.dtype = float_kind(xc.scalar_type());
  p.rows = g.rows;
  p.inter = g.I;
  p.kind = g.kind;
  p.interleaved = g.layout == ActLayout::kInterleaved;
  p.alpha = alpha;
  p.limit = limit;
  return p;
}

// x [..., 2I] float; kind "swiglu" | "geglu" | "gptoss"; layout "concat" | "interleaved"
// -> [..., I] in x's dtype.
at::Tensor gated_activation_cuda(const at::Tensor& x, c10::string_view kind, c10::string_view layout, double alpha,
                                 double limit) {
  constexpr const char* op = "gated_activation";
  const GatedActArgs g = check_gated_activation_args(x, kind, layout);
  check_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  auto out = at::empty(g.out_shape, x.options());
  MS_CUDA_CHECK(gated_activation_launch(launch_params(xc, g, alpha, limit), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream().stream()),
                op);
  return out;
}

// grad [..., I], x [..., 2I] -> grad_x [..., 2I] in x's dtype.
at::Tensor gated_activation_backward_cuda(const at::Tensor& grad, const at::Tensor& x, c10::string_view kind,
                                          c10::string_view layout, double alpha, double limit) {
  constexpr const char* op = "gated_activation_backward";
  const GatedActArgs g = check_gated_activation_backward_args(grad, x, kind, layout);
  check_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  MS_CUDA_CHECK(gated_activation_backward_launch(launch_params(xc, g, alpha, limit), gc.data_ptr(),
                                                 grad_x.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                op);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
}

}  // namespace moestream
