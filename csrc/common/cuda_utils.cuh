// Device-side helpers shared by moestream's CUDA kernels. Plain CUDA C++: no torch headers, so
// every *.cu file can be compiled by nvcc alone (scripts/check_cuda_compile.sh).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_error.h"
#include "common/types.h"

namespace moestream {
namespace dev {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- arithmetic type: acc_t<T> (common/types.h), float32 for every input dtype but float64 -------
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

// acc -> storage type, round to nearest even (as torch's casts do).
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

// Overloads so templated math picks the float or the double routine explicitly (no silent
// promotion of float math to double).
__device__ __forceinline__ float ms_exp(float x) { return expf(x); }
__device__ __forceinline__ double ms_exp(double x) { return exp(x); }
__device__ __forceinline__ float ms_log(float x) { return logf(x); }
__device__ __forceinline__ double ms_log(double x) { return log(x); }
__device__ __forceinline__ float ms_erf(float x) { return erff(x); }
__device__ __forceinline__ double ms_erf(double x) { return erf(x); }
__device__ __forceinline__ float ms_fmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double ms_fmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ bool ms_isnan(float x) { return isnan(x); }
__device__ __forceinline__ bool ms_isnan(double x) { return isnan(x); }
__device__ __forceinline__ bool ms_isinf(float x) { return isinf(x); }
__device__ __forceinline__ bool ms_isinf(double x) { return isinf(x); }

template <typename A>
__device__ __forceinline__ A ms_sigmoid(A x) {
  return A(1) / (A(1) + ms_exp(-x));
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// ---- 16-byte vector access -----------------------------------------------------------------------
// Vec<T> holds the 16 / sizeof(T) elements of one 16-byte access (8 bf16/fp16, 4 fp32, 2 fp64).
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  // one 128-bit load; p must be 16-byte aligned (callers check before choosing the vector path)
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Vec<T> out;
  memcpy(&out, &raw, 16);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& val) {
  uint4 raw;
  memcpy(&raw, &val, 16);
  *reinterpret_cast<uint4*>(p) = raw;
}

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- deterministic reductions ----------------------------------------------------------------------
// XOR butterflies: every lane ends with the same, bitwise identical value (a + b == b + a in IEEE),
// and the combination order depends only on the lane layout, never on timing.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// fmax ignores NaN and is symmetric, so all lanes agree.
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = ms_fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over a block of BLOCK threads (a multiple of 32, at most 1024) in a fixed tree order.
// `scratch` holds BLOCK / 32 values. Every thread receives the result.
template <int BLOCK, typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block_sum: bad block size");
  constexpr int kWarps = BLOCK / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = lane < kWarps ? scratch[lane] : A(0);
  return warp_sum(r);
}

// ---- host-side dtype dispatch ------------------------------------------------------------------------
// f is called with a null T* whose pointee type is the storage type:
//   dispatch_float(kind, [&](auto tag) { using T = std::remove_pointer_t<decltype(tag)>; ... });
template <typename F>
inline cudaError_t dispatch_float(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kFloat32:
      return f(static_cast<float*>(nullptr));
    case FloatKind::kFloat64:
      return f(static_cast<double*>(nullptr));
    case FloatKind::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case FloatKind::kFloat16:
      return f(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace dev
}  // namespace moestream
