// Weight and bias gradients of the grouped matmul: one CTA per output tile (or column block) and
// group, reducing the group's rows in order: deterministic. Tensor cores (gmm_sm80_mma.cuh) for
// bfloat16 / float16 when aligned, the SIMT GEMM (gmm_simt.cuh) otherwise.
#include "grouped_mm/gmm_launch.cuh"
#include "grouped_mm/gmm_simt.cuh"
#include "grouped_mm/gmm_sm80_mma.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

// The output tile of this CTA: group g = g_base + blockIdx.y, the BM x BN tile blockIdx.x of its
// [MO, NO] block (column-major over tiles), and the group's rows [start, end). I: the index type the
// kernel keeps m0 and n0 in.
template <typename I, typename T>
struct WgTile {
  int64_t g, start, end;
  I m0, n0;
  Operand<T> A, B;
};

template <typename I, int BM, int BN, typename T>
__device__ __forceinline__ WgTile<I, T> wgrad_tile(const WgParams<T>& p) {
  WgTile<I, T> w;
  w.g = p.g_base + blockIdx.y;
  const int tiles_m = static_cast<int>((p.MO + BM - 1) / BM);
  w.m0 = static_cast<I>(blockIdx.x % tiles_m) * BM;
  w.n0 = static_cast<I>(blockIdx.x / tiles_m) * BN;
  detail::group_rows(p.offsets, p.i64, w.g, p.M, w.start, w.end);
  w.A = Operand<T>{p.pa, p.lda, w.m0, p.MO};
  w.B = Operand<T>{p.pb, p.ldb, w.n0, p.NO};
  return w;
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) mma_wgrad_kernel(WgParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) char smem[];
  const WgTile<int, T> w = wgrad_tile<int, Cfg::BM, Cfg::BN>(p);
  float acc[Cfg::MI][Cfg::NI][4];
  mma_zero<Cfg>(acc);
  mma_mainloop<T, Cfg, false, false>(acc, smem, w.A, w.B, w.start, w.end);
  mma_epilogue<T, Cfg>(acc, smem, p.out + w.g * p.MO * p.NO, p.NO, w.m0, static_cast<int>(p.MO), w.n0,
                       static_cast<int>(p.NO), nullptr);
#endif
}

template <typename T>
__global__ void __launch_bounds__(SimtCfg<T>::kThreads, 2) simt_wgrad_kernel(WgParams<T> p) {
  using C = SimtCfg<T>;
  const WgTile<int64_t, T> w = wgrad_tile<int64_t, C::BM, C::BN>(p);
  acc_t<T> acc[C::TM][C::TN];
  simt_zero<T>(acc);
  simt_mainloop<T, false, false>(acc, w.A, w.B, w.start, w.end);
  simt_epilogue<T>(acc, p.out + w.g * p.MO * p.NO, p.NO, w.m0, p.MO, w.n0, p.NO, nullptr);
}

// ================================================================================================
// bias gradient: out[g, n] = sum over the group's rows of dy[r, n]. Block (32, 8): column
// blockIdx.x * 32 + threadIdx.x, rows strided by 8, then the 8 partials summed in order.

template <typename T>
__global__ void __launch_bounds__(256) bias_grad_kernel(const T* __restrict__ dy, int64_t ldd,
                                                        const void* __restrict__ offsets, bool i64, T* __restrict__ out,
                                                        int64_t M, int64_t N, int64_t g_base) {
  using Acc = acc_t<T>;
  __shared__ Acc red[8][33];
  const int64_t g = g_base + blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  int64_t start, end;
  detail::group_rows(offsets, i64, g, M, start, end);
  Acc s = 0;
  if (col < N)
    for (int64_t r = start + threadIdx.y; r < end; r += 8) s += detail::to_acc(__ldg(dy + r * ldd + col));
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    Acc total = red[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < 8; ++y) total += red[y][threadIdx.x];
    out[g * N + col] = detail::from_acc<T>(total);
  }
}

template <typename T>
cudaError_t weight_grad_typed(const WeightGradArgs& p, Impl impl, cudaStream_t stream) {
  const WgParams<T> k = wg_params<T>(p);
  if constexpr (sizeof(T) == 2) {
    if (impl == Impl::kMma) {
      using Cfg = CfgLarge;
      const int64_t tiles = ceil_div(k.MO, Cfg::BM) * ceil_div(k.NO, Cfg::BN);
      return launch_per_group<T, mma_wgrad_kernel<T, Cfg>>(k, p.E, tiles, Cfg::kThreads, Cfg::kSmemBytes, stream);
    }
  }
  using C = SimtCfg<T>;
  const int64_t tiles = ceil_div(k.MO, C::BM) * ceil_div(k.NO, C::BN);
  return launch_per_group<T, simt_wgrad_kernel<T>>(k, p.E, tiles, C::kThreads, 0, stream);
}

}  // namespace

cudaError_t weight_grad(const WeightGradArgs& p, Impl impl, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    return weight_grad_typed<T>(p, impl, stream);
  });
}

cudaError_t bias_grad(const BiasGradArgs& p, cudaStream_t stream) {
  if (p.E <= 0 || p.N <= 0) return cudaSuccess;
  const int64_t col_blocks = ceil_div(p.N, 32);
  if (col_blocks > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  auto run = [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t g0 = 0; g0 < p.E; g0 += kMaxGridY) {
      const int64_t ng = p.E - g0 < kMaxGridY ? p.E - g0 : kMaxGridY;
      bias_grad_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ng)), dim3(32, 8), 0,
                            stream>>>(static_cast<const T*>(p.dy), p.ldd, p.offsets, p.offsets_int64,
                                      static_cast<T*>(p.out), p.M, p.N, g0);
      MS_CUDA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  };
  return dispatch_float(p.dtype, run);
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
