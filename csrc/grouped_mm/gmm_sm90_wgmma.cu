// Grouped-matmul forward on sm_90a warpgroup MMA (wgmma), bfloat16 / float16. Not yet validated on
// hardware, so compiled only when the build asks for it (CMake option MOESTREAM_GMM_WGMMA, which
// defines MOESTREAM_GMM_WGMMA=1; scripts/check_cuda_compile.sh always compiles it), and chosen only
// when the tuning key gmm_impl="wgmma" asks for it.
#include "grouped_mm/gmm_launch.cuh"

#if MOESTREAM_GMM_WGMMA
#include "grouped_mm/gmm_sm80_mma.cuh"
#include "grouped_mm/gmm_sm90_wgmma.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

// ================================================================================================
// sm_90a warpgroup-MMA (wgmma) forward
//
// 128 x 256 x 64 tiles, two warpgroups (rows 0-63 and 64-127 of the tile), four cp.async stages
// (48 KiB each), one CTA per SM, persistent over the same tile list. Both operands are read by
// wgmma straight from shared memory through descriptors: A (rows of a) and, with transpose_b, B
// ([N, K]) are K-major, stored exactly as the mma.sync kernel's RC stages (the canonical 128B
// swizzle); B of [E, K, N] is N-major, stored in panels of 64 columns. Per k-tile: wait for its
// copies, fence them to the async proxy, barrier, issue the four k16 wgmmas, then issue the copies
// of k-tile + 3 into the stage the previous k-tile used (every warpgroup has waited for its wgmmas
// on it before the barrier) while the wgmmas run, then wait for them. No mbarriers or TMA: nothing
// can deadlock on a malformed shape.
struct WgmmaCfg {
  static constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, kThreads = 256;
  static constexpr int kABytes = BM * BK * 2, kBBytes = BN * BK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kLdc = BN + 8;
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kSmemBytes = (kPipeBytes > BM * kLdc * 2 ? kPipeBytes : BM * kLdc * 2) + 1024;  // + alignment
};

