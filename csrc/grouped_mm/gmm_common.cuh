// Device helpers shared by the grouped-matmul kernel families (gmm_*.cu): element conversions,
// 16-byte loads, and the operand and parameter structs the kernels take. Plain CUDA C++, no torch
// headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace moestream {
namespace gmm {
namespace detail {

// host helpers of common/cuda_utils.cuh the launchers use
using dev::ceil_div;
using dev::dispatch_float;
using dev::is_aligned16;

// ----------------------------------------------------------------------------------------------
// element types: acc_t (common/types.h), to_acc / from_acc (common/cuda_utils.cuh)

using dev::from_acc;
using dev::to_acc;

// Two floats -> one 32-bit register holding two 16-bit values (low half = first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A 16-byte vector of T unpacked to floats: 8 values for 16-bit types, 4 for float.
template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack16(const uint4& v, float (&f)[8], __nv_bfloat16*) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 -> f32 is a 16-bit left shift of the bit pattern: exact and two integer ops.
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack16(const uint4& v, float (&f)[8], __half*) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    float2 p = __half22float2(h);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& v, float (&f)[4], float*) {
  f[0] = __uint_as_float(v.x);
  f[1] = __uint_as_float(v.y);
  f[2] = __uint_as_float(v.z);
  f[3] = __uint_as_float(v.w);
}

// ----------------------------------------------------------------------------------------------
// loads

// Read-only 16-byte load that does not allocate in L1: for data streamed once (expert weights).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  // not volatile: the weights are read-only during the kernel, so the compiler may hoist and batch
  // these loads for more bytes in flight
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Read-only 16-byte load through L1 (data reused by other warps of the block: activations).
__device__ __forceinline__ uint4 ld_nc16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ int64_t load_offset(const void* offsets, bool i64, int64_t g) {
  return i64 ? __ldg(static_cast<const long long*>(offsets) + g)
             : static_cast<int64_t>(__ldg(static_cast<const int*>(offsets) + g));
}

// ----------------------------------------------------------------------------------------------
// operands
//
// A tile operand: element (o, k) of the "outer" dimension o (rows of the output tile for A, columns
// for B) and the reduction dimension k. Reduction-contiguous (RC): ptr[o * ld + k]; outer-contiguous:
// ptr[k * ld + o]. The forward's A is RC; its B is RC when transpose_b ([E, N, K]) and
// outer-contiguous otherwise ([E, K, N]). Both operands of the weight gradient are
// outer-contiguous (the reduction runs over rows of a and dy).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
  int64_t o_begin;  // tile origin along o
  int64_t o_end;    // bound along o (exclusive)
};

template <typename T>
struct FwdParams {
  const T* a;
  int64_t lda;
  const T* b;
  const acc_t<T>* bias;
  T* out;
  int64_t ldo;
  int64_t N, K;
  int E;
  const int* row_bounds;
  const int* mtile_start;
};

// Weight gradient: out[g] ([MO, NO], dense) = sum over rows r of group g of A[r, :]^T B[r, :], where
// A = pa [M, MO] (ld lda) and B = pb [M, NO] (ld ldb). Non-transposed: A = a, B = dy (out [K, N]);
// transpose_b: A = dy, B = a (out [N, K]).
template <typename T>
struct WgParams {
  const T* pa;
  int64_t lda;
  const T* pb;
  int64_t ldb;
  T* out;
  const void* offsets;
  bool i64;
  int64_t M, MO, NO;
  int64_t g_base;  // first group of this launch (gridDim.y is limited to 65535)
};

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
