// Grouped-matmul forward on SIMT cores: persistent CTAs walking the tile list, each tile the
// shared-memory tiled FMA GEMM of gmm_simt.cuh. Every dtype, any shape and alignment.
#include "grouped_mm/gmm_launch.cuh"
#include "grouped_mm/gmm_simt.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

template <typename T, bool B_RC>
__global__ void __launch_bounds__(SimtCfg<T>::kThreads, 2) simt_forward_kernel(FwdParams<T> p) {
  using C = SimtCfg<T>;
  using Acc = acc_t<T>;
  const int n_tiles = static_cast<int>((p.N + C::BN - 1) / C::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, C::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * C::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    Acc acc[C::TM][C::TN];
    simt_zero<T>(acc);
    simt_mainloop<T, true, B_RC>(acc, A, B, 0, real ? p.K : 0);
    const Acc* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    simt_epilogue<T>(acc, p.out, p.ldo, t.row_begin, t.row_end, n0, p.N, bias);
  }
}

template <typename T>
cudaError_t launch_simt(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  using C = SimtCfg<T>;
  const int64_t n_tiles = ceil_div(p.N, C::BN);
  if (p.transpose_b)
    return launch_persistent<T, simt_forward_kernel<T, true>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads, 0);
  return launch_persistent<T, simt_forward_kernel<T, false>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads, 0);
}

}  // namespace

cudaError_t simt_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_simt<T>(p, dev, ws, stream);
  });
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