template <typename T, bool B_RC>
__global__ void __launch_bounds__(WgmmaCfg::kThreads, 1) wgmma_forward_kernel(FwdParams<T> p) {
#if MS_GMM_HAS_WGMMA
  using C = WgmmaCfg;
  constexpr int NACC = C::BN / 2;  // accumulators per thread: 64 x 256 per warpgroup / 128 threads
  extern __shared__ char smem_raw[];
  // 128B-swizzled tiles must start on 1024-byte boundaries
  const uint32_t raw = detail::smem_u32(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  char* smem = smem_raw + (s0 - raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wq = warp & 3;
  const int n_tiles = static_cast<int>((p.N + C::BN - 1) / C::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  const int K32 = static_cast<int>(p.K);
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, C::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;
    const int n0 = t.n_tile * C::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    const int num_k = real ? (K32 + C::BK - 1) / C::BK : 0;
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

    Loader<T, true, C::BM, C::kThreads> la(A, 0, tid);
    Loader<T, B_RC, C::BN, C::kThreads, !B_RC> lb(B, 0, tid);
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < num_k) {
        la.load_and_advance(s0 + s * C::kStageBytes, K32);
        lb.load_and_advance(s0 + s * C::kStageBytes + C::kABytes, K32);
      }
      detail::cp_async_commit();
    }
    int read_stage = 0, write_stage = C::STAGES - 1;
    for (int kt = 0; kt < num_k; ++kt) {
      detail::cp_async_wait<C::STAGES - 2>();
      detail::fence_proxy_async_smem();
      __syncthreads();
      const uint32_t sa = s0 + read_stage * C::kStageBytes + wg * (64 * 128);  // this warpgroup's 64 rows
      const uint32_t sb = s0 + read_stage * C::kStageBytes + C::kABytes;
      detail::wgmma_fence();
#pragma unroll
      for (int j = 0; j < C::BK / 16; ++j) {
        const uint64_t da = detail::wgmma_desc(sa + j * 32, 16, 1024);
        const uint64_t db = B_RC ? detail::wgmma_desc(sb + j * 32, 16, 1024)
                                 : detail::wgmma_desc(sb + j * (16 * 128), 64 * 128, 1024);
        detail::wgmma_ss<T, C::BN, B_RC ? 0 : 1>(acc, da, db);
      }
      detail::wgmma_commit();
      if (kt + C::STAGES - 1 < num_k) {
        la.load_and_advance(s0 + write_stage * C::kStageBytes, K32);
        lb.load_and_advance(s0 + write_stage * C::kStageBytes + C::kABytes, K32);
      }
      detail::cp_async_commit();
      detail::wgmma_wait<0>();
      detail::fence_regs(acc);
      read_stage = read_stage == C::STAGES - 1 ? 0 : read_stage + 1;
      write_stage = write_stage == C::STAGES - 1 ? 0 : write_stage + 1;
    }
    detail::cp_async_wait<0>();
    __syncthreads();

    // epilogue: fragments (+ bias) -> padded staging tile -> 16-byte stores
    const float* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    const int N32 = static_cast<int>(p.N);
    T* sc = reinterpret_cast<T*>(smem);
    const int r = wg * 64 + wq * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < C::BN / 8; ++j) {
      const int c = j * 8 + (lane & 3) * 2;
      float b0 = 0.f, b1 = 0.f;
      if (bias != nullptr && n0 + c < N32) {
        const float2 bb = __ldg(reinterpret_cast<const float2*>(bias + n0 + c));
        b0 = bb.x;
        b1 = bb.y;
      }
      *reinterpret_cast<uint32_t*>(sc + r * C::kLdc + c) = detail::pack2<T>(acc[4 * j] + b0, acc[4 * j + 1] + b1);
      *reinterpret_cast<uint32_t*>(sc + (r + 8) * C::kLdc + c) =
          detail::pack2<T>(acc[4 * j + 2] + b0, acc[4 * j + 3] + b1);
    }
    __syncthreads();
    constexpr int kCpr = C::BN / 8;
#pragma unroll 4
    for (int i = tid; i < C::BM * kCpr; i += C::kThreads) {
      const int rr = i / kCpr, cc = i % kCpr;
      const int gr = t.row_begin + rr, gc = n0 + cc * 8;
      if (gr < t.row_end && gc < N32)
        *reinterpret_cast<uint4*>(p.out + static_cast<int64_t>(gr) * p.ldo + gc) =
            *reinterpret_cast<const uint4*>(sc + rr * C::kLdc + cc * 8);
    }
    __syncthreads();
  }
#else
  // Built without sm_90a code: the host never selects this kernel (it checks the binary version).
  __trap();
#endif
}

template <typename T>
cudaError_t launch_wgmma(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  using C = WgmmaCfg;
  const int64_t n_tiles = ceil_div(p.N, C::BN);
  if (p.transpose_b)
    return launch_persistent<T, wgmma_forward_kernel<T, true>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads,
                                                               C::kSmemBytes);
  return launch_persistent<T, wgmma_forward_kernel<T, false>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads,
                                                              C::kSmemBytes);
}

}  // namespace

// Whether the wgmma kernel can run on the current device: compute capability 9.0 and a binary
// built for sm_90a (a build without it would run the kernel's stub). Cached per device.
bool wgmma_available(const Device& dev) {
  if (dev.cc_major != 9 || dev.cc_minor != 0) return false;
  static std::atomic<int> cached{-1};
  int v = cached.load();
  if (v < 0) {
    cudaFuncAttributes attr{};
    v = (cudaFuncGetAttributes(&attr, wgmma_forward_kernel<__nv_bfloat16, true>) == cudaSuccess &&
         attr.binaryVersion >= 90)
            ? 1
            : 0;
    cudaGetLastError();  // a failed query must not leak into the next launch check
    cached.store(v);
  }
  return v == 1;
}

cudaError_t wgmma_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (sizeof(T) == 2) {
      return launch_wgmma<T>(p, dev, ws, stream);
    } else {
      return cudaErrorInvalidValue;  // bfloat16 / float16 only
    }
  });
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
#endif  // MOESTREAM_GMM_WGMMA
