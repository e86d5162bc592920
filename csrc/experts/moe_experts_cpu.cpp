// Fused CPU inference kernel of the whole expert path (moestream::moe_experts):
//
//   1. counting sort of the (token, slot) pairs by expert -> rows in (expert, token, slot) order;
//   2. per (expert, block of I): gather the expert's token rows, h = x_e @ W1_e[:, block] (+ bias),
//      gated activation -> a (float32 buffer [T*k, I]);
//   3. per (expert, block of H): y = a_e @ W2_e[:, block] (+ bias) -> sorted buffer [T*k, H];
//   4. per token: out[t] = sum_s weights[t, s] * y[row of (t, s)], slots in order, float32.
//
// Everything is float32 (float64 for float64) from the gather to the final cast, so bfloat16 /
// float16 inputs lose less than the reference, which rounds h, a and y to the input dtype.
// Work items of steps 2 and 3 are handed to the threads dynamically (largest first); each item's
// result depends only on the shapes, never on which thread ran it, and the combine has a fixed
// order, so results are deterministic.
//
// Matmul kernels, chosen per expert by its row count m (measured on the 2-core AMD EPYC / AVX2
// development machine, Qwen3-MoE block: H=1024, I=512, E=32, k=4):
//  - m <= kSmallRows: our own AVX2 kernel streams each weight once, converting bfloat16 / float16
//    on the fly, and keeps the few rows of x in L1. Decode is bound by reading the weights. On
//    CPUs with AVX-512-BF16, bfloat16 [N, K] weights go through VDPBF16PS instead, unconverted.
//  - larger m: float32 BLAS (MKL sgemm through at::mm) called single-threaded from
//    each worker, on float32 weights; bfloat16 / float16 weight blocks are first converted to a
//    float32 panel (at::mm on the buffers). ATen's bfloat16 mm on this CPU (no AVX512-BF16) runs at ~17 GFLOP/s per core
//    with [N, K] weights and ~0.7 GFLOP/s with [K, N] weights, while sgemm reaches ~75 GFLOP/s
//    per core at m = 128, so the conversion (a few % of the time) pays for itself many times.
//    Where oneDNN runs them natively (AVX-512; see cpu::lowp_native) bfloat16 / float16 GEMMs
//    stay in their dtype: ~210 GFLOP/s per core against ~97 for SGEMM on an AVX-512-BF16 EPYC.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <numeric>
#include <vector>

#include "activation/activation_checks.h"
#include "activation/gated_activation_cpu.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "experts/moe_experts_checks.h"

namespace moestream {
namespace {


constexpr const char* kOp = "moe_experts";

// Grow-only scratch memory, left uninitialised (std::vector would zero it on every growth).
template <typename T>
class Buffer {
 public:
  T* get(int64_t n) {
    if (n > cap_) {
      data_.reset(new T[static_cast<size_t>(n)]);
      cap_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t cap_ = 0;
};

// ---------------------------------------------------------------------------------------------
// small-m matmul: C[m, 0:nc] = X[m, 0:K] @ B[:, 0:nc] for a handful of rows, reading B once.
// B is given either as "KN" (row-major [K, *], ld ldw: column c of B is W[k * ldw + c]) or as
// "NK" (row-major [*, K], ld ldw: column c of B is the contiguous row W[c * ldw + k]).

template <typename scalar_t, typename acc>
void small_mm_scalar(int64_t M, int64_t nc, int64_t K, const acc* X, int64_t ldx, const scalar_t* W, int64_t ldw,
                     bool nk, acc* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    acc* c = C + m * ldc;
    const acc* x = X + m * ldx;
    if (nk) {
      for (int64_t n = 0; n < nc; ++n) {
        const scalar_t* w = W + n * ldw;
        acc s = 0;
        for (int64_t k = 0; k < K; ++k) s += x[k] * static_cast<acc>(w[k]);
        c[n] = s;
      }
    } else {
      std::fill(c, c + nc, acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* w = W + k * ldw;
        const acc xv = x[k];
        for (int64_t n = 0; n < nc; ++n) c[n] += xv * static_cast<acc>(w[n]);
      }
    }
  }
}

#if MS_HAVE_X86_SIMD
// NK for one to three rows of X: dot products one row of B at a time, so B is read as a single
// sequential stream (rows of B are contiguous). On the dev machine this streams 1.5-2x faster from
// DRAM than reading four rows side by side (several streams, one page each), which in turn wins
// from about four rows of X on, where it saves loads of X.
template <typename scalar_t>
MS_TARGET_AVX2 void small_mm_nk_rows_avx2(int64_t M, int64_t nc, int64_t K, const float* X, int64_t ldx,
                                         const scalar_t* W, int64_t ldw, float* C, int64_t ldc) {
  const int64_t K32 = K & ~int64_t(31);
  for (int64_t n = 0; n < nc; ++n) {
    const scalar_t* w = W + n * ldw;
    for (int64_t m = 0; m < M; m += 2) {
      const bool two = m + 1 < M;
      const float* x0 = X + m * ldx;
      const float* x1 = two ? x0 + ldx : x0;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t k = 0; k < K32; k += 32) {
        __m256 v0 = cpu::load8(w + k), v1 = cpu::load8(w + k + 8), v2 = cpu::load8(w + k + 16),
               v3 = cpu::load8(w + k + 24);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), v0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), v1, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 16), v2, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 24), v3, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), v0, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 8), v1, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 16), v2, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 24), v3, b3);
      }
      float s0 = cpu::hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      float s1 = cpu::hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
      for (int64_t k = K32; k < K; ++k) {
        const float f = static_cast<float>(w[k]);
        s0 += x0[k] * f, s1 += x1[k] * f;
      }
      C[m * ldc + n] = s0;
      if (two) C[(m + 1) * ldc + n] = s1;
    }
  }
}

