// Plain types shared by the CUDA kernel launchers (*.cu, no torch headers) and their torch glue
// (*_cuda.cpp). Kept free of CUDA and torch includes so that both sides can include it.
#pragma once

namespace moestream {

// Floating dtype of a tensor handed to a launcher; the glue maps at::ScalarType onto it
// (float_kind() in common/cuda_check.h) and the launcher dispatches on it.
enum class FloatKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace moestream
