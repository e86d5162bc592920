// CPU grouped matmul: out[rows of g] = a[rows of g] @ b[g] (+ bias[g]), its weight gradient and its
// bias gradient. The GEMMs themselves are ATen's CPU BLAS calls (MKL / oneDNN through
// at::cpu::mm_out / addmm_out, which bypass the dispatcher); what this file decides is how the
// groups are spread over threads and how bfloat16 / float16 are fed to the BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "common/tuning.h"
#include "grouped_mm/grouped_mm_checks.h"

namespace moestream {
namespace {

// ----------------------------------------------------------------------------------------------
// tuning
//
// The tuning keys cpu_gmm_schedule, cpu_panel_kb, cpu_small_rows and cpu_lowp_gemm
// (common/tuning.h) exist for benchmarking the alternatives; each op reads them once per call.
// Unchanged, the measured defaults apply.

using cpu::is_lowp;
using cpu::lowp_native;

// ----------------------------------------------------------------------------------------------
// grouped_mm

struct Segment {
  int64_t g, r0, r1;  // rows [r0, r1) of group g
};

// The pieces of the groups that fall into rows [p0, p1).
std::vector<Segment> segments_in(const std::vector<int64_t>& ends, int64_t p0, int64_t p1) {
  std::vector<Segment> segs;
  int64_t start = 0;
  for (int64_t g = 0; g < static_cast<int64_t>(ends.size()); ++g) {
    const int64_t lo = std::max(start, p0), hi = std::min(ends[g], p1);
    if (lo < hi) segs.push_back({g, lo, hi});
    start = ends[g];
    if (start >= p1) break;
  }
  return segs;
}

// Column panel width of the float32 copy of b[g] in the low-precision path: the panel
// (K x width floats) is converted right before the GEMM reads it, so it should still be in L2.
// 128 KiB to 4 MiB panels timed within noise of each other on the 2-core test machine (bf16,
// M=4096, K=512/1024, N=1024); 512 KiB is a middle that fits common L2 sizes (the default of the
// tuning key cpu_panel_kb).
int64_t lowp_panel(int64_t K, int64_t N, int64_t kb) {
  const int64_t budget = (kb * 1024) / 4;  // floats
  int64_t w = std::max<int64_t>(64, (budget / std::max<int64_t>(K, 1)) / 64 * 64);
  return std::min(w, N);
}

// ----------------------------------------------------------------------------------------------
// Small-row GEMMs on bfloat16 / float16 weights, read in place.
//
// A group with only a few rows (decode: T=16, k=4, 32 experts gives ~2 rows per expert) is bound
// by reading its weight matrix once. Converting b[g] to a float32 copy for SGEMM reads it, writes
// twice as many bytes and reads those again; these kernels convert a short run of b at a time
// into a stack buffer and use it for every row at once, so b is streamed exactly once. Rows of a
// are converted to float32 first (they are few). Accumulation is float32 in a fixed order.
// Each kernel is compiled twice, for the baseline ISA and for AVX2+FMA+F16C, picked at run time.

#define MS_ALWAYS_INLINE __attribute__((always_inline)) inline

template <typename scalar_t, bool kAvx2>
struct ToFloat {
  static MS_ALWAYS_INLINE void run(const scalar_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};
#if MS_HAVE_X86_SIMD
template <>
struct ToFloat<c10::BFloat16, true> {
  static MS_TARGET_AVX2 void run(const c10::BFloat16* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};
template <>
struct ToFloat<c10::Half, true> {
  static MS_TARGET_AVX2 void run(const c10::Half* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    }
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};
#endif

// dst [R, C] (contiguous float32) <- rows of src with row stride lds, columns contiguous.
template <typename scalar_t>
void rows_to_float_default(const scalar_t* src, int64_t lds, int64_t R, int64_t C, float* dst) {
  for (int64_t r = 0; r < R; ++r) ToFloat<scalar_t, false>::run(src + r * lds, dst + r * C, C);
}
template <typename scalar_t>
MS_TARGET_AVX2 void rows_to_float_avx2(const scalar_t* src, int64_t lds, int64_t R, int64_t C, float* dst) {
  for (int64_t r = 0; r < R; ++r) ToFloat<scalar_t, MS_HAVE_X86_SIMD == 1>::run(src + r * lds, dst + r * C, C);
}

// A bf16 / fp16 2-D view -> float32 [R, C] at dst. Rows with contiguous columns go through the
// vectorised converter (ATen's strided copy_ of narrow column panels ran at ~1 element/ns here).
void to_float_2d(const at::Tensor& src, float* dst) {
  const int64_t R = src.size(0), C = src.size(1);
  if (R == 0 || C == 0) return;
  if (src.stride(1) != 1 && C > 1) {
    at::from_blob(dst, {R, C}, src.options().dtype(at::kFloat)).copy_(src);
    return;
  }
  const int64_t lds = R > 1 ? src.stride(0) : C;
  if (src.scalar_type() == at::kBFloat16) {
    auto p = src.const_data_ptr<c10::BFloat16>();
    cpu::has_avx2() ? rows_to_float_avx2(p, lds, R, C, dst) : rows_to_float_default(p, lds, R, C, dst);
  } else {
    auto p = src.const_data_ptr<c10::Half>();
    cpu::has_avx2() ? rows_to_float_avx2(p, lds, R, C, dst) : rows_to_float_default(p, lds, R, C, dst);
  }
}

// out[m, n] = sum_k a[m, k] * B(k, n) (+ bias[n]) for m < rows, n in [n0, n1); B(k, n) = b[k*ldk + n]
// (columns contiguous). a: float [rows, K] contiguous; out: scalar_t rows with stride ldo.
// b is walked row by row over the whole column range (long contiguous reads; a narrow column
// block walked down the rows crossed a page every other row and ran 5x slower); the float
// accumulators acc [rows, n1 - n0] and the converted row bf [n1 - n0] are scratch from the caller.
template <typename scalar_t, bool kAvx2>
MS_ALWAYS_INLINE void small_nn_body(const float* a, int64_t rows, int64_t K, const scalar_t* b, int64_t ldk,
                                    const float* bias, scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* acc,
                                    float* bf) {
  const int64_t w = n1 - n0;
  for (int64_t i = 0; i < rows * w; ++i) acc[i] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    ToFloat<scalar_t, kAvx2>::run(b + k * ldk + n0, bf, w);
    for (int64_t m = 0; m < rows; ++m) {
      const float am = a[m * K + k];
      float* accm = acc + m * w;
      for (int64_t j = 0; j < w; ++j) accm[j] += am * bf[j];
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    scalar_t* o = out + m * ldo + n0;
    const float* accm = acc + m * w;
    if (bias != nullptr) {
      for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(accm[j] + bias[n0 + j]);
    } else {
      for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(accm[j]);
    }
  }
}

// Same product with B(k, n) = bt[n*ldn + k] (rows of k contiguous): one dot product per (m, n)
// with 32 partial sums (four independent FMA chains; a single chain was FMA-latency bound at
// ~2 elements per cycle) combined in a fixed tree. bf: scratch of K floats.
template <typename scalar_t, bool kAvx2>
MS_ALWAYS_INLINE void small_nt_body(const float* a, int64_t rows, int64_t K, const scalar_t* bt, int64_t ldn,
                                    const float* bias, scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* bf) {
  constexpr int L = 32;
  for (int64_t n = n0; n < n1; ++n) {
    ToFloat<scalar_t, kAvx2>::run(bt + n * ldn, bf, K);
    for (int64_t m = 0; m < rows; ++m) {
      const float* am = a + m * K;
      float p[L];
      for (int l = 0; l < L; ++l) p[l] = 0.f;
      int64_t k = 0;
      for (; k + L <= K; k += L)
        for (int l = 0; l < L; ++l) p[l] += am[k + l] * bf[k + l];
      for (int l = 0; k < K; ++k, ++l) p[l] += am[k] * bf[k];
      for (int h = L / 2; h >= 1; h /= 2)
        for (int l = 0; l < h; ++l) p[l] += p[l + h];
      float v = p[0];
      if (bias != nullptr) v += bias[n];
      out[m * ldo + n] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
void small_nn_default(const float* a, int64_t rows, int64_t K, const scalar_t* b, int64_t ldk, const float* bias,
                      scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* acc, float* bf) {
  small_nn_body<scalar_t, false>(a, rows, K, b, ldk, bias, out, ldo, n0, n1, acc, bf);
}
template <typename scalar_t>
MS_TARGET_AVX2 void small_nn_avx2(const float* a, int64_t rows, int64_t K, const scalar_t* b, int64_t ldk,
                                  const float* bias, scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* acc,
                                  float* bf) {
  small_nn_body<scalar_t, MS_HAVE_X86_SIMD == 1>(a, rows, K, b, ldk, bias, out, ldo, n0, n1, acc, bf);
}
template <typename scalar_t>
void small_nt_default(const float* a, int64_t rows, int64_t K, const scalar_t* bt, int64_t ldn, const float* bias,
                      scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* bf) {
  small_nt_body<scalar_t, false>(a, rows, K, bt, ldn, bias, out, ldo, n0, n1, bf);
}
template <typename scalar_t>
MS_TARGET_AVX2 void small_nt_avx2(const float* a, int64_t rows, int64_t K, const scalar_t* bt, int64_t ldn,
                                  const float* bias, scalar_t* out, int64_t ldo, int64_t n0, int64_t n1, float* bf) {
  small_nt_body<scalar_t, MS_HAVE_X86_SIMD == 1>(a, rows, K, bt, ldn, bias, out, ldo, n0, n1, bf);
}

// out_s [rows, N] (few rows, out's stride(1) == 1) = a_s @ B (+ bias), B [K, N] a view of b's
// low-precision storage with one unit stride. Parallel over column blocks when not already
// inside a parallel region (the serial schedule).
template <typename scalar_t>
void small_rows_gemm(const at::Tensor& a_s, const at::Tensor& B, const float* bias, at::Tensor& o_s) {
  const int64_t rows = a_s.size(0), K = a_s.size(1), N = B.size(1);
  std::vector<float> af(rows * K);
  to_float_2d(a_s, af.data());
  const float* ap = af.data();
  const scalar_t* bp = B.const_data_ptr<scalar_t>();
  scalar_t* op = o_s.data_ptr<scalar_t>();
  const int64_t ldo = o_s.stride(0);
  const bool avx2 = cpu::has_avx2();
  if (B.stride(1) == 1) {
    const int64_t ldk = B.stride(0);
    at::parallel_for(0, (N + 255) / 256, 1, [&](int64_t i0, int64_t i1) {
      const int64_t n0 = i0 * 256, n1 = std::min(N, i1 * 256);
      std::vector<float> acc(rows * (n1 - n0)), bf(n1 - n0);
      if (avx2) {
        small_nn_avx2<scalar_t>(ap, rows, K, bp, ldk, bias, op, ldo, n0, n1, acc.data(), bf.data());
      } else {
        small_nn_default<scalar_t>(ap, rows, K, bp, ldk, bias, op, ldo, n0, n1, acc.data(), bf.data());
      }
    });
  } else {
    const int64_t ldn = B.stride(1);
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      std::vector<float> bf(K);
      if (avx2) {
        small_nt_avx2<scalar_t>(ap, rows, K, bp, ldn, bias, op, ldo, n0, n1, bf.data());
      } else {
        small_nt_default<scalar_t>(ap, rows, K, bp, ldn, bias, op, ldo, n0, n1, bf.data());
      }
    });
  }
}

// One segment: out[r0:r1] = a[r0:r1] @ B_g (+ bias_g), B_g = b[g] or b[g]^T.
struct GmmArgs {
  at::Tensor a, b, out, bias;  // bias already in the dtype the path needs (or undefined)
  bool transpose_b;
  bool via_float;  // low precision through float32 buffers
  int64_t K, N;
  int64_t panel;                       // lowp_panel(): column width of the float32 panels of b[g]
  int64_t small_rows_n, small_rows_k;  // small_rows_limit() for N- and K-contiguous weights
};

// Largest group (rows) that takes the small-row kernels instead of float32 conversion + SGEMM.
// Measured per group on K = N = 1024 bf16 weights, one thread (AMD EPYC, AVX2), ms:
//   rows                    1     2     4     8     12    16
//   small, N contiguous     0.11  0.16  0.41  0.61  0.93  1.04-1.5
//   small, K contiguous     0.14  0.21  0.40  0.90  1.2   1.4-1.5
//   convert + SGEMM, N c.   0.54  0.65  0.73  0.80  0.93  1.06-1.18
//   convert + SGEMM, K c.   0.32  0.41  0.61  0.75  0.87  0.96-1.0
// The tuning key cpu_small_rows caps both (0 disables the small kernels; benchmarking).
int64_t small_rows_limit(bool n_contiguous, int64_t cap) {
  const int64_t limit = n_contiguous ? 8 : 4;
  return cap < 0 ? limit : std::min<int64_t>(cap, limit);
}

void run_segment(const GmmArgs& x, const Segment& s, at::Tensor& a_buf, at::Tensor& b_buf, at::Tensor& c_buf) {
  const int64_t rows = s.r1 - s.r0;
  auto a_s = x.a.narrow(0, s.r0, rows);
  auto o_s = x.out.narrow(0, s.r0, rows);
  auto b_g = x.b.select(0, s.g);
  if (!x.via_float) {
    auto B = x.transpose_b ? b_g.t() : b_g;
    if (x.bias.defined()) {
      at::cpu::addmm_out(o_s, x.bias.select(0, s.g), a_s, B);
    } else {
      at::cpu::mm_out(o_s, a_s, B);
    }
    return;
  }
  const int64_t K = x.K, N = x.N;
  auto B = x.transpose_b ? b_g.t() : b_g;  // [K, N]
  const bool small = B.stride(1) == 1 ? rows <= x.small_rows_n : (B.stride(0) == 1 && rows <= x.small_rows_k);
  if (small) {
    const float* bias = x.bias.defined() ? x.bias.const_data_ptr<float>() + s.g * N : nullptr;
    if (x.a.scalar_type() == at::kBFloat16) {
      small_rows_gemm<c10::BFloat16>(a_s, B, bias, o_s);
    } else {
      small_rows_gemm<c10::Half>(a_s, B, bias, o_s);
    }
    return;
  }
  // bf16 / fp16 through float32: a's rows once, then b[g] panel by panel.
  auto af = a_buf.narrow(0, 0, rows * K).view({rows, K});
  to_float_2d(a_s, af.data_ptr<float>());
  const int64_t w = x.panel;
  for (int64_t n0 = 0; n0 < N; n0 += w) {
    const int64_t nb = std::min(w, N - n0);
    auto cf = c_buf.narrow(0, 0, rows * nb).view({rows, nb});
    // The float32 panel keeps whichever of b's dimensions is contiguous in memory as its rows.
    at::Tensor Bf;
    if (B.stride(1) != 1 && B.stride(0) == 1) {
      auto bf = b_buf.narrow(0, 0, nb * K).view({nb, K});
      to_float_2d(B.narrow(1, n0, nb).t(), bf.data_ptr<float>());
      Bf = bf.t();
    } else {
      Bf = b_buf.narrow(0, 0, K * nb).view({K, nb});
      to_float_2d(B.narrow(1, n0, nb), Bf.data_ptr<float>());
    }
    if (x.bias.defined()) {
      at::cpu::addmm_out(cf, x.bias.select(0, s.g).narrow(0, n0, nb), af, Bf);
    } else {
      at::cpu::mm_out(cf, af, Bf);
    }
    o_s.narrow(1, n0, nb).copy_(cf);
  }
}

// Scheduling of grouped_mm's groups (the tuning key cpu_gmm_schedule="split" | "serial" overrides):
//  - split: the used rows are cut into one contiguous range per thread (so every thread gets the
//    same FLOPs whatever the group sizes); each thread runs single-threaded GEMMs on the pieces of
//    the groups inside its range.
//  - serial: one group after the other, each GEMM multi-threaded by the BLAS.
// Default schedule. Measured with 2 threads on a 2-core AMD EPYC (AVX2) shared with other jobs,
// 32 groups, ms as min / median of 20 interleaved repetitions:
//                                        split        serial       dense at::mm (same FLOPs, f32)
//   float32 M=4096 (~128 rows/group)     177 / 270    440 / 1023   174 / 239
//   float32 M=64 (~2 rows/group)         14 / 24      36 / 136     1.6 / 9.7
//   bf16 M=4096 (float32 path)           137 / 223    466 / 1141   119 / 193
//   bf16 M=64 (small-row kernels)        11 / 16      39 / 180
// (K = N = 1024.) With the threads on disjoint groups there is no barrier inside each GEMM, and
// for tiny groups each thread streams its own experts' weights. Serial stays for small work (no
// parallel region to pay for) and for few groups with few rows (one expert at decode: cutting 4
// rows over the threads would make every thread read all of b; the BLAS splits the columns).
bool choose_split(int64_t used_rows, int64_t groups, int64_t K, int64_t N, int64_t nthreads,
                  GmmSchedule forced) {
  if (forced != GmmSchedule::kAuto) return forced == GmmSchedule::kSplit;
  if (nthreads <= 1 || used_rows < 2 * nthreads) return false;
  if (static_cast<double>(used_rows) * K * N < 1e6) return false;
  return groups >= nthreads || used_rows >= 16 * nthreads;
}

at::Tensor grouped_mm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets, bool transpose_b,
                          const c10::optional<at::Tensor>& bias) {
  // a [M, K] rows sorted by group, b [E, K, N] ([E, N, K] if transpose_b), offsets [E] int32|int64
  // cumulative row ends (offsets[-1] <= M), bias [E, N] (optional) -> out [M, N] in a's dtype;
  // rows past offsets[-1] are zero.
  constexpr const char* op = "grouped_mm";
  const GmmDims d = check_grouped_mm_args(a_in, b_in, offsets, transpose_b, bias);
  const int64_t M = d.M, K = d.K, N = d.N, E = d.E;
  const auto ends = check_offsets(offsets, E, M, op, "a", /*read_values=*/true);
  const int64_t used = E ? ends[E - 1] : 0;

  auto out = cpu::empty_large({M, N}, a_in.options());
  if (used < M) out.narrow(0, used, M - used).zero_();
  if (used == 0 || N == 0) return out;

  const KernelTuning tune = tuning();
  GmmArgs x;
  x.a = a_in;
  x.b = b_in;
  x.out = out;
  x.transpose_b = transpose_b;
  x.K = K;
  x.N = N;
  x.via_float = is_lowp(a_in.scalar_type()) && !lowp_native(a_in.scalar_type());
  x.panel = lowp_panel(K, N, tune.cpu_panel_kb);
  x.small_rows_n = small_rows_limit(true, tune.cpu_small_rows);
  x.small_rows_k = small_rows_limit(false, tune.cpu_small_rows);
  if (bias.has_value()) x.bias = bias->to(x.via_float ? at::kFloat : a_in.scalar_type()).contiguous();

  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t groups = 0;
  for (int64_t g = 0; g < E; ++g) groups += ends[g] > (g ? ends[g - 1] : 0);
  const bool split = choose_split(used, groups, K, N, nthreads, tune.cpu_gmm_schedule);
  const int64_t parts = split ? std::min(nthreads, used) : 1;

  // Buffers of the float32 path, sized for the largest segment a part can meet.
  auto alloc_bufs = [&](int64_t max_rows, at::Tensor& ab, at::Tensor& bb, at::Tensor& cb) {
    if (!x.via_float) return;
    const int64_t w = x.panel;
    auto opts = a_in.options().dtype(at::kFloat);
    ab = at::empty({max_rows * K}, opts);
    bb = at::empty({K * w}, opts);
    cb = at::empty({max_rows * w}, opts);
  };

  if (parts <= 1) {
    // serial: each GEMM (and each conversion) uses the BLAS's / ATen's own threads
    int64_t max_rows = 0, start = 0;
    for (int64_t g = 0; g < E; ++g) max_rows = std::max(max_rows, ends[g] - start), start = ends[g];
    at::Tensor ab, bb, cb;
    alloc_bufs(max_rows, ab, bb, cb);
    for (const auto& s : segments_in(ends, 0, used)) run_segment(x, s, ab, bb, cb);
    return out;
  }

  // split: part p owns rows [p*used/parts, (p+1)*used/parts); inside the parallel region the BLAS
  // runs single-threaded. The thread-local state (grad mode, inference mode, dispatch key
  // exclusions) is carried into the workers for the dispatcher calls (copy_) they make.
  const at::ThreadLocalState tls;
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t p = q0; p < q1; ++p) {
      const int64_t p0 = used * p / parts, p1 = used * (p + 1) / parts;
      const auto segs = segments_in(ends, p0, p1);
      int64_t max_rows = 0;
      for (const auto& s : segs) max_rows = std::max(max_rows, s.r1 - s.r0);
      at::Tensor ab, bb, cb;
      alloc_bufs(max_rows, ab, bb, cb);
      for (const auto& s : segs) run_segment(x, s, ab, bb, cb);
    }
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// weight gradient

at::Tensor grouped_mm_weight_grad_cpu(const at::Tensor& a, const at::Tensor& grad_out, const at::Tensor& offsets,
                                      bool transpose_b) {
  // a [M, K], grad_out [M, N] (same dtype), offsets [E] -> grad_b [E, K, N] (a_g^T dy_g), or
  // [E, N, K] (dy_g^T a_g) if transpose_b; groups without rows get zero blocks.
  constexpr const char* op = "grouped_mm_weight_grad";
  const GmmDims d = check_grouped_mm_weight_grad_args(a, grad_out, offsets);
  const int64_t M = d.M, K = d.K, N = d.N, E = d.E;
  const auto ends = check_offsets(offsets, E, M, op, "a", /*read_values=*/true);

  auto out = transpose_b ? cpu::empty_large({E, N, K}, a.options()) : cpu::empty_large({E, K, N}, a.options());
  const bool via_float = is_lowp(a.scalar_type()) && !lowp_native(a.scalar_type());

  std::vector<Segment> groups;
  int64_t start = 0, max_rows = 0;
  for (int64_t g = 0; g < E; ++g) {
    if (ends[g] > start) {
      groups.push_back({g, start, ends[g]});
      max_rows = std::max(max_rows, ends[g] - start);
    } else {
      out.select(0, g).zero_();
    }
    start = ends[g];
  }
  if (groups.empty() || K == 0 || N == 0) {
    for (const auto& s : groups) out.select(0, s.g).zero_();
    return out;
  }

  auto run = [&](const Segment& s, at::Tensor& abuf, at::Tensor& dbuf, at::Tensor& cbuf) {
    const int64_t rows = s.r1 - s.r0;
    auto a_g = a.narrow(0, s.r0, rows);
    auto d_g = grad_out.narrow(0, s.r0, rows);
    auto o_g = out.select(0, s.g);
    if (via_float) {
      auto af = abuf.narrow(0, 0, rows * K).view({rows, K});
      auto df = dbuf.narrow(0, 0, rows * N).view({rows, N});
      af.copy_(a_g);
      df.copy_(d_g);
      a_g = af;
      d_g = df;
    }
    auto target = via_float ? cbuf.view(o_g.sizes()) : o_g;
    if (transpose_b) {
      at::cpu::mm_out(target, d_g.t(), a_g);
    } else {
      at::cpu::mm_out(target, a_g.t(), d_g);
    }
    if (via_float) o_g.copy_(target);
  };
  auto alloc = [&](at::Tensor& abuf, at::Tensor& dbuf, at::Tensor& cbuf) {
    if (!via_float) return;
    auto opts = a.options().dtype(at::kFloat);
    abuf = at::empty({max_rows * K}, opts);
    dbuf = at::empty({max_rows * N}, opts);
    cbuf = at::empty({K * N}, opts);
  };

  // Each group's block is one GEMM reducing over the group's rows. With at least two groups per
  // thread the groups are spread over threads (contiguous runs of about equal rows, single-threaded
  // GEMMs); otherwise they run one by one with the BLAS's threads.
  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t ng = static_cast<int64_t>(groups.size());
  if (nthreads <= 1 || ng < 2 * nthreads) {
    at::Tensor abuf, dbuf, cbuf;
    alloc(abuf, dbuf, cbuf);
    for (const auto& s : groups) run(s, abuf, dbuf, cbuf);
    return out;
  }
  const int64_t total = groups.back().r1 - groups.front().r0;
  const int64_t base = groups.front().r0;
  // group i goes to the part holding the middle of its rows
  std::vector<int64_t> first(nthreads + 1, ng);
  first[0] = 0;
  for (int64_t p = 1; p <= nthreads; ++p) {
    const int64_t bound = total * p / nthreads;
    int64_t i = first[p - 1];
    while (i < ng && (groups[i].r0 + groups[i].r1) / 2 - base < bound) ++i;
    first[p] = i;
  }
  first[nthreads] = ng;
  const at::ThreadLocalState tls;
  at::parallel_for(0, nthreads, 1, [&](int64_t q0, int64_t q1) {
    at::ThreadLocalStateGuard guard(tls);
    at::Tensor abuf, dbuf, cbuf;
    alloc(abuf, dbuf, cbuf);
    for (int64_t p = q0; p < q1; ++p)
      for (int64_t i = first[p]; i < first[p + 1]; ++i) run(groups[i], abuf, dbuf, cbuf);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// bias gradient

template <typename scalar_t, typename acc_t>
void bias_grad_kernel(const scalar_t* dy, scalar_t* out, const std::vector<int64_t>& ends, int64_t N) {
  constexpr int64_t kCols = 256;
  const int64_t E = static_cast<int64_t>(ends.size());
  const int64_t nb = (N + kCols - 1) / kCols;
  at::parallel_for(0, E * nb, 1, [&](int64_t i0, int64_t i1) {
    acc_t acc[kCols];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / nb, n0 = (i % nb) * kCols, w = std::min(kCols, N - n0);
      const int64_t r0 = g ? ends[g - 1] : 0, r1 = ends[g];
      std::fill(acc, acc + w, acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = dy + r * N + n0;
        for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<acc_t>(row[j]);
      }
      scalar_t* o = out + g * N + n0;
      for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

at::Tensor grouped_bias_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& offsets) {
  // grad_out [M, N], offsets [E] -> grad_bias [E, N] in grad_out's dtype: per-group row sums,
  // accumulated in float32 (float64 for float64) in row order.
  constexpr const char* op = "grouped_bias_grad";
  const GmmDims d = check_grouped_bias_grad_args(grad_out_in, offsets);
  const int64_t M = d.M, N = d.N, E = d.E;
  const auto ends = check_offsets(offsets, E, M, op, "grad_out", /*read_values=*/true);
  auto dy = grad_out_in.contiguous();
  auto out = at::empty({E, N}, dy.options());
  if (E == 0 || N == 0) return out;
  MS_DISPATCH_FLOATS(dy.scalar_type(), "moestream.grouped_bias_grad", [&] {
    bias_grad_kernel<scalar_t, acc_t<scalar_t>>(dy.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                          ends, N);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_cpu);
  m.impl("grouped_bias_grad", &grouped_bias_grad_cpu);
}

}  // namespace moestream
