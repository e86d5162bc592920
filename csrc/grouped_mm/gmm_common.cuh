// Device helpers of the grouped-matmul kernels: element conversions, the sm_80 PTX wrappers
// (cp.async, ldmatrix, mma.sync), block scans and the device-side tile scheduler. Plain CUDA C++,
// no torch headers; included only by grouped_mm_cuda.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace moestream {
namespace gmm {
namespace detail {

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
// sm_80 tensor-core PTX (also valid on sm_90). Callers are compiled only where __CUDA_ARCH__ >= 800.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// d += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ----------------------------------------------------------------------------------------------
// block scans (blockDim.x == 1024: exactly 32 warps)

struct OpMax {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};
struct OpAdd {
  __device__ __forceinline__ int operator()(int a, int b) const { return a + b; }
};

// Inclusive scan over the 1024 threads of the block; s_warp holds 32 ints. Ends with a barrier so
// s_warp can be reused by the next call.
template <typename Op>
__device__ __forceinline__ int block_inclusive_scan_1024(int v, Op op, int* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v = op(v, n);
  }
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = s_warp[lane];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w = op(w, n);
    }
    s_warp[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v = op(v, s_warp[warp - 1]);
  __syncthreads();
  return v;
}

// ----------------------------------------------------------------------------------------------
// tile scheduling
//
// The schedule kernel turns offsets (on the device) into two int32 arrays of E + 2 entries:
//   row_bounds[g]     start row of group g; row_bounds[g + 1] its end. Group E is the "tail":
//                     rows [offsets[-1], M), which the forward kernels fill with zeros.
//   mtile_start[g]    number of M-tiles (of `bm` rows) of the groups before g; mtile_start[E + 1]
//                     is the total.
// Offsets are clamped on the device (running maximum, then into [0, M]) so that malformed offsets
// can only give wrong groups, never out-of-bounds accesses. The host never reads them (no sync).

struct TileCoord {
  int g;          // group (E = tail)
  int m_tile;     // M-tile inside the group
  int n_tile;     // N-tile
  int row_begin;  // first row of the tile
  int row_end;    // end of the group's rows (the tile covers [row_begin, min(row_begin + bm, row_end)))
};

// Maps a linear tile id to its tile. Tiles of one group are contiguous; inside a group they are
// ordered in bands of `band` M-tiles: band-major, then N-tile, then M-tile, so that the CTAs that run
// at the same time share B panels (the expert weights) and a band of A rows in L2.
__device__ __forceinline__ TileCoord decode_tile(int tile, int n_tiles, int E, int bm, int band,
                                                 const int* __restrict__ row_bounds,
                                                 const int* __restrict__ mtile_start) {
  const int mt_lin = tile / n_tiles;
  int lo = 0, hi = E;  // largest g in [0, E] with mtile_start[g] <= mt_lin
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(mtile_start + mid) <= mt_lin)
      lo = mid;
    else
      hi = mid - 1;
  }
  TileCoord t;
  t.g = lo;
  const int first = __ldg(mtile_start + lo);
  const int mt_g = __ldg(mtile_start + lo + 1) - first;
  const int64_t loc = static_cast<int64_t>(tile) - static_cast<int64_t>(first) * n_tiles;
  const int64_t band_tiles = static_cast<int64_t>(band) * n_tiles;
  const int b = static_cast<int>(loc / band_tiles);
  const int rem = static_cast<int>(loc - b * band_tiles);
  const int h = min(band, mt_g - b * band);
  t.n_tile = rem / h;
  t.m_tile = b * band + rem % h;
  t.row_begin = __ldg(row_bounds + lo) + t.m_tile * bm;
  t.row_end = __ldg(row_bounds + lo + 1);
  return t;
}

// Start and end rows of group g straight from offsets (weight and bias gradients: one CTA per
// group, so no scan is needed). Clamped into [0, M] and end >= start, which keeps every access in
// bounds whatever the offsets hold.
__device__ __forceinline__ void group_rows(const void* offsets, bool i64, int64_t g, int64_t M, int64_t& start,
                                           int64_t& end) {
  int64_t s = g > 0 ? load_offset(offsets, i64, g - 1) : 0;
  int64_t e = load_offset(offsets, i64, g);
  s = s < 0 ? 0 : (s > M ? M : s);
  e = e < s ? s : (e > M ? M : e);
  start = s;
  end = e;
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
