// CPU building blocks shared by the gated-activation kernels and the fused expert path:
// dtype conversion of rows, (de)interleaving, and the activation math on contiguous gate / up
// arrays (forward and backward), in float32 (float64 for float64 inputs).
//
// The hot loops have AVX2 + FMA versions (MS_TARGET_AVX2, common/cpu_isa.h), chosen at run time
// when the CPU has them; the portable scalar versions serve everything else (and float64).
// Nothing here includes vectorised ATen headers compiled for another ISA, so no code built for
// AVX2 can leak into the baseline paths.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/types.h"

namespace moestream {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// AVX2 helpers

#if MS_HAVE_X86_SIMD
MS_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MS_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MS_TARGET_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

MS_TARGET_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// Round to nearest even like c10::BFloat16(float); NaN becomes the quiet NaN 0x7FC0.
MS_TARGET_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  __m256i b = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
  r = _mm256_srli_epi32(r, 16);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
MS_TARGET_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

MS_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) to about 1 ulp (Cephes' single-precision polynomial after the usual range reduction).
// Inputs are clamped to [-87.3, 88.3] so 2^n stays a normal number; NaN propagates.
MS_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // max(a, b) returns b when either is NaN
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(y, pow2n);
}

MS_TARGET_AVX2 inline __m256 sigmoid8(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
}
#endif

// ---------------------------------------------------------------------------------------------
// row conversion: any float dtype <-> the accumulation type

template <typename scalar_t>
inline void to_acc(const scalar_t* src, acc_t<scalar_t>* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    if (n > 0) std::memcpy(dst, src, sizeof(scalar_t) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename scalar_t>
inline void from_acc(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    if (n > 0) std::memcpy(dst, src, sizeof(scalar_t) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

#if MS_HAVE_X86_SIMD
template <typename scalar_t>
MS_TARGET_AVX2 inline void to_float_avx2(const scalar_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename scalar_t>
MS_TARGET_AVX2 inline void from_float_avx2(const float* src, scalar_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}
#endif

// Vectorised where it pays: bfloat16 / float16 rows on AVX2 machines.
template <typename scalar_t>
inline void to_acc_fast(const scalar_t* src, acc_t<scalar_t>* dst, int64_t n) {
#if MS_HAVE_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (has_avx2()) return to_float_avx2(src, dst, n);
  }
#endif
  to_acc(src, dst, n);
}

template <typename scalar_t>
inline void from_acc_fast(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n) {
#if MS_HAVE_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (has_avx2()) return from_float_avx2(src, dst, n);
  }
#endif
  from_acc(src, dst, n);
}

template <typename T>
inline void deinterleave(const T* src, T* g, T* u, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    g[j] = src[2 * j];
    u[j] = src[2 * j + 1];
  }
}

template <typename T>
inline void interleave(const T* g, const T* u, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[2 * j] = g[j];
    dst[2 * j + 1] = u[j];
  }
}

// ---------------------------------------------------------------------------------------------
// activation math on contiguous gate / up arrays of length n

// swiglu: silu(g) * u; geglu: gelu(g) * u (erf form);
// gptoss: gc = min(g, limit), uc = clamp(u, -limit, limit), gc * sigmoid(alpha * gc) * (uc + 1).
template <typename T>
inline void act_fwd_scalar(ActKind kind, int64_t n, const T* g, const T* u, T* out, T alpha, T limit) {
  switch (kind) {
    case ActKind::kSwiglu:
      for (int64_t j = 0; j < n; ++j) out[j] = g[j] / (T(1) + std::exp(-g[j])) * u[j];
      break;
    case ActKind::kGeglu:
      for (int64_t j = 0; j < n; ++j) {
        const T x = g[j];
        out[j] = T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2))) * u[j];
      }
      break;
    case ActKind::kGptoss:
      for (int64_t j = 0; j < n; ++j) {
        const T gc = std::isnan(g[j]) ? g[j] : std::min(g[j], limit);
        const T uc = std::isnan(u[j]) ? u[j] : std::min(std::max(u[j], -limit), limit);
        out[j] = gc / (T(1) + std::exp(-alpha * gc)) * (uc + T(1));
      }
      break;
  }
}

// Gradients of the above with respect to g and u, given dy. Clamps pass the gradient exactly
// where torch.clamp's backward does: min <= x <= max (so a value equal to a bound passes).
template <typename T>
inline void act_bwd_scalar(ActKind kind, int64_t n, const T* g, const T* u, const T* dy, T* dg, T* du, T alpha,
                           T limit) {
  switch (kind) {
    case ActKind::kSwiglu:
      for (int64_t j = 0; j < n; ++j) {
        const T x = g[j];
        const T s = T(1) / (T(1) + std::exp(-x));
        dg[j] = dy[j] * u[j] * s * (T(1) + x * (T(1) - s));
        du[j] = dy[j] * x * s;
      }
      break;
    case ActKind::kGeglu:
      for (int64_t j = 0; j < n; ++j) {
        const T x = g[j];
        const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
        const T pdf = std::exp(T(-0.5) * x * x) * T(0.3989422804014327);  // 1/sqrt(2 pi)
        dg[j] = dy[j] * u[j] * (cdf + x * pdf);
        du[j] = dy[j] * x * cdf;
      }
      break;
    case ActKind::kGptoss:
      for (int64_t j = 0; j < n; ++j) {
        const bool pass_g = g[j] <= limit;
        const bool pass_u = u[j] >= -limit && u[j] <= limit;
        const T gc = std::isnan(g[j]) ? g[j] : std::min(g[j], limit);
        const T uc = std::isnan(u[j]) ? u[j] : std::min(std::max(u[j], -limit), limit);
        const T s = T(1) / (T(1) + std::exp(-alpha * gc));
        const T f = gc * s;
        const T df = s + alpha * gc * s * (T(1) - s);
        dg[j] = pass_g ? dy[j] * (uc + T(1)) * df : T(0);
        du[j] = pass_u ? dy[j] * f : T(0);
      }
      break;
  }
}