// NK: dot products. Four weight rows at a time against row pairs of X (8 accumulators); the
// four rows (4 x K values) stay in L1 while the row pairs of X are walked.
template <typename scalar_t>
MS_TARGET_AVX2 void small_mm_nk_avx2(int64_t M, int64_t nc, int64_t K, const float* X, int64_t ldx,
                                     const scalar_t* W, int64_t ldw, float* C, int64_t ldc) {
  const int64_t K8 = K & ~int64_t(7);
  int64_t n = 0;
  for (; n + 4 <= nc; n += 4) {
    const scalar_t* w0 = W + n * ldw;
    const scalar_t* w1 = w0 + ldw;
    const scalar_t* w2 = w1 + ldw;
    const scalar_t* w3 = w2 + ldw;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      const float* x0 = X + m * ldx;
      const float* x1 = x0 + ldx;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
      __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
      for (int64_t k = 0; k < K8; k += 8) {
        __m256 v0 = cpu::load8(w0 + k), v1 = cpu::load8(w1 + k), v2 = cpu::load8(w2 + k), v3 = cpu::load8(w3 + k);
        __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
        a00 = _mm256_fmadd_ps(xa, v0, a00);
        a01 = _mm256_fmadd_ps(xa, v1, a01);
        a02 = _mm256_fmadd_ps(xa, v2, a02);
        a03 = _mm256_fmadd_ps(xa, v3, a03);
        a10 = _mm256_fmadd_ps(xb, v0, a10);
        a11 = _mm256_fmadd_ps(xb, v1, a11);
        a12 = _mm256_fmadd_ps(xb, v2, a12);
        a13 = _mm256_fmadd_ps(xb, v3, a13);
      }
      float s[8] = {cpu::hsum8(a00), cpu::hsum8(a01), cpu::hsum8(a02), cpu::hsum8(a03),
                    cpu::hsum8(a10), cpu::hsum8(a11), cpu::hsum8(a12), cpu::hsum8(a13)};
      for (int64_t k = K8; k < K; ++k) {
        const float f0 = static_cast<float>(w0[k]), f1 = static_cast<float>(w1[k]);
        const float f2 = static_cast<float>(w2[k]), f3 = static_cast<float>(w3[k]);
        s[0] += x0[k] * f0, s[1] += x0[k] * f1, s[2] += x0[k] * f2, s[3] += x0[k] * f3;
        s[4] += x1[k] * f0, s[5] += x1[k] * f1, s[6] += x1[k] * f2, s[7] += x1[k] * f3;
      }
      float* c0 = C + m * ldc + n;
      float* c1 = c0 + ldc;
      c0[0] = s[0], c0[1] = s[1], c0[2] = s[2], c0[3] = s[3];
      c1[0] = s[4], c1[1] = s[5], c1[2] = s[6], c1[3] = s[7];
    }
    for (; m < M; ++m) {
      const float* x0 = X + m * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        __m256 xa = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(xa, cpu::load8(w0 + k), a0);
        a1 = _mm256_fmadd_ps(xa, cpu::load8(w1 + k), a1);
        a2 = _mm256_fmadd_ps(xa, cpu::load8(w2 + k), a2);
        a3 = _mm256_fmadd_ps(xa, cpu::load8(w3 + k), a3);
      }
      float s[4] = {cpu::hsum8(a0), cpu::hsum8(a1), cpu::hsum8(a2), cpu::hsum8(a3)};
      for (int64_t k = K8; k < K; ++k) {
        s[0] += x0[k] * static_cast<float>(w0[k]), s[1] += x0[k] * static_cast<float>(w1[k]);
        s[2] += x0[k] * static_cast<float>(w2[k]), s[3] += x0[k] * static_cast<float>(w3[k]);
      }
      float* c0 = C + m * ldc + n;
      c0[0] = s[0], c0[1] = s[1], c0[2] = s[2], c0[3] = s[3];
    }
  }
  for (; n < nc; ++n) {
    const scalar_t* w0 = W + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* x0 = X + m * ldx;
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), cpu::load8(w0 + k), a0);
      float s = cpu::hsum8(a0);
      for (int64_t k = K8; k < K; ++k) s += x0[k] * static_cast<float>(w0[k]);
      C[m * ldc + n] = s;
    }
  }
}

