// Plain types shared by every kernel: the CPU kernels, the CUDA kernel launchers (*.cu, no torch
// headers) and their torch glue (*_cuda.cpp). Free of CUDA and torch includes so that all of them
// can include it.
#pragma once

namespace moestream {

// Floating dtype of a tensor handed to a CUDA launcher; the glue maps at::ScalarType onto it
// (float_kind() in common/checks.h) and the launcher dispatches on it (dev::dispatch_float).
enum class FloatKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Gated activations: swiglu = silu(gate) * up; geglu = gelu(gate) * up (erf form); gptoss =
// gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(+-limit) + 1).
enum class ActKind : int { kSwiglu = 0, kGeglu = 1, kGptoss = 2 };
// Where gate and up sit in the last dimension: [gate | up] halves, or alternating (g0, u0, g1, ...).
enum class ActLayout : int { kConcat = 0, kInterleaved = 1 };

// Accumulation type of every kernel, CPU and CUDA: float64 for float64 data, float32 for float32,
// bfloat16 and float16.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace moestream
