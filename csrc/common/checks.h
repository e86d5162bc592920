// Argument checks and dtype dispatch shared by every host entry point.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <string>

namespace moestream {

// TORCH_CHECK with the argument named first, so the Python message reads
// "moestream.<op>: <arg> must ..., got ...".
#define MS_CHECK(cond, op, ...) TORCH_CHECK((cond), "moestream.", op, ": ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  auto d = t.scalar_type();
  MS_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble, op, name,
           " must be float32, bfloat16, float16 or float64, got ", d);
}

inline void check_index(const at::Tensor& t, const char* op, const char* name) {
  auto d = t.scalar_type();
  MS_CHECK(d == at::kInt || d == at::kLong, op, name, " must be int32 or int64, got ", d);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  MS_CHECK(t.dim() == dim, op, name, " must have ", dim, " dimensions, got shape ", shape_str(t));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                              const char* name_b) {
  MS_CHECK(a.device() == b.device(), op, name_a, " and ", name_b, " must be on the same device, got ", a.device(),
           " and ", b.device());
}

}  // namespace moestream

// float32, float64, bfloat16, float16
#define MS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