// KN: rank-1 updates. C is zeroed, then for each block of 16 rows of B, 32-column strips are
// accumulated into C for row pairs of X (8 accumulators). The 16 rows of B are read front to back
// (sequential streams, which the prefetchers follow) and re-read from L1 for the next row pair.
template <typename scalar_t>
MS_TARGET_AVX2 void small_mm_kn_avx2(int64_t M, int64_t nc, int64_t K, const float* X, int64_t ldx,
                                     const scalar_t* W, int64_t ldw, float* C, int64_t ldc) {
  // one or two rows of X: plain row-by-row streaming of B (one sequential stream); more rows:
  // blocks of 16 rows of B, so that each value loaded from B serves more FMAs
  const int64_t KB = M <= 2 ? 1 : 16;
  for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + nc, 0.0f);
  const int64_t n32 = nc & ~int64_t(31), n8 = nc & ~int64_t(7);
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    int64_t n = 0;
    for (; n < n32; n += 32) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        const float* x0 = X + m * ldx;
        const float* x1 = x0 + ldx;
        float* c0 = C + m * ldc + n;
        float* c1 = c0 + ldc;
        __m256 a00 = _mm256_loadu_ps(c0), a01 = _mm256_loadu_ps(c0 + 8), a02 = _mm256_loadu_ps(c0 + 16),
               a03 = _mm256_loadu_ps(c0 + 24);
        __m256 a10 = _mm256_loadu_ps(c1), a11 = _mm256_loadu_ps(c1 + 8), a12 = _mm256_loadu_ps(c1 + 16),
               a13 = _mm256_loadu_ps(c1 + 24);
        const scalar_t* w = W + k0 * ldw + n;
        for (int64_t k = k0; k < k1; ++k, w += ldw) {
          __m256 v0 = cpu::load8(w), v1 = cpu::load8(w + 8), v2 = cpu::load8(w + 16), v3 = cpu::load8(w + 24);
          __m256 xa = _mm256_set1_ps(x0[k]), xb = _mm256_set1_ps(x1[k]);
          a00 = _mm256_fmadd_ps(xa, v0, a00);
          a01 = _mm256_fmadd_ps(xa, v1, a01);
          a02 = _mm256_fmadd_ps(xa, v2, a02);
          a03 = _mm256_fmadd_ps(xa, v3, a03);
          a10 = _mm256_fmadd_ps(xb, v0, a10);
          a11 = _mm256_fmadd_ps(xb, v1, a11);
          a12 = _mm256_fmadd_ps(xb, v2, a12);
          a13 = _mm256_fmadd_ps(xb, v3, a13);
        }
        _mm256_storeu_ps(c0, a00), _mm256_storeu_ps(c0 + 8, a01), _mm256_storeu_ps(c0 + 16, a02);
        _mm256_storeu_ps(c0 + 24, a03);
        _mm256_storeu_ps(c1, a10), _mm256_storeu_ps(c1 + 8, a11), _mm256_storeu_ps(c1 + 16, a12);
        _mm256_storeu_ps(c1 + 24, a13);
      }
      if (m < M) {
        const float* x0 = X + m * ldx;
        float* c0 = C + m * ldc + n;
        __m256 a0 = _mm256_loadu_ps(c0), a1 = _mm256_loadu_ps(c0 + 8), a2 = _mm256_loadu_ps(c0 + 16),
               a3 = _mm256_loadu_ps(c0 + 24);
        const scalar_t* w = W + k0 * ldw + n;
        for (int64_t k = k0; k < k1; ++k, w += ldw) {
          __m256 xa = _mm256_set1_ps(x0[k]);
          a0 = _mm256_fmadd_ps(xa, cpu::load8(w), a0);
          a1 = _mm256_fmadd_ps(xa, cpu::load8(w + 8), a1);
          a2 = _mm256_fmadd_ps(xa, cpu::load8(w + 16), a2);
          a3 = _mm256_fmadd_ps(xa, cpu::load8(w + 24), a3);
        }
        _mm256_storeu_ps(c0, a0), _mm256_storeu_ps(c0 + 8, a1), _mm256_storeu_ps(c0 + 16, a2);
        _mm256_storeu_ps(c0 + 24, a3);
      }
    }
    for (; n < n8; n += 8) {
      for (int64_t m = 0; m < M; ++m) {
        const float* x0 = X + m * ldx;
        float* c0 = C + m * ldc + n;
        __m256 a0 = _mm256_loadu_ps(c0);
        const scalar_t* w = W + k0 * ldw + n;
        for (int64_t k = k0; k < k1; ++k, w += ldw) a0 = _mm256_fmadd_ps(_mm256_set1_ps(x0[k]), cpu::load8(w), a0);
        _mm256_storeu_ps(c0, a0);
      }
    }
    for (; n < nc; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        float s = C[m * ldc + n];
        for (int64_t k = k0; k < k1; ++k) s += X[m * ldx + k] * static_cast<float>(W[k * ldw + n]);
        C[m * ldc + n] = s;
      }
    }
  }
}
#endif

