// Host side shared by the launchers of the grouped-matmul kernel families: per-kernel launch state,
// persistent grids over the tile schedule, per-group grids, and the entry point of each family that
// grouped_mm_cuda.cu dispatches to. Plain CUDA C++, no torch headers.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>

#include "grouped_mm/gmm_common.cuh"
#include "grouped_mm/gmm_schedule.cuh"
#include "grouped_mm/grouped_mm_cuda.h"

namespace moestream {
namespace gmm {
namespace detail {

// Per-kernel launch state: whether the dynamic shared-memory limit was raised on a device, and the
// occupancy (blocks per SM) that sizes persistent grids.
template <auto Kernel>
struct KernelState {
  static std::atomic<unsigned long long> attr_set;
  static std::atomic<int> occupancy;
};
template <auto Kernel>
std::atomic<unsigned long long> KernelState<Kernel>::attr_set{0};
template <auto Kernel>
std::atomic<int> KernelState<Kernel>::occupancy{0};

template <auto Kernel>
cudaError_t prepare(int threads, int smem, int* blocks_per_sm) {
  if (smem > 48 * 1024) {
    int dev = 0;
    MS_CUDA_TRY(cudaGetDevice(&dev));
    const unsigned long long bit = dev < 64 ? (1ull << dev) : 0ull;
    if (bit == 0 || !(KernelState<Kernel>::attr_set.load() & bit)) {
      MS_CUDA_TRY(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      KernelState<Kernel>::attr_set.fetch_or(bit);
    }
  }
  if (blocks_per_sm != nullptr) {
    int occ = KernelState<Kernel>::occupancy.load();
    if (occ == 0) {
      MS_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, Kernel, threads, smem));
      occ = occ < 1 ? 1 : occ;
      KernelState<Kernel>::occupancy.store(occ);
    }
    *blocks_per_sm = occ;
  }
  return cudaSuccess;
}

inline int elem_size(FloatKind d) {
  switch (d) {
    case FloatKind::kFloat64:
      return 8;
    case FloatKind::kFloat32:
      return 4;
    default:
      return 2;
  }
}

template <typename T>
FwdParams<T> fwd_params(const ForwardArgs& p, const int* ws) {
  FwdParams<T> k;
  k.a = static_cast<const T*>(p.a);
  k.lda = p.lda;
  k.b = static_cast<const T*>(p.b);
  k.bias = static_cast<const acc_t<T>*>(p.bias);
  k.out = static_cast<T*>(p.out);
  k.ldo = p.ldo;
  k.N = p.N;
  k.K = p.K;
  k.E = static_cast<int>(p.E);
  k.row_bounds = ws;
  k.mtile_start = ws + p.E + 2;
  return k;
}

// Schedules with `bm`-row tiles and launches `Kernel` on a persistent grid of at most
// sm_count * occupancy CTAs (never more than the tile bound).
template <typename T, auto Kernel>
cudaError_t launch_persistent(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream, int bm,
                              int64_t n_tiles, int threads, int smem) {
  int occ = 1;
  MS_CUDA_TRY(prepare<Kernel>(threads, smem, &occ));
  MS_CUDA_TRY(run_schedule(p, bm, ws, stream));
  const int64_t bound = max_mtiles(p.M, p.E, bm) * n_tiles;
  int64_t grid = static_cast<int64_t>(dev.sm_count > 0 ? dev.sm_count : 1) * occ;
  grid = grid < bound ? grid : bound;
  if (grid < 1) grid = 1;
  Kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(fwd_params<T>(p, ws));
  return cudaGetLastError();
}

inline int gemv_rows(int64_t M, int64_t E) {
  const int64_t avg = ceil_div(M, E > 0 ? E : 1);
  return avg <= 1 ? 1 : avg <= 2 ? 2 : avg <= 4 ? 4 : 8;
}

// ---- weight gradient ----------------------------------------------------------------------------

template <typename T>
WgParams<T> wg_params(const WeightGradArgs& p) {
  WgParams<T> k;
  // non-transposed: out [K, N] = a^T dy; transpose_b: out [N, K] = dy^T a
  k.pa = static_cast<const T*>(p.transpose_b ? p.dy : p.a);
  k.lda = p.transpose_b ? p.ldd : p.lda;
  k.pb = static_cast<const T*>(p.transpose_b ? p.a : p.dy);
  k.ldb = p.transpose_b ? p.lda : p.ldd;
  k.out = static_cast<T*>(p.out);
  k.offsets = p.offsets;
  k.i64 = p.offsets_int64;
  k.M = p.M;
  k.MO = p.transpose_b ? p.N : p.K;
  k.NO = p.transpose_b ? p.K : p.N;
  k.g_base = 0;
  return k;
}

constexpr int64_t kMaxGridY = 65535;

template <typename T, auto Kernel>
cudaError_t launch_per_group(WgParams<T> k, int64_t E, int64_t tiles, int threads, int smem, cudaStream_t stream) {
  if (tiles > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  MS_CUDA_TRY(prepare<Kernel>(threads, smem, nullptr));
  for (int64_t g0 = 0; g0 < E; g0 += kMaxGridY) {
    k.g_base = g0;
    const int64_t ng = E - g0 < kMaxGridY ? E - g0 : kMaxGridY;
    Kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ng)), threads, smem, stream>>>(k);
    MS_CUDA_LAUNCH_CHECK();
  }
  return cudaSuccess;
}

// ---- the kernel families ------------------------------------------------------------------------
// Each takes the arguments of grouped_mm_forward / grouped_mm_weight_grad / grouped_bias_grad as
// chosen by grouped_mm_cuda.cu (dtype, alignment, device already checked for the family) and
// returns the first CUDA error of its launches.

// gmm_simt.cu: every dtype, any shape and alignment.
cudaError_t simt_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream);
// gmm_sm80_mma.cu: bfloat16 / float16, 16-byte aligned, sm_80+; 64-row tiles when small_tile.
cudaError_t mma_forward(const ForwardArgs& p, bool small_tile, const Device& dev, int* ws, cudaStream_t stream);
// gmm_gemv.cu: float32 / bfloat16 / float16, 16-byte aligned, sm_80+, a few rows per group.
cudaError_t gemv_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream);
#if MOESTREAM_GMM_WGMMA
// gmm_sm90_wgmma.cu (compiled only with MOESTREAM_GMM_WGMMA): bfloat16 / float16, 16-byte aligned,
// on a device where wgmma_available().
cudaError_t wgmma_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream);
bool wgmma_available(const Device& dev);
#endif
// gmm_wgrad.cu: impl is kMma (bfloat16 / float16, aligned, sm_80+) or kSimt.
cudaError_t weight_grad(const WeightGradArgs& p, Impl impl, cudaStream_t stream);
cudaError_t bias_grad(const BiasGradArgs& p, cudaStream_t stream);

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
