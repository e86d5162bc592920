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
// (this synchronises) and raises a RuntimeError naming the argument instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/cuda_error.h"
#include "common/tuning.h"
#include "permute/permute_cuda.h"

namespace moestream {
namespace {

// Values of an index tensor within [0, bound): only with the tuning key check_inputs (synchronises).
void check_index_range(const at::Tensor& idx, int64_t bound, const char* op, const char* name, const char* what) {
  if (!tuning().check_inputs || idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>();
  const int64_t hi = idx.max().item<int64_t>();
  MS_CHECK(lo >= 0 && hi < bound, op, name, " values must be in [0, ", bound, ") (", what, "), got values in [", lo,
           ", ", hi, "]");
}

at::Tensor perm_as_long(const at::Tensor& perm, const at::Tensor& ref, const char* op) {
  check_cuda_tensor(perm, ref, op, "perm");
  check_dim(perm, 2, op, "perm");
  check_index(perm, op, "perm");
  return perm.to(at::kLong).contiguous();
}

at::Tensor weights_as_acc(const std::optional<at::Tensor>& weights, const at::Tensor& perm, const at::Tensor& ref,
                          const char* op) {
  if (!weights.has_value()) return at::Tensor();
  check_cuda_tensor(*weights, ref, op, "weights");
  check_float(*weights, op, "weights");
  MS_CHECK(weights->sizes() == perm.sizes(), op, "weights must have the shape of perm ", shape_str(perm), ", got ",
           shape_str(*weights));
  return weights->to(acc_dtype(ref.scalar_type())).contiguous();
}

// x [T, H] float, ids [T, k] int32 | int64, num_experts >= 1
// -> x_sorted [T*k, H] (x's dtype), perm [T, k] int64, offsets [num_experts] int64 cumulative ends.
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x, const at::Tensor& ids,
                                                            int64_t num_experts) {
  const char* op = "permute";
  MS_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got device ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  check_dim(x, 2, op, "x");
  check_float(x, op, "x");
  check_cuda_tensor(ids, x, op, "ids");
  check_dim(ids, 2, op, "ids");
  check_index(ids, op, "ids");
  MS_CHECK(ids.size(0) == x.size(0), op, "ids must have one row per token of x (", x.size(0), "), got shape ",
           shape_str(ids));
  MS_CHECK(num_experts >= 1 && num_experts < INT_MAX, op, "num_experts must be in [1, 2^31 - 1), got ",
           num_experts);
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  MS_CHECK(T * k < INT_MAX, op, "ids must have fewer than 2^31 - 1 entries (tokens * k), got shape ",
           shape_str(ids));
  check_index_range(ids, num_experts, op, "ids", "num_experts");

  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = ids.contiguous();
  auto x_sorted = at::empty({T * k, H}, x.options());
  auto perm = at::empty({T, k}, ids.options().dtype(at::kLong));
  auto offsets = at::empty({num_experts}, ids.options().dtype(at::kLong));
  size_t ws_bytes = 0;
  MS_CUDA_CHECK(permute_workspace_bytes(T * k, num_experts, &ws_bytes), "permute");
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
  MS_CUDA_CHECK(permute_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "permute");
  return {x_sorted, perm, offsets};
}

// y_sorted [N, H] float, perm [T, k] int64 (int32 accepted), weights [T, k] optional (any float dtype)
// -> y [T, H] in y_sorted's dtype.
at::Tensor unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& perm,
                          const std::optional<at::Tensor>& weights) {
  const char* op = "unpermute";
  MS_CHECK(y_sorted.is_cuda(), op, "y_sorted must be a CUDA tensor, got device ", y_sorted.device());
  c10::cuda::CUDAGuard guard(y_sorted.device());
  check_dim(y_sorted, 2, op, "y_sorted");
  check_float(y_sorted, op, "y_sorted");
  const at::Tensor p64 = perm_as_long(perm, y_sorted, op);
  const at::Tensor w = weights_as_acc(weights, perm, y_sorted, op);
  const int64_t N = y_sorted.size(0), H = y_sorted.size(1), T = perm.size(0), k = perm.size(1);
  MS_CHECK(k < INT_MAX, op, "perm must have fewer than 2^31 - 1 columns, got shape ", shape_str(perm));
  check_index_range(p64, N, op, "perm", "rows of y_sorted");

  const at::Tensor yc = y_sorted.contiguous();
  auto out = at::empty({T, H}, y_sorted.options());
  UnpermuteParams p;
  p.y_sorted = yc.data_ptr();
  p.dtype = float_kind(yc.scalar_type());
  p.rows = N;
  p.hidden = H;
  p.perm = p64.data_ptr<int64_t>();
  p.tokens = T;
  p.k = k;
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.out = out.data_ptr();
  MS_CUDA_CHECK(unpermute_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "unpermute");
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
  MS_CHECK(y_sorted.is_cuda(), op, "y_sorted must be a CUDA tensor, got device ", y_sorted.device());
  c10::cuda::CUDAGuard guard(y_sorted.device());
  check_dim(y_sorted, 2, op, "y_sorted");
  check_float(y_sorted, op, "y_sorted");
  const at::Tensor p64 = perm_as_long(perm, y_sorted, op);
  const at::Tensor w = weights_as_acc(weights, perm, y_sorted, op);
  const int64_t N = y_sorted.size(0), H = y_sorted.size(1), T = perm.size(0), k = perm.size(1);
  check_cuda_tensor(grad_y, y_sorted, op, "grad_y");
  check_float(grad_y, op, "grad_y");
  MS_CHECK(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == H, op, "grad_y must have shape [", T, ", ",
           H, "], got ", shape_str(grad_y));
  MS_CHECK(T * k < INT_MAX, op, "perm must have fewer than 2^31 - 1 entries, got shape ", shape_str(perm));
  check_index_range(p64, N, op, "perm", "rows of y_sorted");
  if (tuning().check_inputs && p64.numel() > 0) {
    MS_CHECK(std::get<0>(at::_unique(p64.reshape({-1}))).numel() == p64.numel(), op,
             "perm must not repeat a row of y_sorted");
  }

  const auto acc = acc_dtype(y_sorted.scalar_type());
  const bool want_gw = w.defined() && needs_weights_grad;
  const at::Tensor yc = y_sorted.contiguous();
  const at::Tensor gyc = grad_y.to(y_sorted.scalar_type()).contiguous();
  auto grad_y_sorted = at::empty({N, H}, y_sorted.options());
  const std::vector<int64_t> gw_shape = want_gw ? std::vector<int64_t>{T, k} : std::vector<int64_t>{0};
  auto grad_weights = at::empty(gw_shape, y_sorted.options().dtype(acc));
  auto inverse = at::empty({N}, y_sorted.options().dtype(at::kInt));

  UnpermuteBackwardParams p;
  p.grad_y = gyc.data_ptr();
  p.y_sorted = yc.data_ptr();
  p.dtype = float_kind(yc.scalar_type());
  p.rows = N;
  p.hidden = H;
  p.perm = p64.data_ptr<int64_t>();
  p.tokens = T;
  p.k = k;
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.grad_y_sorted = grad_y_sorted.data_ptr();
  p.grad_weights = want_gw ? grad_weights.data_ptr() : nullptr;
  p.inverse = inverse.data_ptr<int32_t>();
  MS_CUDA_CHECK(unpermute_backward_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "unpermute_backward");
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moestream