#if MS_HAVE_X86_SIMD
// R rows of Xb (bfloat16, ld K) against one contiguous bfloat16 weight row w[0:K): VDPBF16PS
// multiplies bfloat16 pairs and accumulates in float32, so the weights are used as stored, with
// no conversion; two accumulators per row hide the instruction's latency.
template <int R>
MS_TARGET_AVX512BF16 inline void dot_rows_bf16(int64_t K, const uint16_t* Xb, const uint16_t* w, float* out) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(Xb + r * K + k), w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_loadu_si512(Xb + r * K + k + 32), w1);
    }
  }
  for (; k < K; k += 32) {
    const int64_t left = K - k;
    const __mmask32 mask = left >= 32 ? ~__mmask32(0) : ((__mmask32(1) << left) - 1);
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, Xb + r * K + k), w0);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// NK bfloat16 weights, up to kSmallRows rows: C[M, nc] = Xb[M, K] @ W[0:nc, :]^T, reading each
// weight row once (it stays in L1 while the row groups of Xb are walked).
MS_TARGET_AVX512BF16 void small_mm_nk_bf16dp(int64_t M, int64_t nc, int64_t K, const c10::BFloat16* Xb,
                                             const c10::BFloat16* W, int64_t ldw, float* C, int64_t ldc) {
  const auto* x = reinterpret_cast<const uint16_t*>(Xb);
  for (int64_t n = 0; n < nc; ++n) {
    const auto* w = reinterpret_cast<const uint16_t*>(W + n * ldw);
    float out[4];
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t r = std::min<int64_t>(4, M - m);
      const uint16_t* xm = x + m * K;
      switch (r) {
        case 4: dot_rows_bf16<4>(K, xm, w, out); break;
        case 3: dot_rows_bf16<3>(K, xm, w, out); break;
        case 2: dot_rows_bf16<2>(K, xm, w, out); break;
        default: dot_rows_bf16<1>(K, xm, w, out); break;
      }
      for (int64_t i = 0; i < r; ++i) C[(m + i) * ldc + n] = out[i];
    }
  }
}
#endif

// Row count up to which the streaming kernel beats BLAS (see the measurements at the top).
// Single-thread CPU time, 16 experts of the Qwen3 block, m rows each (streaming vs BLAS, ms):
//   float32 [N, K] weights: m=1 5.6 vs 7.6, m=8 13.4 vs 14.4, m=32 33.0 vs 29.9, m=128 107 vs 92;
//   float32 [K, N] weights: m=1 5.1 vs 5.5, m=8 14.6 vs 18.1, m=32 49.5 vs 33.7;
//   bfloat16 [N, K]: m=4 7.8 vs 11.9, m=16 18.8 vs 19.1, m=32 32.9 vs 29.2;
//   bfloat16 [K, N]: m=4 7.1 vs 11.8, m=16 17.1 vs 19.9, m=32 29.9 vs 29.5.
// With AVX-512-BF16 (2-core AMD EPYC, both threads, Qwen3 block, bfloat16 [N, K], the whole fused
// op): the VDPBF16PS kernel at 16 / 64 / 96 tokens took 3.0-3.3 / 7.4 / 10.1 ms against 3.7 /
// 10.9 / 13.2 ms when only experts with up to 2 rows took it; oneDNN's native GEMM at 32 rows per
// expert took 14.3 ms, so 16 rows stays the crossover.
template <typename scalar_t>
constexpr int64_t kSmallRows = std::is_same_v<scalar_t, float> ? 8 : 16;

// C[M, nc] (ld ldc) = X[M, K] (ld ldx) @ B[:, c0 : c0 + nc] with B stored as described above.
// panel: scratch for converting a block of non-float weights to the accumulation type.
template <typename scalar_t>
struct MmScratch {
  Buffer<acc_t<scalar_t>> panel, ctmp;  // float32 detour: converted weight block, result block
  Buffer<scalar_t> xlow, clow;           // native low-precision GEMM: rounded rows, result block
  bool native = false;                   // bfloat16 / float16 through ATen's native GEMM (oneDNN)
};