#if MS_HAVE_X86_SIMD
MS_TARGET_AVX2 inline void act_fwd_avx2(ActKind kind, int64_t n, const float* g, const float* u, float* out,
                                        float alpha, float limit) {
  int64_t j = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  if (kind == ActKind::kSwiglu) {
    for (; j + 8 <= n; j += 8) {
      __m256 x = _mm256_loadu_ps(g + j);
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid8(x)), _mm256_loadu_ps(u + j)));
    }
  } else if (kind == ActKind::kGptoss) {
    const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), al = _mm256_set1_ps(alpha);
    for (; j + 8 <= n; j += 8) {
      __m256 gc = _mm256_min_ps(lim, _mm256_loadu_ps(g + j));  // NaN in g propagates
      __m256 uc = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_loadu_ps(u + j)));
      __m256 f = _mm256_mul_ps(gc, sigmoid8(_mm256_mul_ps(al, gc)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(f, _mm256_add_ps(uc, one)));
    }
  }
  // geglu (std::erf) and the tails run the scalar code
  act_fwd_scalar<float>(kind, n - j, g + j, u + j, out + j, alpha, limit);
}

MS_TARGET_AVX2 inline void act_bwd_avx2(ActKind kind, int64_t n, const float* g, const float* u, const float* dy,
                                        float* dg, float* du, float alpha, float limit) {
  int64_t j = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  if (kind == ActKind::kSwiglu) {
    for (; j + 8 <= n; j += 8) {
      __m256 x = _mm256_loadu_ps(g + j), d = _mm256_loadu_ps(dy + j);
      __m256 s = sigmoid8(x);
      __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
      _mm256_storeu_ps(dg + j, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + j)), ds));
      _mm256_storeu_ps(du + j, _mm256_mul_ps(d, _mm256_mul_ps(x, s)));
    }
  } else if (kind == ActKind::kGptoss) {
    const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), al = _mm256_set1_ps(alpha);
    for (; j + 8 <= n; j += 8) {
      __m256 gx = _mm256_loadu_ps(g + j), ux = _mm256_loadu_ps(u + j), d = _mm256_loadu_ps(dy + j);
      __m256 pass_g = _mm256_cmp_ps(gx, lim, _CMP_LE_OQ);
      __m256 pass_u = _mm256_and_ps(_mm256_cmp_ps(ux, nlim, _CMP_GE_OQ), _mm256_cmp_ps(ux, lim, _CMP_LE_OQ));
      __m256 gc = _mm256_min_ps(lim, gx);
      __m256 uc = _mm256_min_ps(lim, _mm256_max_ps(nlim, ux));
      __m256 s = sigmoid8(_mm256_mul_ps(al, gc));
      __m256 f = _mm256_mul_ps(gc, s);
      __m256 df = _mm256_fmadd_ps(_mm256_mul_ps(al, gc), _mm256_mul_ps(s, _mm256_sub_ps(one, s)), s);
      __m256 vdg = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_add_ps(uc, one)), df);
      _mm256_storeu_ps(dg + j, _mm256_and_ps(vdg, pass_g));
      _mm256_storeu_ps(du + j, _mm256_and_ps(_mm256_mul_ps(d, f), pass_u));
    }
  }
  act_bwd_scalar<float>(kind, n - j, g + j, u + j, dy + j, dg + j, du + j, alpha, limit);
}
#endif

inline void act_fwd(ActKind kind, int64_t n, const float* g, const float* u, float* out, float alpha, float limit) {
#if MS_HAVE_X86_SIMD
  if (has_avx2()) return act_fwd_avx2(kind, n, g, u, out, alpha, limit);
#endif
  act_fwd_scalar<float>(kind, n, g, u, out, alpha, limit);
}
inline void act_fwd(ActKind kind, int64_t n, const double* g, const double* u, double* out, double alpha,
                    double limit) {
  act_fwd_scalar<double>(kind, n, g, u, out, alpha, limit);
}

inline void act_bwd(ActKind kind, int64_t n, const float* g, const float* u, const float* dy, float* dg, float* du,
                    float alpha, float limit) {
#if MS_HAVE_X86_SIMD
  if (has_avx2()) return act_bwd_avx2(kind, n, g, u, dy, dg, du, alpha, limit);
#endif
  act_bwd_scalar<float>(kind, n, g, u, dy, dg, du, alpha, limit);
}
inline void act_bwd(ActKind kind, int64_t n, const double* g, const double* u, const double* dy, double* dg,
                    double* du, double alpha, double limit) {
  act_bwd_scalar<double>(kind, n, g, u, dy, dg, du, alpha, limit);
}

}  // namespace cpu
}  // namespace moestream
