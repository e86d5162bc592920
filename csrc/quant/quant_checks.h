// Argument checks of moestream::qgrouped_mm and moestream::qlinear (the weight-only int8 / int4
// matmuls on the packed format of python/moestream/quant.py), shared by every backend.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace moestream {

struct QmmDims {
  int64_t M, K, N, E, G;  // G: groups per row (K / group_size)
};

// a [M, K] float32 | bfloat16 | float16; qweight uint8 [E, N, K] (bits 8) or [E, N, K/2] (bits 4);
// scale float32 [E, N, K/group_size]; zero (optional) like scale; bias [E, N] optional, any float
// dtype; everything on a's device. `lead` is 1 for qgrouped_mm (the E dimension) and 0 for qlinear
// (E = 1 implied), whose messages then show [N, ...] shapes.
inline QmmDims check_qmm_args(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scale,
                              const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias, const char* op, int64_t lead,
                              const char* a_name) {
  check_dim(a, 2, op, a_name);
  {
    const auto d = a.scalar_type();
    MS_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, a_name,
             " must be float32, bfloat16 or float16, got ", d);
  }
  MS_CHECK(bits == 4 || bits == 8, op, "bits must be 4 or 8, got ", bits);
  MS_CHECK(group_size > 0 && group_size % 32 == 0, op, "group_size must be a positive multiple of 32, got ",
           group_size);
  const int64_t wd = 2 + lead;
  const char* wshape = lead ? (bits == 4 ? "[E, N, K/2]" : "[E, N, K]") : (bits == 4 ? "[N, K/2]" : "[N, K]");
  check_dim(qweight, wd, op, "qweight");
  MS_CHECK(qweight.scalar_type() == at::kByte, op, "qweight must be uint8 (packed codes), got ",
           qweight.scalar_type());
  check_same_device(a, qweight, op, a_name, "qweight");
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t E = lead ? qweight.size(0) : 1;
  const int64_t N = qweight.size(lead);
  const int64_t kp = bits == 4 ? K / 2 : K;
  MS_CHECK(K % group_size == 0, op, "group_size ", group_size, " does not divide K = ", K, " (", a_name,
           "'s columns, shape ", shape_str(a), ")");
  MS_CHECK(qweight.size(lead + 1) == kp, op, "qweight must have shape ", wshape, " with K = ", K, " (", a_name,
           "'s columns) at ", bits, " bits, got shape ", shape_str(qweight));
  const int64_t G = K / group_size;
  auto check_groups = [&](const at::Tensor& t, const char* name) {
    check_dim(t, wd, op, name);
    MS_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ", t.scalar_type());
    check_same_device(a, t, op, a_name, name);
    const bool ok = (lead == 0 || t.size(0) == E) && t.size(lead) == N && t.size(lead + 1) == G;
    MS_CHECK(ok, op, name, " must have shape ", lead ? "[E, N, K/group_size] = [" : "[N, K/group_size] = [",
             lead ? std::to_string(E) + ", " : std::string(), N, ", ", G, "], got shape ", shape_str(t));
  };
  check_groups(scale, "scale");
  if (zero.has_value()) check_groups(*zero, "zero");
  if (bias.has_value()) {
    check_float(*bias, op, "bias");
    check_same_device(a, *bias, op, a_name, "bias");
    const bool ok = lead ? (bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N)
                         : (bias->dim() == 1 && bias->size(0) == N);
    MS_CHECK(ok, op, "bias must have shape ", lead ? "[E, N] = [" + std::to_string(E) + ", " : std::string("[N] = ["),
             N, "], got shape ", shape_str(*bias));
  }
  return {M, K, N, E, G};
}

}  // namespace moestream