template <typename scalar_t>
void block_mm(int64_t M, int64_t nc, int64_t K, const acc_t<scalar_t>* X, int64_t ldx, const scalar_t* W,
              int64_t ldw, bool nk, int64_t c0, acc_t<scalar_t>* C, int64_t ldc, MmScratch<scalar_t>& s) {
  using acc = acc_t<scalar_t>;
  if (M == 0 || nc == 0) return;
  const scalar_t* Wb = nk ? W + c0 * ldw : W + c0;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + nc, acc(0));
    return;
  }
  if constexpr (std::is_same_v<acc, float>) {
    if (M <= kSmallRows<scalar_t>) {
#if MS_HAVE_X86_SIMD
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (nk && cpu::has_avx512_bf16()) {
          // rows rounded to bfloat16 once (exact for gathered inputs; the activation is rounded
          // as the reference rounds it), then pairwise bfloat16 dot products
          scalar_t* Xb = s.xlow.get(M * K);
          for (int64_t m = 0; m < M; ++m) cpu::from_acc_fast(X + m * ldx, Xb + m * K, K);
          small_mm_nk_bf16dp(M, nc, K, Xb, Wb, ldw, C, ldc);
          return;
        }
      }
      if (cpu::has_avx2()) {
        if (nk && M <= 3) {
          small_mm_nk_rows_avx2<scalar_t>(M, nc, K, X, ldx, Wb, ldw, C, ldc);
        } else if (nk) {
          small_mm_nk_avx2<scalar_t>(M, nc, K, X, ldx, Wb, ldw, C, ldc);
        } else {
          small_mm_kn_avx2<scalar_t>(M, nc, K, X, ldx, Wb, ldw, C, ldc);
        }
        return;
      }
#endif
    }
  }
  if (M <= 2 && !std::is_same_v<scalar_t, acc>) {
    small_mm_scalar<scalar_t, acc>(M, nc, K, X, ldx, Wb, ldw, nk, C, ldc);
    return;
  }
  if constexpr (!std::is_same_v<scalar_t, acc>) {
    if (s.native) {
      // rows rounded to the weights' dtype (exact for gathered inputs; the activation is rounded
      // as the reference rounds it), one native GEMM, result widened back into C
      const auto low = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
      scalar_t* Xl = s.xlow.get(M * K);
      for (int64_t m = 0; m < M; ++m) cpu::from_acc_fast(X + m * ldx, Xl + m * K, K);
      scalar_t* Cl = s.clow.get(M * nc);
      at::Tensor xt = at::from_blob(Xl, {M, K}, low);
      at::Tensor bt = nk ? at::from_blob(const_cast<scalar_t*>(Wb), {nc, K}, {ldw, 1}, low).t()
                         : at::from_blob(const_cast<scalar_t*>(Wb), {K, nc}, {ldw, 1}, low);
      at::Tensor ct = at::from_blob(Cl, {M, nc}, low);
      at::mm_out(ct, xt, bt);
      for (int64_t m = 0; m < M; ++m) cpu::to_acc_fast(Cl + m * nc, C + m * ldc, nc);
      return;
    }
  }
  auto& panel = s.panel;
  auto& ctmp = s.ctmp;
  const acc* B;
  int64_t ldb;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    B = Wb;
    ldb = ldw;
  } else {
    // float32 copy of the block, in the same orientation: NK -> [nc, K], KN -> [K, nc]
    acc* P = panel.get(nc * K);
    if (nk) {
      for (int64_t r = 0; r < nc; ++r) cpu::to_acc_fast(Wb + r * ldw, P + r * K, K);
    } else {
      for (int64_t r = 0; r < K; ++r) cpu::to_acc_fast(Wb + r * ldw, P + r * nc, nc);
    }
    B = P;
    ldb = nk ? K : nc;
  }
  // at::mm on views of the buffers reaches BLAS (MKL sgemm / dgemm) with the leading dimensions
  // as they are; inside our parallel region BLAS runs single-threaded.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value);
  at::Tensor xt = at::from_blob(const_cast<acc*>(X), {M, K}, {ldx, 1}, opts);
  at::Tensor bt = nk ? at::from_blob(const_cast<acc*>(B), {nc, K}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<acc*>(B), {K, nc}, {ldb, 1}, opts);
  if (ldc == nc) {
    at::Tensor ct = at::from_blob(C, {M, nc}, opts);
    at::mm_out(ct, xt, bt);
  } else {
    acc* Ct = ctmp.get(M * nc);
    at::Tensor ct = at::from_blob(Ct, {M, nc}, opts);
    at::mm_out(ct, xt, bt);
    for (int64_t m = 0; m < M; ++m) std::copy(Ct + m * nc, Ct + (m + 1) * nc, C + m * ldc);
  }
}

