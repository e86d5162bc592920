// Grouped-matmul forward for decoding: groups of a few rows, the time bound by reading the expert
// weights. Each CTA streams a slice of one expert's weights with 16-byte loads and multiplies the
// group's rows (up to R at a time). float32 / bfloat16 / float16, sm_80+.
#include "grouped_mm/gmm_launch.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

// ================================================================================================
// decode GEMV: a few rows per group, time bound by reading the expert weights
//
// Work item = (group, chunk of up to R rows, slice of columns), scheduled like the GEMM tiles
// (bm = R). Every item streams its slice of b[g] exactly once with 16-byte loads that bypass L1,
// while the group's rows of a (small, shared by all warps) are read through L1.

constexpr int kGemvThreads = 256;

// Walks this CTA's work items (up to R rows of a group by NS columns from n0) and calls
// item(t, n0, nrows) for each; the items of the tail rows past offsets[-1] are zeroed here.
template <typename T, int R, int NS, typename Item>
__device__ __forceinline__ void for_each_item(const FwdParams<T>& p, int tid, Item&& item) {
  const int n_tiles = static_cast<int>((p.N + NS - 1) / NS);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, R, INT_MAX / 2, p.row_bounds, p.mtile_start);
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * NS;
    const int nrows = min(R, t.row_end - t.row_begin);
    if (t.g >= p.E) {  // tail rows: zeros
      for (int i = tid; i < R * NS; i += kGemvThreads) {
        const int r = i / NS, c = i % NS;
        if (r < nrows && n0 + c < p.N) p.out[(t.row_begin + r) * p.ldo + n0 + c] = detail::from_acc<T>(0.f);
      }
      continue;
    }
    item(t, n0, nrows);
  }
}

// transpose_b, b[g] is [N, K]: warp w owns NC columns; lanes split K in 16-byte pieces and the
// partial dot products are reduced with a fixed xor-shuffle tree.
template <typename T, int R, int NC>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_nk_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NS = (kGemvThreads / 32) * NC;  // columns per item
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for_each_item<T, R, NS>(p, tid, [&](const TileCoord& t, int64_t n0, int nrows) {
    const T* bg = p.b + static_cast<int64_t>(t.g) * p.K * p.N;
    const T* arow = p.a + static_cast<int64_t>(t.row_begin) * p.lda;
    const int64_t c0 = n0 + warp * NC;
    float acc[R][NC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j) acc[r][j] = 0.f;

    auto fma_step = [&](const uint4 (&bv)[NC], int64_t k) {
      float bf[NC][VEC];
#pragma unroll
      for (int j = 0; j < NC; ++j) detail::unpack16(bv[j], bf[j], static_cast<T*>(nullptr));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          float af[VEC];
          detail::unpack16(detail::ld_nc16(arow + r * p.lda + k), af, static_cast<T*>(nullptr));
#pragma unroll
          for (int j = 0; j < NC; ++j)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[r][j] = fmaf(af[v], bf[j][v], acc[r][j]);
        }
      }
    };
    const uint4 zero = make_uint4(0, 0, 0, 0);
    int64_t k = static_cast<int64_t>(lane) * VEC;
    // two steps per iteration: 2 * NC independent 16-byte weight loads in flight per lane
    for (; k + 32 * VEC < p.K; k += 64 * VEC) {
      uint4 b0[NC], b1[NC];
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const bool ok = c0 + j < p.N;
        b0[j] = ok ? detail::ld_stream16(bg + (c0 + j) * p.K + k) : zero;
        b1[j] = ok ? detail::ld_stream16(bg + (c0 + j) * p.K + k + 32 * VEC) : zero;
      }
      fma_step(b0, k);
      fma_step(b1, k + 32 * VEC);
    }
    if (k < p.K) {
      uint4 b0[NC];
#pragma unroll
      for (int j = 0; j < NC; ++j) b0[j] = c0 + j < p.N ? detail::ld_stream16(bg + (c0 + j) * p.K + k) : zero;
      fma_step(b0, k);
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], off);
    // lane r * NC + j writes (row r, column c0 + j); compile-time indices keep acc in registers
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        if (lane == r * NC + j && r < nrows && c0 + j < p.N) {
          const float bj = p.bias != nullptr ? p.bias[static_cast<int64_t>(t.g) * p.N + c0 + j] : 0.f;
          p.out[(t.row_begin + r) * p.ldo + c0 + j] = detail::from_acc<T>(acc[r][j] + bj);
        }
      }
  });
#endif
}

