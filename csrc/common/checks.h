// Argument checks, dtype mapping and dtype dispatch shared by every host entry point (CPU and CUDA).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "common/types.h"

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

// The position of `value` in names, which name the values of an enum in order; otherwise the
// error "moestream.<op>: <what> must be one of "a", "b", got "value"".
template <size_t N>
int parse_choice(std::string_view value, const char* const (&names)[N], const char* op, const char* what) {
  std::string list;
  for (size_t i = 0; i < N; ++i) {
    if (value == names[i]) return static_cast<int>(i);
    list += (i ? ", \"" : "\"") + std::string(names[i]) + "\"";
  }
  MS_CHECK(false, op, what, " must be one of ", list, ", got \"", std::string(value), "\"");
  return 0;
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

// For the CUDA entry points, after the shared <op>_checks.h have put every tensor on t's device.
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  MS_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got device ", t.device());
}

// Accumulation dtype of every kernel (AccType in common/types.h): float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The launchers' FloatKind of a tensor checked with check_float.
inline FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kDouble:
      return FloatKind::kFloat64;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    case at::kHalf:
      return FloatKind::kFloat16;
    default:
      TORCH_CHECK(false, "moestream: unsupported floating dtype ", t);
  }
}

}  // namespace moestream

// float32, float64, bfloat16, float16
#define MS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// The four float dtypes (scalar_t) times int32 / int64 (index_t).
#define MS_DISPATCH_FLOATS_AND_INDEX(TYPE, INDEX_TYPE, NAME, ...) \
  MS_DISPATCH_FLOATS(TYPE, NAME, [&] { AT_DISPATCH_INDEX_TYPES(INDEX_TYPE, NAME, __VA_ARGS__); })