// ---------------------------------------------------------------------------------------------

struct Task {
  int64_t e, c0, c1;
  double cost;
};

// Splits each active expert's columns [0, cols) into equal blocks (multiples of 8 columns) so
// that there are enough work items to balance the threads, largest first.
std::vector<Task> make_tasks(const std::vector<int64_t>& counts, int64_t cols, int64_t weight_rows_cost,
                             int nthreads) {
  std::vector<int64_t> active;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e)
    if (counts[e] > 0) active.push_back(e);
  std::vector<Task> tasks;
  if (active.empty() || cols == 0) return tasks;
  int64_t nb = 1;
  if (nthreads > 1) {
    const int64_t target = 4 * nthreads;
    nb = (target + static_cast<int64_t>(active.size()) - 1) / static_cast<int64_t>(active.size());
    nb = std::max<int64_t>(1, std::min<int64_t>(nb, cols / 32));
  }
  int64_t width = (cols + nb - 1) / nb;
  width = std::min(cols, (width + 7) / 8 * 8);
  for (int64_t e : active) {
    for (int64_t c = 0; c < cols; c += width) {
      const int64_t c1 = std::min(cols, c + width);
      // rows of compute plus the weight read, which dominates for a few rows
      tasks.push_back({e, c, c1, double(counts[e] + weight_rows_cost) * double(c1 - c)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

// Runs fn(task, thread_index) for every task, handing tasks to the threads dynamically.
template <typename F>
void run_tasks(const std::vector<Task>& tasks, int nthreads, const F& fn) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= n) break;
        fn(tasks[i], w);
      }
    }
  });
}

