// Grouped-matmul forward on sm_80 tensor cores (bfloat16 / float16): persistent CTAs walking the
// tile list, cp.async multi-stage pipeline, ldmatrix from XOR-swizzled shared memory,
// mma.sync.m16n8k16 with fp32 accumulation, 16-byte stores through shared memory (the building
// blocks are in gmm_sm80_mma.cuh). Needs K, N and the leading dimensions to be multiples of 8
// elements and 16-byte aligned pointers.
#include "grouped_mm/gmm_launch.cuh"
#include "grouped_mm/gmm_sm80_mma.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

template <typename T, class Cfg, bool B_RC>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) mma_forward_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) char smem[];
  const int n_tiles = static_cast<int>((p.N + Cfg::BN - 1) / Cfg::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, Cfg::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;  // else: tail rows, written as zeros
    const int n0 = t.n_tile * Cfg::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    float acc[Cfg::MI][Cfg::NI][4];
    mma_zero<Cfg>(acc);
    mma_mainloop<T, Cfg, true, B_RC>(acc, smem, A, B, 0, real ? p.K : 0);
    const float* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    mma_epilogue<T, Cfg>(acc, smem, p.out, p.ldo, t.row_begin, t.row_end, n0, static_cast<int>(p.N), bias);
  }
#endif
}

template <typename T, class Cfg>
cudaError_t launch_mma(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(p.N, Cfg::BN);
  if (p.transpose_b)
    return launch_persistent<T, mma_forward_kernel<T, Cfg, true>>(p, dev, ws, stream, Cfg::BM, n_tiles,
                                                                  Cfg::kThreads, Cfg::kSmemBytes);
  return launch_persistent<T, mma_forward_kernel<T, Cfg, false>>(p, dev, ws, stream, Cfg::BM, n_tiles,
                                                                 Cfg::kThreads, Cfg::kSmemBytes);
}

}  // namespace

cudaError_t mma_forward(const ForwardArgs& p, bool small_tile, const Device& dev, int* ws, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (sizeof(T) == 2) {
      return small_tile ? launch_mma<T, CfgSmall>(p, dev, ws, stream) : launch_mma<T, CfgLarge>(p, dev, ws, stream);
    } else {
      return cudaErrorInvalidValue;  // bfloat16 / float16 only
    }
  });
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
