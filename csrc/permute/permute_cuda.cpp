// Torch glue for the permute / unpermute CUDA kernels (permute_cuda.cu).
//
// Input values are validated lazily on CUDA: checking that ids (or perm) are in range needs their
// values on the host, i.e. a synchronisation, which these ops never do by default. Instead:
//  - permute: ids outside [0, num_experts) are not placed with any expert: their entries sort after
//    every expert, into the rows past offsets[-1] (so offsets[-1] < T*k); perm still points at them,
//    and nothing is written out of bounds;
//  - unpermute / unpermute_backward: perm entries outside [0, N) contribute nothing (and get a zero
//    weight gradient). perm must be a permutation as permute returns it: should it repeat a row,
//    unpermute_backward gives that row the contribution of the last (token, slot) naming it.
// The tuning key check_inputs (initially MOESTREAM_CHECK_INPUTS=1) checks these values up front
// (this synchronises) and raises the CPU kernels' RuntimeError instead (permute_checks.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cuda_error.h"
#include "common/tuning.h"
#include "permute/permute_checks.h"
#include "permute/permute_cuda.h"

namespace moestream {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// perm (checked by permute_checks.h) -> contiguous int64; its values are checked to lie in
// [0, N) only with the tuning key check_inputs (a host copy: synchronises).
at::Tensor perm_as_long(const at::Tensor& perm, int64_t N, const char* op) {
  at::Tensor p64 = perm.to(at::kLong).contiguous();
  if (tuning().check_inputs) check_perm_range(p64.cpu(), N, op);
  return p64;
}

// The fields UnpermuteParams and UnpermuteBackwardParams share.
template <typename Params>
void fill_unpermute(Params& p, const at::Tensor& yc, const at::Tensor& p64, const at::Tensor& w,
                    const UnpermuteDims& d) {
  p.y_sorted = yc.data_ptr();
  p.dtype = float_kind(yc.scalar_type());
  p.rows = d.N;
  p.hidden = d.H;
  p.perm = p64.data_ptr<int64_t>();
  p.tokens = d.T;
  p.k = d.k;
  p.weights = w.defined() ? w.data_ptr() : nullptr;
}

at::Tensor weights_as_acc(const std::optional<at::Tensor>& weights, const at::Tensor& y_sorted) {
  return weights.has_value() ? weights->to(acc_dtype(y_sorted.scalar_type())).contiguous() : at::Tensor();
}

// x [T, H] float, ids [T, k] int32 | int64, num_experts >= 1
// -> x_sorted [T*k, H] (x's dtype), perm [T, k] int64, offsets [num_experts] int64 cumulative ends.
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x, const at::Tensor& ids,
                                                            int64_t num_experts) {
  const char* op = "permute";
  const PermuteDims d = check_permute_args(x, ids, num_experts);
  check_cuda(x, op, "x");
  const int64_t T = d.T, H = d.H, k = d.k;
  MS_CHECK(T * k < INT_MAX, op, "ids must have fewer than 2^31 - 1 entries (tokens * k), got shape ",
           shape_str(ids));
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor ic = ids.contiguous();
  if (tuning().check_inputs) check_expert_ids_range(ic.cpu(), num_experts);

  const at::Tensor xc = x.contiguous();
  auto x_sorted = at::empty({T * k, H}, x.options());
  auto perm = at::empty({T, k}, ids.options().dtype(at::kLong));
  auto offsets = at::empty({num_experts}, ids.options().dtype(at::kLong));
  size_t ws_bytes = 0;
  MS_CUDA_CHECK(permute_workspace_bytes(T * k, num_experts, &ws_bytes), op);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));

  PermuteParams p;
  p.x = xc.data_ptr();
  p.tokens = T;
  p.hidden = H;
  p.elem_size = static_cast<int>(xc.element_size());
  p.ids = ic.data_ptr();
  p.ids_int64 = ic.scalar_type() == at::kLong;
  p.k = k;
  p.num_experts = num_experts;
  p.x_sorted = x_sorted.data_ptr();
  p.perm = perm.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  MS_CUDA_CHECK(permute_launch(p, current_stream()), op);
  return {x_sorted, perm, offsets};
}

// y_sorted [N, H] float, perm [T, k] int64 (int32 accepted), weights [T, k] optional (any float dtype)
// -> y [T, H] in y_sorted's dtype.
at::Tensor unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& perm,
                          const std::optional<at::Tensor>& weights) {
  const char* op = "unpermute";
  const UnpermuteDims d = check_unpermute_args(y_sorted, perm, weights);
  check_cuda(y_sorted, op, "y_sorted");
  MS_CHECK(d.k < INT_MAX, op, "perm must have fewer than 2^31 - 1 columns, got shape ", shape_str(perm));
  c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor p64 = perm_as_long(perm, d.N, op);
  const at::Tensor w = weights_as_acc(weights, y_sorted);
  const at::Tensor yc = y_sorted.contiguous();
  auto out = at::empty({d.T, d.H}, y_sorted.options());
  UnpermuteParams p;
  fill_unpermute(p, yc, p64, w, d);
  p.out = out.data_ptr();
  MS_CUDA_CHECK(unpermute_launch(p, current_stream()), op);
  return out;
}

// grad_y [T, H], y_sorted [N, H], perm [T, k], weights [T, k] optional
// -> grad_y_sorted [N, H] (y_sorted's dtype; rows no perm entry names are zero),
//    grad_weights [T, k] float32 (float64 for float64 y_sorted), or [0] when weights is None or
//    needs_weights_grad is false.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                           const at::Tensor& perm,
                                                           const std::optional<at::Tensor>& weights,
                                                           bool needs_weights_grad) {
  const char* op = "unpermute_backward";
  const UnpermuteDims d = check_unpermute_backward_args(grad_y, y_sorted, perm, weights);
  check_cuda(y_sorted, op, "y_sorted");
  MS_CHECK(d.T * d.k < INT_MAX, op, "perm must have fewer than 2^31 - 1 entries, got shape ", shape_str(perm));
  c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor p64 = perm_as_long(perm, d.N, op);
  if (tuning().check_inputs && p64.numel() > 0) {
    // the kernel inverts perm: a repeated row would keep only one (token, slot)'s contribution
    MS_CHECK(std::get<0>(at::_unique(p64.reshape({-1}))).numel() == p64.numel(), op,
             "perm must not repeat a row of y_sorted");
  }
  const at::Tensor w = weights_as_acc(weights, y_sorted);

  const auto acc = acc_dtype(y_sorted.scalar_type());
  const bool want_gw = w.defined() && needs_weights_grad;
  const at::Tensor yc = y_sorted.contiguous();
  const at::Tensor gyc = grad_y.contiguous();
  auto grad_y_sorted = at::empty({d.N, d.H}, y_sorted.options());
  const std::vector<int64_t> gw_shape = want_gw ? std::vector<int64_t>{d.T, d.k} : std::vector<int64_t>{0};
  auto grad_weights = at::empty(gw_shape, y_sorted.options().dtype(acc));
  auto inverse = at::empty({d.N}, y_sorted.options().dtype(at::kInt));

  UnpermuteBackwardParams p;
  fill_unpermute(p, yc, p64, w, d);
  p.grad_y = gyc.data_ptr();
  p.grad_y_sorted = grad_y_sorted.data_ptr();
  p.grad_weights = want_gw ? grad_weights.data_ptr() : nullptr;
  p.inverse = inverse.data_ptr<int32_t>();
  MS_CUDA_CHECK(unpermute_backward_launch(p, current_stream()), op);
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moestream
