// Tile scheduling of the grouped-matmul kernels: the block scans of the schedule kernel
// (gmm_schedule.cu), the map from a linear tile id to its (group, m-tile, n-tile) that the
// persistent forward kernels use, the per-group row bounds of the gradient kernels, and the host's
// tile-count bounds. Plain CUDA C++, no torch headers.
#pragma once

#include <climits>
#include <cstdint>

#include "grouped_mm/gmm_common.cuh"
#include "grouped_mm/grouped_mm_cuda.h"

namespace moestream {
namespace gmm {
namespace detail {

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

constexpr int kBand = 8;  // M-tiles per raster band (see decode_tile)

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

// Upper bound of the M-tiles of all groups (the tail included): sum_g ceil(m_g / bm) <= M / bm + E + 1.
inline int64_t max_mtiles(int64_t M, int64_t E, int bm) { return M / bm + E + 1; }

inline bool tiles_fit(int64_t M, int64_t E, int bm, int64_t n_tiles) {
  return max_mtiles(M, E, bm) * n_tiles < static_cast<int64_t>(INT_MAX);
}

// Runs the schedule kernel for `bm`-row tiles: ws[0 .. E + 2) = row_bounds, ws[E + 2 ..) =
// mtile_start (forward_workspace_ints(E) ints). Asynchronous on `stream`.
cudaError_t run_schedule(const ForwardArgs& p, int bm, int* ws, cudaStream_t stream);

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