// b[g] is [K, N]: thread (kk, nn) owns VEC columns n0 + nn * VEC and the k's congruent to kk
// modulo 64; partial sums are reduced with xor shuffles inside the warp, then across the eight
// warps in warp order through shared memory.
template <typename T, int R>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kn_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TN = 4;                   // threads along n: 4 x 16 B = 64 contiguous bytes per k
  constexpr int NS = TN * VEC;            // columns per item
  constexpr int TK = kGemvThreads / TN;   // k stride
  constexpr int kWarps = kGemvThreads / 32;
  __shared__ float s_red[kWarps][R][NS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kk = tid / TN, nn = tid % TN;
  for_each_item<T, R, NS>(p, tid, [&](const TileCoord& t, int64_t n0, int nrows) {
    const T* bg = p.b + static_cast<int64_t>(t.g) * p.K * p.N;
    const T* arow = p.a + static_cast<int64_t>(t.row_begin) * p.lda;
    const int64_t col = n0 + nn * VEC;
    const bool col_ok = col < p.N;
    float acc[R][VEC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = 0.f;

    auto fma_step = [&](const uint4& bv, int64_t k) {
      float bf[VEC];
      detail::unpack16(bv, bf, static_cast<T*>(nullptr));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          const float av = detail::to_acc(__ldg(arow + r * p.lda + k));
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(av, bf[v], acc[r][v]);
        }
      }
    };
    const uint4 zero = make_uint4(0, 0, 0, 0);
    int64_t k = kk;
    // U k rows per iteration: U independent 16-byte weight loads in flight per thread (U = 2 for
    // R = 8, whose 64 accumulators leave fewer registers under the 128 of two CTAs per SM)
    constexpr int U = R >= 8 ? 2 : 4;
    for (; k + (U - 1) * TK < p.K; k += U * TK) {
      uint4 bv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) bv[u] = col_ok ? detail::ld_stream16(bg + (k + u * TK) * p.N + col) : zero;
#pragma unroll
      for (int u = 0; u < U; ++u) fma_step(bv[u], k + u * TK);
    }
    for (; k < p.K; k += TK) {
      const uint4 bv = col_ok ? detail::ld_stream16(bg + k * p.N + col) : zero;
      fma_step(bv, k);
    }
    // lanes nn + 4 * x (x = 0..7) of a warp share columns: reduce over x
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float s = acc[r][v];
        s += __shfl_xor_sync(0xffffffffu, s, 4);
        s += __shfl_xor_sync(0xffffffffu, s, 8);
        s += __shfl_xor_sync(0xffffffffu, s, 16);
        acc[r][v] = s;
      }
    if (lane < TN) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < VEC; ++v) s_red[warp][r][lane * VEC + v] = acc[r][v];
    }
    __syncthreads();
    for (int i = tid; i < R * NS; i += kGemvThreads) {
      const int r = i / NS, c = i % NS;
      if (r < nrows && n0 + c < p.N) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += s_red[w][r][c];
        if (p.bias != nullptr) s += p.bias[static_cast<int64_t>(t.g) * p.N + n0 + c];
        p.out[(t.row_begin + r) * p.ldo + n0 + c] = detail::from_acc<T>(s);
      }
    }
    __syncthreads();
  });
#endif
}

template <typename T, int R>
cudaError_t launch_gemv_r(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  if (p.transpose_b) {
    constexpr int NC = 4;
    constexpr int NS = (kGemvThreads / 32) * NC;
    return launch_persistent<T, gemv_nk_kernel<T, R, NC>>(p, dev, ws, stream, R, ceil_div(p.N, NS), kGemvThreads,
                                                          0);
  }
  constexpr int NS = 4 * (16 / sizeof(T));
  return launch_persistent<T, gemv_kn_kernel<T, R>>(p, dev, ws, stream, R, ceil_div(p.N, NS), kGemvThreads, 0);
}

template <typename T>
cudaError_t launch_gemv(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  switch (gemv_rows(p.M, p.E)) {
    case 1:
      return launch_gemv_r<T, 1>(p, dev, ws, stream);
    case 2:
      return launch_gemv_r<T, 2>(p, dev, ws, stream);
    case 4:
      return launch_gemv_r<T, 4>(p, dev, ws, stream);
    default:
      return launch_gemv_r<T, 8>(p, dev, ws, stream);
  }
}

}  // namespace

cudaError_t gemv_forward(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (!std::is_same<T, double>::value) {
      return launch_gemv<T>(p, dev, ws, stream);
    } else {
      return cudaErrorInvalidValue;  // no float64 GEMV
    }
  });
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