template <typename scalar_t>
void moe_experts_kernel(const at::Tensor& x, const std::vector<int64_t>& order, const std::vector<int64_t>& pos,
                        const std::vector<int64_t>& offsets, const std::vector<int64_t>& counts, int64_t k,
                        const at::Tensor& weights, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b1,
                        const at::Tensor& b2, ActKind kind, ActLayout layout, bool tb, double alpha, double limit,
                        at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t T = x.size(0), H = x.size(1);
  const int64_t I = tb ? w1.size(1) / 2 : w1.size(2) / 2;
  const int64_t N = T * k;
  const int nthreads = at::get_num_threads();

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* w1p = w1.const_data_ptr<scalar_t>();
  const scalar_t* w2p = w2.const_data_ptr<scalar_t>();
  const acc* b1p = b1.defined() ? b1.const_data_ptr<acc>() : nullptr;
  const acc* b2p = b2.defined() ? b2.const_data_ptr<acc>() : nullptr;
  // expert strides: each expert's matrix is contiguous, the experts need not be (an expert cache's
  // slots are one strided [slots, ...] view)
  const int64_t sw1 = w1.stride(0), sw2 = w2.stride(0);
  const int64_t sb1 = b1.defined() ? b1.stride(0) : 0, sb2 = b2.defined() ? b2.stride(0) : 0;
  const acc* wp = weights.const_data_ptr<acc>();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc>::value);
  at::Tensor a_buf = cpu::empty_large({N, I}, acc_opts);
  at::Tensor y_buf = cpu::empty_large({N, H}, acc_opts);
  acc* A = a_buf.mutable_data_ptr<acc>();
  acc* Y = y_buf.mutable_data_ptr<acc>();
  int64_t max_rows = 0;
  for (int64_t c : counts) max_rows = std::max(max_rows, c);

  struct Scratch {
    Buffer<acc> xs, h, bias, g, u;
    MmScratch<scalar_t> mm;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(std::max(1, nthreads)));
  const bool native = cpu::is_lowp(x.scalar_type()) && cpu::lowp_native(x.scalar_type());
  for (auto& sc : scratch) sc.mm.native = native;

  // step 2 for columns [j0, j1) of I: gather + x_e @ W1_e[:, block] (+ bias) + activation -> A
  const int64_t ld1 = tb ? H : 2 * I;  // W1_e is [2I, H] (tb) or [H, 2I]
  auto gate_up = [&](int64_t e, int64_t j0, int64_t j1, Scratch& s) {
    const int64_t cb = j1 - j0, m = counts[e], r0 = offsets[e];
    acc* xs = s.xs.get(m * H);
    for (int64_t r = 0; r < m; ++r) cpu::to_acc_fast(xp + (order[r0 + r] / k) * H, xs + r * H, H);
    acc* h = s.h.get(m * 2 * cb);
    const scalar_t* W = w1p + e * sw1;
    // local h keeps the global layout: [gate block | up block] (concat) or pairs (interleaved)
    if (layout == ActLayout::kInterleaved || cb == I) {
      block_mm<scalar_t>(m, 2 * cb, H, xs, H, W, ld1, tb, 2 * j0, h, 2 * cb, s.mm);
    } else {
      block_mm<scalar_t>(m, cb, H, xs, H, W, ld1, tb, j0, h, 2 * cb, s.mm);
      block_mm<scalar_t>(m, cb, H, xs, H, W, ld1, tb, I + j0, h + cb, 2 * cb, s.mm);
    }
    acc* bias = nullptr;
    if (b1p) {
      bias = s.bias.get(2 * cb);
      const acc* b = b1p + e * sb1;
      if (layout == ActLayout::kInterleaved) {
        std::copy(b + 2 * j0, b + 2 * j0 + 2 * cb, bias);
      } else {
        std::copy(b + j0, b + j0 + cb, bias);
        std::copy(b + I + j0, b + I + j0 + cb, bias + cb);
      }
    }
    acc* gbuf = s.g.get(cb);
    acc* ubuf = s.u.get(cb);
    for (int64_t r = 0; r < m; ++r) {
      acc* hr = h + r * 2 * cb;
      if (bias)
        for (int64_t c = 0; c < 2 * cb; ++c) hr[c] += bias[c];
      const acc *g = hr, *u = hr + cb;
      if (layout == ActLayout::kInterleaved) {
        cpu::deinterleave(hr, gbuf, ubuf, cb);
        g = gbuf;
        u = ubuf;
      }
      cpu::act_fwd(kind, cb, g, u, A + (r0 + r) * I + j0, acc(alpha), acc(limit));
    }
  };

  // step 3 for columns [n0, n1) of H: a_e @ W2_e[:, block] (+ bias) -> Y rows of expert e
  const int64_t ld2 = tb ? I : H;  // W2_e is [H, I] (tb) or [I, H]
  auto down = [&](int64_t e, int64_t n0, int64_t n1, Scratch& s) {
    const int64_t nb = n1 - n0, m = counts[e], r0 = offsets[e];
    acc* C = Y + r0 * H + n0;
    block_mm<scalar_t>(m, nb, I, A + r0 * I, I, w2p + e * sw2, ld2, tb, n0, C, H, s.mm);
    if (b2p) {
      const acc* b = b2p + e * sb2 + n0;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < nb; ++c) C[r * H + c] += b[c];
    }
  };

  // Small problems run on the calling thread: a parallel region costs more than they do.
  const int workers = N * H * I < (int64_t(1) << 18) ? 1 : nthreads;
  const auto tasks1 = make_tasks(counts, I, 4, workers);
  const auto tasks2 = make_tasks(counts, H, 4, workers);
  const bool whole_experts = std::all_of(tasks1.begin(), tasks1.end(), [&](const Task& t) { return t.c1 - t.c0 == I; }) &&
                             std::all_of(tasks2.begin(), tasks2.end(), [&](const Task& t) { return t.c1 - t.c0 == H; });
  if (whole_experts) {
    // enough experts to keep every thread busy: each task runs one expert end to end (one
    // parallel region instead of two, and a_e is still in cache for the second matmul)
    run_tasks(tasks1, workers, [&](const Task& t, int64_t w) {
      gate_up(t.e, 0, I, scratch[w]);
      down(t.e, 0, H, scratch[w]);
    });
  } else {
    run_tasks(tasks1, workers, [&](const Task& t, int64_t w) { gate_up(t.e, t.c0, t.c1, scratch[w]); });
    run_tasks(tasks2, workers, [&](const Task& t, int64_t w) { down(t.e, t.c0, t.c1, scratch[w]); });
  }

  // step 4: weighted combine per token, slots in order
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  // chunks of at least ~64K values read, so decode-sized combines stay on one thread
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H * std::max<int64_t>(k, 1))),
                   [&](int64_t t0, int64_t t1) {
                     std::vector<acc> row(static_cast<size_t>(H));
                     for (int64_t t = t0; t < t1; ++t) {
                       acc* __restrict r = row.data();
                       std::fill(r, r + H, acc(0));
                       for (int64_t sl = 0; sl < k; ++sl) {
                         const acc wv = wp[t * k + sl];
                         const acc* __restrict yr = Y + pos[t * k + sl] * H;
                         for (int64_t c = 0; c < H; ++c) r[c] += wv * yr[c];
                       }
                       cpu::from_acc_fast(r, op + t * H, H);
                     }
                   });
}

// t [E, ...] with every t[e] contiguous (the experts themselves may be strided apart): t itself;
// otherwise a contiguous copy.
at::Tensor experts_contiguous(const at::Tensor& t) {
  int64_t want = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != want) return t.contiguous();
    want *= t.size(d);
  }
  return t.stride(0) >= 0 ? t : t.contiguous();
}

