// SIMT building blocks of the grouped-matmul kernels: shared-memory tiled FMA GEMM with register
// blocking for every dtype, shape and alignment (float32 in true float32, FFMA and never TF32;
// float64 in float64). Used by the SIMT forward (gmm_simt.cu) and weight gradient (gmm_wgrad.cu).
// Plain CUDA C++, no torch headers.
#pragma once

#include <cstdint>

#include "grouped_mm/gmm_common.cuh"

namespace moestream {
namespace gmm {
namespace detail {

// ================================================================================================
// SIMT tiled GEMM (every dtype, any shape and alignment)

template <typename T>
struct SimtCfg;
// float32 and the 16-bit fallback: 128x128x8, 8x8 outputs per thread.
template <typename T>
struct SimtCfg {
  static constexpr int BM = 128, BN = 128, BK = 8, TM = 8, TN = 8;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
};
// float64: 64x64x8, 4x4 outputs per thread (64 double accumulators would spill).
template <>
struct SimtCfg<double> {
  static constexpr int BM = 64, BN = 64, BK = 8, TM = 4, TN = 4;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
};

// Global -> register -> shared copier of one SIMT operand slab (BO x BK elements, NT threads).
// Element i of a thread is (o, k) with the contiguous global dimension fastest across threads, so
// each thread keeps one of o / k fixed and steps the other by a constant: one base pointer, no
// divisions in the loop. Bounds are checked per element (any shape, any alignment).
template <typename T, bool RC, int BO, int BK, int NT>
struct SimtLoader {
  using Acc = acc_t<T>;
  static constexpr int N = BO * BK / NT;
  static constexpr int kStep = RC ? NT / BK : NT / BO;  // o step (RC) or k step per element
  static_assert(N * NT == BO * BK && (RC ? NT % BK : NT % BO) == 0, "loader mapping");
  const T* base;  // element 0 at k0 = 0
  int64_t ld;
  int64_t o_lim;  // valid o < o_lim (tile-relative)
  int o_t, k_t;   // element 0's tile coordinates

  __device__ __forceinline__ SimtLoader(const Operand<T>& op, int tid) {
    o_t = RC ? tid / BK : tid % BO;
    k_t = RC ? tid % BK : tid / BO;
    ld = op.ld;
    o_lim = op.o_end - op.o_begin;
    base = RC ? op.ptr + (op.o_begin + o_t) * op.ld + k_t : op.ptr + k_t * op.ld + op.o_begin + o_t;
  }
  __device__ __forceinline__ void load(Acc (&r)[N], int64_t k0, int64_t k_end) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      bool ok;
      const T* src;
      if constexpr (RC) {
        ok = o_t + i * kStep < o_lim && k0 + k_t < k_end;
        src = base + static_cast<int64_t>(i * kStep) * ld + k0;
      } else {
        ok = o_t < o_lim && k0 + k_t + i * kStep < k_end;
        src = base + (k0 + i * kStep) * ld;
      }
      r[i] = ok ? detail::to_acc(__ldg(src)) : Acc(0);
    }
  }
  // shared slab is [BK][L] (o contiguous)
  __device__ __forceinline__ void store(Acc* s, int L, const Acc (&r)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (RC)
        s[k_t * L + o_t + i * kStep] = r[i];
      else
        s[(k_t + i * kStep) * L + o_t] = r[i];
    }
  }
};

// Zeroes one thread's accumulators of a SIMT tile.
template <typename T>
__device__ __forceinline__ void simt_zero(acc_t<T> (&acc)[SimtCfg<T>::TM][SimtCfg<T>::TN]) {
#pragma unroll
  for (int i = 0; i < SimtCfg<T>::TM; ++i)
#pragma unroll
    for (int j = 0; j < SimtCfg<T>::TN; ++j) acc[i][j] = 0;
}

// acc[i][j] += sum_k A(o_a = A.o_begin + ty + i * TY, k) * B(k, o_b = B.o_begin + tx + j * TX) over
// k in [k_begin, k_end); one k-slab in shared memory, the next one prefetched into registers while
// the current one is multiplied.
template <typename T, bool A_RC, bool B_RC>
__device__ __forceinline__ void simt_mainloop(acc_t<T> (&acc)[SimtCfg<T>::TM][SimtCfg<T>::TN],
                                              const Operand<T>& A, const Operand<T>& B, int64_t k_begin,
                                              int64_t k_end) {
  using Acc = acc_t<T>;
  using C = SimtCfg<T>;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, TM = C::TM, TN = C::TN, NT = C::kThreads;
  constexpr int TX = BN / TN, TY = BM / TM;
  constexpr int LA = BM + 4, LB = BN + 4;  // +4: the transposing stores hit distinct banks
  constexpr int NA = BM * BK / NT, NB = BN * BK / NT;
  static_assert(NA * NT == BM * BK && NB * NT == BN * BK, "loader mapping");
  __shared__ Acc sa[BK * LA];
  __shared__ Acc sb[BK * LB];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  Acc ra[NA], rb[NB];

  SimtLoader<T, A_RC, BM, BK, NT> la(A, tid);
  SimtLoader<T, B_RC, BN, BK, NT> lb(B, tid);
  const int64_t num_k = (k_end - k_begin + BK - 1) / BK;
  if (num_k > 0) {
    la.load(ra, k_begin, k_end);
    lb.load(rb, k_begin, k_end);
  }
  for (int64_t kt = 0; kt < num_k; ++kt) {
    la.store(sa, LA, ra);
    lb.store(sb, LB, rb);
    __syncthreads();
    if (kt + 1 < num_k) {
      la.load(ra, k_begin + (kt + 1) * BK, k_end);
      lb.load(rb, k_begin + (kt + 1) * BK, k_end);
    }
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = sa[k * LA + ty + i * TY];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = sb[k * LB + tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ void simt_epilogue(const acc_t<T> (&acc)[SimtCfg<T>::TM][SimtCfg<T>::TN],
                                              T* out, int64_t ldo, int64_t row0, int64_t row_end, int64_t col0,
                                              int64_t col_end, const acc_t<T>* bias) {
  using C = SimtCfg<T>;
  constexpr int TX = C::BN / C::TN, TY = C::BM / C::TM;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
#pragma unroll
  for (int j = 0; j < C::TN; ++j) {
    const int64_t col = col0 + tx + j * TX;
    if (col >= col_end) continue;
    const acc_t<T> bj = bias != nullptr ? bias[col] : 0;
#pragma unroll
    for (int i = 0; i < C::TM; ++i) {
      const int64_t row = row0 + ty + i * TY;
      if (row < row_end) out[row * ldo + col] = detail::from_acc<T>(acc[i][j] + bj);
    }
  }
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
