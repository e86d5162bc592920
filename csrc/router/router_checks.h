// Argument checks of the router ops (router_topk, router_aux_loss, router_z_loss and their
// backwards) shared by the CPU and CUDA kernels (same messages on both). Expert id values are
// checked by check_router_ids_range: always on the CPU, on CUDA with the tuning key check_inputs
// (on a host copy: a synchronisation).
#pragma once
#include <ATen/ATen.h>

#include <climits>
#include <optional>
#include <string_view>

#include "common/checks.h"

namespace moestream {

enum class RouterScore : int { kSoftmax = 0, kSigmoid = 1 };

inline RouterScore parse_router_score(std::string_view score, const char* op) {
  static constexpr const char* kNames[] = {"softmax", "sigmoid"};  // RouterScore order
  return static_cast<RouterScore>(parse_choice(score, kNames, op, "score"));
}

struct RouterDims {
  int64_t T, E, k;
  RouterScore score = RouterScore::kSoftmax;  // router_topk and its backward
};

// logits [T, E], any float dtype. E < 2^31 - 1: the kernels index experts with 32-bit ints (the
// CPU's selection keys hold the expert index in 32 bits).
inline void check_router_logits(const at::Tensor& logits, const char* op) {
  check_dim(logits, 2, op, "logits");
  check_float(logits, op, "logits");
  MS_CHECK(logits.size(1) < INT_MAX, op, "logits must have fewer than 2^31 - 1 experts, got E = ", logits.size(1));
}

// ids [T, k] int32 | int64 on logits' device, T = logits' rows.
inline void check_router_ids(const at::Tensor& ids, const at::Tensor& logits, const char* op) {
  check_dim(ids, 2, op, "ids");
  check_index(ids, op, "ids");
  check_same_device(logits, ids, op, "logits", "ids");
  const int64_t T = logits.size(0);
  MS_CHECK(ids.size(0) == T, op, "ids must have T = logits.size(0) = ", T, " rows, got shape ", shape_str(ids));
}

// Every entry of ids [T, k] (a contiguous host tensor) lies in [0, E); names the first that does not.
inline void check_router_ids_range(const at::Tensor& ids, int64_t E, const char* op) {
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "check_router_ids_range", [&] {
    const index_t* p = ids.const_data_ptr<index_t>();
    const int64_t n = ids.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = static_cast<int64_t>(p[i]);
      if (v < 0 || v >= E) {
        const int64_t k = ids.size(1);
        MS_CHECK(false, op, "ids must lie in [0, E) with E = logits.size(1) = ", E, ", got ids[", i / k, ", ", i % k,
                 "] = ", v);
      }
    }
  });
}

// logits [T, E] float, k in [1, E], score "softmax" | "sigmoid", bias [E] float (optional),
// num_groups divides E, topk_groups in [1, num_groups]. k may exceed the topk_groups * E / num_groups
// experts of the kept groups, as transformers' DeepSeek-V3 router allows: the dropped groups'
// selection values are -inf, so the remaining picks come from them (lowest ids first) with their
// real weights.
inline RouterDims check_router_topk_args(const at::Tensor& logits, int64_t k, std::string_view score,
                                         const std::optional<at::Tensor>& bias, int64_t num_groups,
                                         int64_t topk_groups) {
  constexpr const char* op = "router_topk";
  check_router_logits(logits, op);
  const int64_t T = logits.size(0), E = logits.size(1);
  MS_CHECK(k >= 1 && k <= E, op, "k must be in [1, E] with E = logits.size(1) = ", E, ", got k = ", k);
  const RouterScore sc = parse_router_score(score, op);
  MS_CHECK(num_groups >= 1, op, "num_groups must be >= 1, got ", num_groups);
  MS_CHECK(E % num_groups == 0, op, "num_groups must divide the number of experts E = ", E,
           ", got num_groups = ", num_groups);
  MS_CHECK(topk_groups >= 1 && topk_groups <= num_groups, op, "topk_groups must be in [1, num_groups = ", num_groups,
           "], got ", topk_groups);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_device(logits, b, op, "logits", "bias");
    check_float(b, op, "bias");
    MS_CHECK(b.dim() == 1 && b.size(0) == E, op, "bias must have shape [E] = [", E, "], got ", shape_str(b));
  }
  return {T, E, k, sc};
}

// grad_weights [T, k] float, logits [T, E] float, ids [T, k] int32 | int64, score as in the forward.
inline RouterDims check_router_topk_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                                  const at::Tensor& ids, std::string_view score) {
  constexpr const char* op = "router_topk_backward";
  check_router_logits(logits, op);
  check_dim(grad_weights, 2, op, "grad_weights");
  check_float(grad_weights, op, "grad_weights");
  check_same_device(logits, grad_weights, op, "logits", "grad_weights");
  check_router_ids(ids, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  MS_CHECK(grad_weights.size(0) == T && grad_weights.size(1) == k, op, "grad_weights must have the shape of ids [", T,
           ", ", k, "], got ", shape_str(grad_weights));
  return {T, E, k, parse_router_score(score, op)};
}

// logits [T, E] float, ids [T, k] int32 | int64, mask [T] (optional; float, integer or bool).
inline RouterDims check_router_aux_loss_args(const at::Tensor& logits, const at::Tensor& ids,
                                             const std::optional<at::Tensor>& mask, const char* op) {
  check_router_logits(logits, op);
  check_router_ids(ids, logits, op);
  const int64_t T = logits.size(0);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_device(logits, m, op, "logits", "mask");
    MS_CHECK(m.dim() == 1 && m.size(0) == T, op, "mask must have shape [T] = [", T, "], got ", shape_str(m));
    const auto d = m.scalar_type();
    MS_CHECK(at::isFloatingType(d) || at::isIntegralType(d, /*includeBool=*/true), op,
             "mask must be a float, integer or bool tensor, got ", d);
  }
  return {T, logits.size(1), ids.size(1)};
}

// The gradient of a scalar loss: one element, any float dtype, on logits' device.
inline void check_router_scalar_grad(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  check_float(grad, op, "grad");
  check_same_device(logits, grad, op, "logits", "grad");
  MS_CHECK(grad.numel() == 1, op, "grad must be a scalar, got shape ", shape_str(grad));
}

}  // namespace moestream