// x [T, H]; ids [T, k] int32 | int64 in [0, E); weights [T, k] any float dtype;
// w_gate_up [E, H, 2I] and w_down [E, I, H] (transpose_b: [E, 2I, H] and [E, H, I]) in x's dtype;
// out[t] = sum_s weights[t, s] * b_down[ids[t, s]] (zero without b_down): the expert path with I = 0.
// idp: ids as contiguous int64 [T, k] (range checked); w: weights [T, k] in the accumulation dtype;
// b2: b_down [E, H] in it too (or undefined); out [T, H] contiguous in x's dtype.
void experts_no_intermediate(const int64_t* idp, const at::Tensor& w, const at::Tensor& b2, int64_t T, int64_t H,
                             int64_t k, at::Tensor& out) {
  MS_DISPATCH_FLOATS(out.scalar_type(), "moe_experts_cpu_no_intermediate", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b2.defined() ? b2.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(static_cast<size_t>(H));
      for (int64_t t = begin; t < end; ++t) {
        std::fill(row.begin(), row.end(), acc_t(0));
        if (bp != nullptr) {
          for (int64_t s = 0; s < k; ++s) {
            const acc_t ws = wp[t * k + s];
            const acc_t* b = bp + idp[t * k + s] * H;
            for (int64_t h = 0; h < H; ++h) row[h] += ws * static_cast<acc_t>(static_cast<scalar_t>(b[h]));
          }
        }
        for (int64_t h = 0; h < H; ++h) o[t * H + h] = static_cast<scalar_t>(row[h]);
      }
    });
  });
}

// b_gate_up [E, 2I], b_down [E, H] optional, any float dtype -> out [T, H] in x's dtype.
at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                           const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           const std::optional<at::Tensor>& b_gate_up, const std::optional<at::Tensor>& b_down,
                           c10::string_view kind, c10::string_view layout, bool transpose_b, double alpha,
                           double limit) {
  const ActKind act_kind = parse_act_kind(kind, kOp);
  const ActLayout act_layout = parse_act_layout(layout, kOp);
  const ExpertsDims d =
      check_moe_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, transpose_b);
  const int64_t T = d.T, H = d.H, k = d.k, E = d.E;
  const auto acc_type = acc_dtype(x.scalar_type());
  at::Tensor b1, b2;
  if (b_gate_up.has_value()) b1 = experts_contiguous(b_gate_up->to(acc_type));
  if (b_down.has_value()) b2 = experts_contiguous(b_down->to(acc_type));

  // counting sort of the flat (token, slot) index t * k + s by expert: stable, so each expert's
  // rows come in (token, slot) order. order[row] = flat index; pos[flat index] = row.
  const int64_t N = T * k;
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t* idp = ids64.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(static_cast<size_t>(E), 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = idp[i];
    MS_CHECK(e >= 0 && e < E, kOp, "ids must be in [0, ", E, ") (E = w_gate_up.size(0)), got ", e,
             " at [", i / k, ", ", i % k, "]");
    counts[e]++;
  }
  std::vector<int64_t> offsets(static_cast<size_t>(E) + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  std::vector<int64_t> order(static_cast<size_t>(N)), pos(static_cast<size_t>(N));
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t row = fill[idp[i]]++;
      order[row] = i;
      pos[i] = row;
    }
  }

  // x's strides, like the fake kernel (empty_like); computed contiguously, copied if they differ
  at::Tensor out = x.is_contiguous() ? cpu::empty_large(x.sizes(), x.options()) : at::empty_like(x);
  if (out.numel() == 0) return out;
  at::Tensor outc = out.is_contiguous() ? out : at::empty({T, H}, x.options());
  const at::Tensor wc = weights.to(acc_type).contiguous();
  if (d.I == 0) {
    // No intermediate: each routed slot contributes weight * b_down[e] (rounded to x's dtype first, as
    // the composed path's grouped_mm does), or nothing without b_down.
    experts_no_intermediate(idp, wc, b2.defined() ? b2.contiguous() : b2, T, H, k, outc);
    if (!outc.is_same(out)) out.copy_(outc);
    return out;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor w1c = experts_contiguous(w_gate_up);
  const at::Tensor w2c = experts_contiguous(w_down);
  MS_DISPATCH_FLOATS(x.scalar_type(), "moe_experts_cpu", [&] {
    moe_experts_kernel<scalar_t>(xc, order, pos, offsets, counts, k, wc, w1c, w2c, b1, b2, act_kind, act_layout,
                                 transpose_b, alpha, limit, outc);
  });
  if (!outc.is_same(out)) out.copy_(outc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) { m.impl("moe_experts", &moe_experts_cpu); }

}  // namespace moestream
