// CPU int8 / int4 matmuls on the packed group-wise format (python/moestream/quant.py):
//   qgrouped_mm: out[rows of g] = a[rows of g] @ W_g^T (+ bias[g]), W_g [N, K] the packed weight of group g
//   qlinear:     out = x @ W^T (+ bias), one packed [N, K] weight
// The full-precision weights are never materialised: a few rows of W at a time are dequantised into
// a float32 buffer that stays in L1/L2 and is used right away, for every row of a at once.
//  - few rows per group (decode: 1-16 tokens; the case bound by reading the weights): 4 weight rows
//    are dequantised, then every row of a takes 4 dot products against them (one load of a feeds
//    4 FMAs). The bytes read are the packed ones: 1.06 (int8) or 0.56 (int4) bytes per weight at
//    group 64, against 2 for bfloat16.
//  - int4 weights with bfloat16 activations on AVX512-BF16, up to 8 rows per group: VDPBF16PS on
//    the codes looked up as exact bf16 integers, the group's scale applied to each group's partial
//    sum (fused_bf16); the other few-row cases dequantise in registers to float32 (fused_avx512).
//    Both prefetch the packed rows in software.
//  - many rows: a panel of W (K x P floats, about 256 KiB) is dequantised and multiplied by the
//    group's rows with ATen's SGEMM (at::cpu::mm_out), panel after panel.
//  - activations "int8" ("auto" for bfloat16 / float16 a) on AVX-512 VNNI, groups up to kA8Rows
//    rows: a quantized to int8 per call and VPDPBUSD on the codes (quant_a8_cpu.cpp), which reads
//    the weights at the memory's speed where the kernels above are bound by their arithmetic. The
//    rest of this comment is about activations "float" (weight-only), and larger groups.
// Dequantisation is (code - zero) * scale in float32, exactly as quant.dequantize computes it, so the
// result equals dequantize-then-matmul up to the order of the float32 sums (fixed for a given ISA and
// shape: deterministic). AVX-512 and AVX2 versions are chosen at run time (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "grouped_mm/grouped_mm_checks.h"
#include "quant/quant_checks.h"
#include "quant/quant_cpu.h"

#if MS_HAVE_X86_SIMD
#define MS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define MS_TARGET_AVX512
#endif

namespace moestream {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

// The widest ISA the CPU has; the environment variable MOESTREAM_QUANT_ISA=avx512|avx2|scalar caps
// it, so that the tests run every version on one machine (avx512: the float32 AVX-512 kernels, not
// the VDPBF16PS one; read at each call: a getenv, nothing next to the kernel).
Isa cpu_isa() {
  Isa best = cpu::has_avx512_bf16()      ? Isa::kAvx512Bf16
             : cpu::has_avx512_bw_vl_dq() ? Isa::kAvx512
             : cpu::has_avx2()            ? Isa::kAvx2
                                          : Isa::kScalar;
  const char* cap = std::getenv("MOESTREAM_QUANT_ISA");
  if (cap != nullptr) {
    Isa c = best;
    if (std::strcmp(cap, "scalar") == 0) c = Isa::kScalar;
    else if (std::strcmp(cap, "avx2") == 0) c = Isa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) c = Isa::kAvx512;
    return std::min(c, best);
  }
  return best;
}

using quant::for_each_tile;
using quant::Packed;

// ----------------------------------------------------------------------------------------------
// dequantising one row: codes [row_bytes], scales [G], zeros [G] -> out [K] float32

void dequant_row_scalar(const uint8_t* q, const float* s, const float* z, int bits, int64_t gs, int64_t G,
                        float* out) {
  const float zdef = static_cast<float>(1 << (bits - 1));
  for (int64_t j = 0; j < G; ++j) {
    const float sc = s[j], zz = z ? z[j] : zdef;
    float* o = out + j * gs;
    if (bits == 8) {
      const uint8_t* qg = q + j * gs;
      for (int64_t i = 0; i < gs; ++i) o[i] = (static_cast<float>(qg[i]) - zz) * sc;
    } else {
      const uint8_t* qg = q + j * gs / 2;
      for (int64_t b = 0; b < gs / 32; ++b) {
        for (int i = 0; i < 16; ++i) {
          const uint8_t v = qg[b * 16 + i];
          o[b * 32 + i] = (static_cast<float>(v & 15) - zz) * sc;
          o[b * 32 + 16 + i] = (static_cast<float>(v >> 4) - zz) * sc;
        }
      }
    }
  }
}

#if MS_HAVE_X86_SIMD
MS_TARGET_AVX2 void dequant_row_avx2(const uint8_t* q, const float* s, const float* z, int bits, int64_t gs,
                                     int64_t G, float* out) {
  const float zdef = static_cast<float>(1 << (bits - 1));
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t j = 0; j < G; ++j) {
    const __m256 sv = _mm256_set1_ps(s[j]), zv = _mm256_set1_ps(z ? z[j] : zdef);
    float* o = out + j * gs;
    if (bits == 8) {
      const uint8_t* qg = q + j * gs;
      for (int64_t i = 0; i < gs; i += 8) {
        const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg + i));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_sub_ps(v, zv), sv));
      }
    } else {
      const uint8_t* qg = q + j * gs / 2;
      for (int64_t b = 0; b < gs / 32; ++b) {
        for (int h = 0; h < 16; h += 8) {
          const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg + b * 16 + h));
          const __m256i w = _mm256_cvtepu8_epi32(c);
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
          _mm256_storeu_ps(o + b * 32 + h, _mm256_mul_ps(_mm256_sub_ps(lo, zv), sv));
          _mm256_storeu_ps(o + b * 32 + 16 + h, _mm256_mul_ps(_mm256_sub_ps(hi, zv), sv));
        }
      }
    }
  }
}

MS_TARGET_AVX512 void dequant_row_avx512(const uint8_t* q, const float* s, const float* z, int bits, int64_t gs,
                                         int64_t G, float* out) {
  const float zdef = static_cast<float>(1 << (bits - 1));
  const __m512i mask = _mm512_set1_epi32(15);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < G; ++j) {
    const __m512 sv = _mm512_set1_ps(s[j]), zv = _mm512_set1_ps(z ? z[j] : zdef);
    float* o = out + j * gs;
    if (bits == 8) {
      const uint8_t* qg = q + j * gs;
      for (int64_t i = 0; i < gs; i += 16) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + i));
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_sub_ps(v, zv), sv));
      }
    } else {
      // the 16 values of the group's codes, (c - zero) * scale, looked up by the nibbles: the same
      // float32 arithmetic as computing each element, a third of the instructions
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, zv), sv);
      const uint8_t* qg = q + j * gs / 2;
      for (int64_t b = 0; b < gs / 32; ++b) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + b * 16)));
        _mm512_storeu_ps(o + b * 32, _mm512_permutexvar_ps(_mm512_and_si512(w, mask), table));
        _mm512_storeu_ps(o + b * 32 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), table));
      }
    }
  }
}
#endif

void dequant_row(Isa isa, const Packed& p, int64_t e, int64_t n, float* out) {
  const uint8_t* q = p.codes(e, n);
  const float* s = p.scales(e, n);
  const float* z = p.zeros(e, n);
#if MS_HAVE_X86_SIMD
  if (isa >= Isa::kAvx512) return dequant_row_avx512(q, s, z, p.bits, p.gs, p.G, out);
  if (isa == Isa::kAvx2) return dequant_row_avx2(q, s, z, p.bits, p.gs, p.G, out);
#endif
  dequant_row_scalar(q, s, z, p.bits, p.gs, p.G, out);
}

// ----------------------------------------------------------------------------------------------
// dot products of one row of a with nb (<= 4) dequantised weight rows w + j * K; K % 32 == 0

constexpr int kNB = 4;

void dot4_scalar(const float* a, const float* w, int64_t K, int nb, float* res) {
  for (int j = 0; j < nb; ++j) {
    float p[16] = {0};
    const float* wj = w + j * K;
    for (int64_t k = 0; k < K; k += 16)
      for (int l = 0; l < 16; ++l) p[l] += a[k + l] * wj[k + l];
    for (int h = 8; h >= 1; h /= 2)
      for (int l = 0; l < h; ++l) p[l] += p[l + h];
    res[j] = p[0];
  }
}

#if MS_HAVE_X86_SIMD
MS_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MS_TARGET_AVX2 void dot4_avx2(const float* a, const float* w, int64_t K, int nb, float* res) {
  __m256 acc[kNB][2];
  for (int j = 0; j < kNB; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  if (nb == kNB) {
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 a0 = _mm256_loadu_ps(a + k), a1 = _mm256_loadu_ps(a + k + 8);
      for (int j = 0; j < kNB; ++j) {
        acc[j][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w + j * K + k), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w + j * K + k + 8), acc[j][1]);
      }
    }
  } else {
    for (int j = 0; j < nb; ++j)
      for (int64_t k = 0; k < K; k += 16) {
        acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(w + j * K + k), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(w + j * K + k + 8), acc[j][1]);
      }
  }
  for (int j = 0; j < nb; ++j) res[j] = hsum256(_mm256_add_ps(acc[j][0], acc[j][1]));
}

MS_TARGET_AVX512 void dot4_avx512(const float* a, const float* w, int64_t K, int nb, float* res) {
  __m512 acc[kNB][2];
  for (int j = 0; j < kNB; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  if (nb == kNB) {
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 a0 = _mm512_loadu_ps(a + k), a1 = _mm512_loadu_ps(a + k + 16);
      for (int j = 0; j < kNB; ++j) {
        acc[j][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(w + j * K + k), acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(w + j * K + k + 16), acc[j][1]);
      }
    }
  } else {
    for (int j = 0; j < nb; ++j)
      for (int64_t k = 0; k < K; k += 32) {
        acc[j][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(w + j * K + k), acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(w + j * K + k + 16), acc[j][1]);
      }
  }
  for (int j = 0; j < nb; ++j) res[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
}
#endif

void dot4(Isa isa, const float* a, const float* w, int64_t K, int nb, float* res) {
#if MS_HAVE_X86_SIMD
  if (isa >= Isa::kAvx512) return dot4_avx512(a, w, K, nb, res);
  if (isa == Isa::kAvx2) return dot4_avx2(a, w, K, nb, res);
#endif
  dot4_scalar(a, w, K, nb, res);
}

// ----------------------------------------------------------------------------------------------
// AVX-512, few rows: dequantise in registers, no buffer. For NB weight rows (n .. n+NB) and MB rows
// of a at once, every 32 weights are turned into two vectors and feed 2 * MB FMAs per weight row;
// two accumulators per (weight row, a row) keep independent FMA chains (one chain per output was
// FMA-latency bound). res[j * MB + m] = <a row m, weight row n + j>.

#if MS_HAVE_X86_SIMD
// Software prefetch in the kernels that read the packed rows: the bytes kPfBytes ahead of the ones
// being read (the rows of a work item are contiguous, so that is the next weight rows). One thread
// of the 2-core VM read the int4 codes of 4 experts [1024 x 1024] at 4.5-5 GB/s without it and
// at ~7 GB/s with it; 4-48 KiB ahead measured alike within the noise of the shared machine
// (QuantizedGroupedExperts at 1 token, weights rotated through 16 copies).
constexpr int64_t kPfBytes = 8192;

template <int NB, int MB>
MS_TARGET_AVX512 void fused_avx512(const Packed& p, int64_t e, int64_t n, const float* a, int64_t lda, float* res) {
  __m512 acc[NB][MB][2];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m][0] = acc[j][m][1] = _mm512_setzero_ps();
  const int64_t gs = p.gs, G = p.G;
  const float zdef = static_cast<float>(1 << (p.bits - 1));
  const __m512i mask = _mm512_set1_epi32(15);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* q[NB];
  const float* s[NB];
  const float* z[NB];
  for (int j = 0; j < NB; ++j) {
    q[j] = p.codes(e, n + j);
    s[j] = p.scales(e, n + j);
    z[j] = p.zeros(e, n + j);
  }
  const int64_t pf = kPfBytes, gbytes = p.bits == 4 ? gs / 2 : gs;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gs;
    for (int j = 0; j < NB; ++j)
      for (int64_t o = 0; o < gbytes; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q[j] + g * gbytes + o + pf), _MM_HINT_T0);
    if (p.bits == 4) {
      __m512 table[NB];
      for (int j = 0; j < NB; ++j)
        table[j] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z[j] ? z[j][g] : zdef)), _mm512_set1_ps(s[j][g]));
      for (int64_t b = 0; b < gs; b += 32) {
        const int64_t k = k0 + b;
        for (int j = 0; j < NB; ++j) {
          const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + k / 2)));
          const __m512 w0 = _mm512_permutexvar_ps(_mm512_and_si512(c, mask), table[j]);
          const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table[j]);
          for (int m = 0; m < MB; ++m) {
            acc[j][m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k), w0, acc[j][m][0]);
            acc[j][m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k + 16), w1, acc[j][m][1]);
          }
        }
      }
    } else {
      __m512 sv[NB], zv[NB];
      for (int j = 0; j < NB; ++j) {
        sv[j] = _mm512_set1_ps(s[j][g]);
        zv[j] = _mm512_set1_ps(z[j] ? z[j][g] : zdef);
      }
      for (int64_t b = 0; b < gs; b += 32) {
        const int64_t k = k0 + b;
        for (int j = 0; j < NB; ++j) {
          const __m512 c0 = _mm512_cvtepi32_ps(
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + k))));
          const __m512 c1 = _mm512_cvtepi32_ps(
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + k + 16))));
          const __m512 w0 = _mm512_mul_ps(_mm512_sub_ps(c0, zv[j]), sv[j]);
          const __m512 w1 = _mm512_mul_ps(_mm512_sub_ps(c1, zv[j]), sv[j]);
          for (int m = 0; m < MB; ++m) {
            acc[j][m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k), w0, acc[j][m][0]);
            acc[j][m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k + 16), w1, acc[j][m][1]);
          }
        }
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) res[j * MB + m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][m][0], acc[j][m][1]));
}

using FusedFn = void (*)(const Packed&, int64_t, int64_t, const float*, int64_t, float*);

// Weight rows per call for mb rows of a: 2 * NB * MB accumulators stay within 16 of the 32
// registers; with one row of a, four weight rows share nothing but keep 8 chains in flight.
constexpr int fused_nb(int mb) { return mb == 1 ? 4 : (mb == 2 ? 2 : 1); }

template <int MB>
FusedFn fused_fn(int nb) {
  constexpr int NB = fused_nb(MB);
  return nb == NB ? &fused_avx512<NB, MB> : &fused_avx512<1, MB>;
}

FusedFn pick_fused(int mb, int nb) {
  switch (mb) {
    case 1: return fused_fn<1>(nb);
    case 2: return fused_fn<2>(nb);
    case 3: return fused_fn<3>(nb);
    case 4: return fused_fn<4>(nb);
    case 5: return fused_fn<5>(nb);
    case 6: return fused_fn<6>(nb);
    case 7: return fused_fn<7>(nb);
    default: return fused_fn<8>(nb);
  }
}

// out[r0:r1, n0:n1] of group g (rows of a at af, stride K; out stride N) with the fused kernels.
void fused_item(const Packed& p, int64_t g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, const float* af,
                int64_t lda, const float* bg, float* out) {
  for_each_tile(
      r0, r1, n0, n1, p.N, fused_nb,
      [&](int mb, int nb, int64_t n, int64_t m0, float* res) { pick_fused(mb, nb)(p, g, n, af + m0 * lda, lda, res); },
      [&](float v, int64_t, int64_t n) { return bg ? v + bg[n] : v; }, out);
}
#endif

// ----------------------------------------------------------------------------------------------
// AVX512-BF16, int4 weights, bfloat16 activations, few rows: VDPBF16PS (32 bf16 products per
// instruction, float32 sums). The codes are small integers, exact in bfloat16, and so are the
// activations, so every product is exact: per (weight row, a row) the dot product of each group
// with the centred codes (c - 8) is summed in float32 and multiplied by the group's scale once
// (acc += part * scale). An asymmetric zero point adds (8 - zero) * scale * sum(a over the group)
// per group, with the groups' activation sums computed once per call (asum). The result is
// dequantize-then-matmul up to the order of the float32 sums. VPERMW looks the centred bf16 code
// up in a 32-entry table (the 16 values twice: bit 4 of an index, left over from a neighbouring
// nibble, is ignored).
//  - groups of 64 or 128 ("wide"): 32 bytes zero-extended to 16-bit lanes give 64 weights with 4
//    instructions (two lookups, one shift); the activations are reordered once per call to match.
//  - groups of 32 or 96: the 16 bytes of each 32-element run, broadcast to both halves of a ymm,
//    widened and shifted by 0 (lanes 0-15) or 4 (lanes 16-31): lane i is element i, in the
//    activations' own order (3 instructions per 32 weights).
// Measured (one thread of the 2-core VM, shared; see the table above the driver): VDPBF16PS issued
// at about one per ns there, barely more multiply-adds per ns than two float32 FMAs, so the gain
// over fused_avx512 comes from the cheaper decoding only: 5-10% at 1-2 rows, none at 4-8, a loss
// at 16. int8 through VCVTNE2PS2BF16 (7 instructions per 32 weights) was slower than fused_avx512
// at every row count and is not used.

#if MS_HAVE_X86_SIMD

// int4 with groups of 64 or 128: the layout of the activations the wide loop of fused_bf16 reads
// (each 64 elements as 0-15, 32-47, 16-31, 48-63).
bool bf16_reorder(int64_t gs) { return gs % 64 == 0; }

template <int NB, int MB>
MS_TARGET_AVX512BF16 void fused_bf16(const Packed& p, int64_t e, int64_t n, const c10::BFloat16* a, int64_t lda,
                                     float* res) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  const int64_t gs = p.gs, G = p.G;
  // bf16 bits of (i & 15) - 8, i = 0..31: small integers, so the top half of their float32 bits
  alignas(64) static const uint16_t kTable4[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000,
      0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
      0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i table = _mm512_load_si512(kTable4);
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const uint8_t* q[NB];
  const float* s[NB];
  for (int j = 0; j < NB; ++j) {
    q[j] = p.codes(e, n + j);
    s[j] = p.scales(e, n + j);
  }
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
  const int64_t pf = kPfBytes;
  const int64_t gbytes = gs / 2;
  const bool wide = gs % 64 == 0;
  for (int64_t g = 0; g < G; ++g) {
    __m512 part[NB][MB];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) part[j][m] = _mm512_setzero_ps();
    for (int j = 0; j < NB; ++j)
      for (int64_t o = 0; o < gbytes; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q[j] + g * gbytes + o + pf), _MM_HINT_T0);
    if (wide) {
      // 64 weights from 32 bytes: zero-extended to 16-bit lanes, lane i is byte i; its low nibble
      // is looked up directly, its high nibble after a shift (4 instructions per 64 weights). Lane i
      // of the low vector is element i of the first 16-byte run (i < 16) or element i - 16 of the
      // second (+32); the activations were reordered to match (bf16_reorder).
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
        for (int j = 0; j < NB; ++j) {
          const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[j] + k / 2)));
          const __m512bh lo = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(x, table));
          const __m512bh hi = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(x, 4), table));
          for (int m = 0; m < MB; ++m) {
            const uint16_t* am = a16 + m * lda + k;
            part[j][m] = _mm512_dpbf16_ps(part[j][m], reinterpret_cast<__m512bh>(_mm512_loadu_si512(am)), lo);
            part[j][m] = _mm512_dpbf16_ps(part[j][m], reinterpret_cast<__m512bh>(_mm512_loadu_si512(am + 32)), hi);
          }
        }
      }
    } else {
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        for (int j = 0; j < NB; ++j) {
          const __m256i raw =
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + k / 2)));
          const __m512bh wb = reinterpret_cast<__m512bh>(
              _mm512_permutexvar_epi16(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(raw), shifts), table));
          for (int m = 0; m < MB; ++m) {
            const __m512bh av = reinterpret_cast<__m512bh>(_mm512_loadu_si512(a16 + m * lda + k));
            part[j][m] = _mm512_dpbf16_ps(part[j][m], av, wb);
          }
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m512 sv = _mm512_set1_ps(s[j][g]);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(part[j][m], sv, acc[j][m]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) res[j * MB + m] = _mm512_reduce_add_ps(acc[j][m]);
}

using FusedBf16Fn = void (*)(const Packed&, int64_t, int64_t, const c10::BFloat16*, int64_t, float*);

// Weight rows per call for mb rows of a: 2 * NB * MB accumulators (part, acc), at most 16 of the 32
// registers; more weight rows at one row keep more independent VDPBF16PS chains in flight.
constexpr int bf16_nb(int mb) { return mb == 1 ? 8 : (mb == 2 ? 4 : (mb <= 4 ? 2 : 1)); }

template <int MB>
FusedBf16Fn bf16_fn(int nb) {
  constexpr int NB = bf16_nb(MB);
  return nb == NB ? &fused_bf16<NB, MB> : &fused_bf16<1, MB>;
}

FusedBf16Fn pick_bf16(int mb, int nb) {
  switch (mb) {
    case 1: return bf16_fn<1>(nb);
    case 2: return bf16_fn<2>(nb);
    case 3: return bf16_fn<3>(nb);
    case 4: return bf16_fn<4>(nb);
    case 5: return bf16_fn<5>(nb);
    case 6: return bf16_fn<6>(nb);
    case 7: return bf16_fn<7>(nb);
    default: return bf16_fn<8>(nb);
  }
}

// out[r0:r1, n0:n1] of group g with the bf16 kernels (a: bf16 rows, stride lda; asum [M, G] the
// groups' activation sums when the weight has zero points, else null).
void bf16_item(const Packed& p, int64_t g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, const c10::BFloat16* a,
               int64_t lda, const float* asum, const float* bg, float* out) {
  const int64_t N = p.N, G = p.G;
  const float zdef = static_cast<float>(1 << (p.bits - 1));
  for_each_tile(
      r0, r1, n0, n1, N, bf16_nb,
      [&](int mb, int nb, int64_t n, int64_t m0, float* res) { pick_bf16(mb, nb)(p, g, n, a + m0 * lda, lda, res); },
      [&](float v, int64_t m, int64_t n) {
        if (p.z) {
          // the zero point: sum over groups of (2^(bits-1) - zero) * scale * sum(a over the group)
          const float* s = p.scales(g, n);
          const float* z = p.zeros(g, n);
          const float* as = asum + m * G;
          float c = 0.f;
          for (int64_t h = 0; h < G; ++h) c += (zdef - z[h]) * s[h] * as[h];
          v += c;
        }
        return bg ? v + bg[n] : v;
      },
      out);
}
#endif

// ----------------------------------------------------------------------------------------------
// float32 -> bfloat16 (round to nearest even; the values are finite) for the bf16 panels

void to_bf16_scalar(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

#if MS_HAVE_X86_SIMD
MS_TARGET_AVX512 void to_bf16_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(src + i));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
  to_bf16_scalar(src + i, dst + i, n - i);
}
#endif

// ----------------------------------------------------------------------------------------------
// the driver

// Groups up to this many rows take the fused AVX-512 kernel (other ISAs: the dot-product kernel
// on dequantised rows, up to kSmallRows); larger ones take dequantised panels + a BLAS GEMM.
// Measured on one thread of the 2-core Xeon test VM (AVX-512 + AVX512-BF16, shared with other
// jobs: minima of 24 calls, weights rotated through 16 copies, > L3), qlinear [M, 4096] x
// [4096, 4096], group 64, bf16 activations, ms (2026-12-01; indicative, the machine was busy):
//   rows                1     2     4     8     16    32
//   bf16 F.linear       3.1   3.6   3.6   3.6   4.2   8.0   (oneDNN, bf16 weights)
//   int4, VDPBF16PS     1.85  2.1   3.6   5.0   -     -     (fused_bf16)
//   int4, float32 FMA   1.8   2.5   4.5   10.8  20.5  -     (fused_avx512)
//   int4, panels        -     -     -     -     -     13.1
//   int8, float32 FMA   2.3   2.7   6.9   6.1   19.8  16.7  (32: panels)
// (An earlier run of the same table: 1 row 1.7 ms int4 against 5.2 ms bf16.) A microbenchmark of
// the loops on that VM put VDPBF16PS at about one per ns and a float32 FMA at 0.67 ns: 32 against
// 24 multiply-adds per ns, so the bf16 kernel gains from its cheaper decoding only; beyond ~4 rows
// both are compute-bound and lose to oneDNN (the repeated decode of each weight for every block of
// 8 rows, where oneDNN reads bf16 as it is).
constexpr int64_t kFusedRows = 16;
constexpr int64_t kSmallRows = 16;
// int4 with bfloat16 activations on AVX512-BF16: groups up to this many rows take the VDPBF16PS
// kernel (no faster than fused_avx512 beyond, slower at 16 rows).
constexpr int64_t kBf16Rows = 8;
// int8 activations (quant_a8_cpu.cpp): groups up to this many rows take the VNNI kernels, larger
// ones the float kernels (the panels). qlinear [M, 2048] x [2048, 2048] group 64, bf16, one thread
// of the 2-core test VM, ms, int8 activations / float:
//   rows   16          32          64
//   int4   2.2 / 4.9   4.5 / 4.8   7.2 / 5.6
//   int8   3.2 / 4.6   6.1 / 5.1   11.9 / 6.1
constexpr int64_t kA8Rows = 16;
// Output columns (rows of W) per work item of the small-row kernels.
constexpr int64_t kSmallCols = 64;
// ... and of the int8-activation kernels: each item is one stream of packed rows, whose first
// kilobytes are read before any prefetch reaches them, so fewer, longer items
constexpr int64_t kA8Cols = 256;

struct Item {
  int64_t g, r0, r1, n0, n1;
};

// Columns of the dequantised panel: about 2 MiB of panel (elem_bytes each), at least 64. Splitting
// one GEMM into narrow panels costs: [16, 4096] x [4096, 4096] in bf16 took 2.5x longer as 64-column
// panels than as 1024-column ones on the 2-core test machine (one thread).
int64_t panel_cols(int64_t K, int64_t N, int64_t elem_bytes) {
  const int64_t p = std::max<int64_t>(64, (int64_t(2) << 20) / elem_bytes / std::max<int64_t>(K, 1) / 16 * 16);
  return std::min(p, N);
}

struct Inputs {
  const float* af;  // a in float32, rows of stride lda (padded: rows 16 KiB apart alias in L1); null
                    // when every group takes a bf16 path
  int64_t lda;
  const c10::BFloat16* ab;  // a itself when the panels are bfloat16 (else null), stride K
  const float* bias;        // [E, N] float32 or null
  const c10::BFloat16* ah;  // a in bf16 for the VDPBF16PS kernel (else null), rows of stride ldh
  int64_t ldh;
  const float* asum;  // [M, G] sums of a over each group (the zero points' term), or null
  const quant::a8::Activations* act;  // a in int8 for the VNNI kernels (groups up to kA8Rows), or null
  const quant::a8::BlockMap* bm;
};

// out_f [M, N] float32 (rows past ends[E-1] already zero) <- the groups' products.
void qmm_run(const Packed& p, const Inputs& in, const std::vector<int64_t>& ends, float* out) {
  const int64_t K = p.K, N = p.N, E = static_cast<int64_t>(ends.size()), lda = in.lda;
  const int64_t P = panel_cols(K, N, in.ab != nullptr ? 2 : 4);
  const Isa isa = cpu_isa();
  const bool dp_bf16 = in.ah != nullptr;  // qmm_common sets it only with kAvx512Bf16 (int4, bf16 a)
  const int64_t small = isa >= Isa::kAvx512 ? kFusedRows : kSmallRows;
  std::vector<Item> items;
  int64_t start = 0;
  for (int64_t g = 0; g < E; ++g) {
    const int64_t r0 = start, r1 = ends[g];
    start = ends[g];
    if (r1 <= r0) continue;
    const bool a8 = in.act != nullptr && r1 - r0 <= kA8Rows;
    const int64_t w = a8 ? kA8Cols : (r1 - r0 <= small ? kSmallCols : P);
    for (int64_t n0 = 0; n0 < N; n0 += w) items.push_back({g, r0, r1, n0, std::min(N, n0 + w)});
  }
  if (items.empty()) return;
  const bool bf16_panels = in.ab != nullptr;
  const at::ThreadLocalState tls;
  // Items are taken from a shared counter rather than split up front: on a shared machine one
  // descheduled thread otherwise holds up the call with its whole half (2 threads ran 5x slower
  // than 1 on the busy 2-core test VM with a static split).
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(tls);
    std::vector<float> buf;
    std::vector<c10::BFloat16> hbuf;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const Item& it = items[i];
      const int64_t rows = it.r1 - it.r0, cols = it.n1 - it.n0;
      const float* bg = in.bias ? in.bias + it.g * N : nullptr;
      if (in.act != nullptr && rows <= kA8Rows) {
        quant::a8::item(p, *in.act, *in.bm, it.g, it.r0, it.r1, it.n0, it.n1, bg, out);
        continue;
      }
      if (rows <= small) {
#if MS_HAVE_X86_SIMD
        if (dp_bf16 && rows <= kBf16Rows) {
          bf16_item(p, it.g, it.r0, it.r1, it.n0, it.n1, in.ah, in.ldh, in.asum, bg, out);
          continue;
        }
        if (isa >= Isa::kAvx512) {
          fused_item(p, it.g, it.r0, it.r1, it.n0, it.n1, in.af, lda, bg, out);
          continue;
        }
#endif
        buf.resize(kNB * K);
        for (int64_t n = it.n0; n < it.n1; n += kNB) {
          const int nb = static_cast<int>(std::min<int64_t>(kNB, it.n1 - n));
          for (int j = 0; j < nb; ++j) dequant_row(isa, p, it.g, n + j, buf.data() + j * K);
          for (int64_t m = it.r0; m < it.r1; ++m) {
            float res[kNB];
            dot4(isa, in.af + m * lda, buf.data(), K, nb, res);
            float* o = out + m * N + n;
            for (int j = 0; j < nb; ++j) o[j] = bg ? res[j] + bg[n + j] : res[j];
          }
        }
        continue;
      }
      // panel: W rows [n0, n1) dequantised as [cols, K], then out[r0:r1, n0:n1] = a_rows @ panel^T
      auto f32 = at::TensorOptions().dtype(at::kFloat);
      float* cbuf;
      if (bf16_panels) {
        // bfloat16 inputs where ATen's bf16 GEMM is native (oneDNN): the panel rounded to bf16, row
        // by row through one float32 row
        buf.resize(K + rows * cols);
        hbuf.resize(cols * K + rows * cols);
        cbuf = buf.data() + K;
        for (int64_t n = it.n0; n < it.n1; ++n) {
          dequant_row(isa, p, it.g, n, buf.data());
#if MS_HAVE_X86_SIMD
          to_bf16_avx512(buf.data(), hbuf.data() + (n - it.n0) * K, K);
#else
          to_bf16_scalar(buf.data(), hbuf.data() + (n - it.n0) * K, K);
#endif
        }
        auto bf = at::TensorOptions().dtype(at::kBFloat16);
        auto A = at::from_blob(const_cast<c10::BFloat16*>(in.ab + it.r0 * K), {rows, K}, bf);
        auto Bt = at::from_blob(hbuf.data(), {cols, K}, bf);
        auto Ch = at::from_blob(hbuf.data() + cols * K, {rows, cols}, bf);
        at::cpu::mm_out(Ch, A, Bt.t());
        const c10::BFloat16* ch = hbuf.data() + cols * K;
        for (int64_t j = 0; j < rows * cols; ++j) cbuf[j] = static_cast<float>(ch[j]);
      } else {
        buf.resize(cols * K + rows * cols);
        float* panel = buf.data();
        cbuf = buf.data() + cols * K;
        for (int64_t n = it.n0; n < it.n1; ++n) dequant_row(isa, p, it.g, n, panel + (n - it.n0) * K);
        auto A = at::from_blob(const_cast<float*>(in.af + it.r0 * lda), {rows, K}, {lda, 1}, f32);
        auto Bt = at::from_blob(panel, {cols, K}, f32);
        auto C = at::from_blob(cbuf, {rows, cols}, f32);
        at::cpu::mm_out(C, A, Bt.t());
      }
      for (int64_t m = 0; m < rows; ++m) {
        float* o = out + (it.r0 + m) * N + it.n0;
        const float* c = cbuf + m * cols;
        if (bg) {
          for (int64_t j = 0; j < cols; ++j) o[j] = c[j] + bg[it.n0 + j];
        } else {
          std::memcpy(o, c, cols * sizeof(float));
        }
      }
    }
  });
}

at::Tensor qmm_common(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                      const std::vector<int64_t>& ends, const c10::optional<at::Tensor>& bias, const QmmDims& d,
                      bool int8_act) {
  const int64_t M = d.M, K = d.K, N = d.N;
  const int64_t used = ends.empty() ? 0 : ends.back();
  auto out_f = cpu::empty_large({M, N}, a.options().dtype(at::kFloat));
  if (used < M) out_f.narrow(0, used, M - used).zero_();
  if (used > 0 && N > 0) {
    at::Tensor bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
    if (K == 0) {
      auto head = out_f.narrow(0, 0, used);
      head.zero_();
      if (bias_f.defined()) {
        int64_t start = 0;
        for (int64_t g = 0; g < static_cast<int64_t>(ends.size()); ++g) {
          if (ends[g] > start) head.narrow(0, start, ends[g] - start).add_(bias_f.view({-1, N}).select(0, g));
          start = ends[g];
        }
      }
    } else {
      const Isa isa = cpu_isa();
      const bool bf16_in = a.scalar_type() == at::kBFloat16;
      const auto q = qweight.contiguous();
      const auto s = scale.contiguous();
      at::Tensor z;
      if (zero.has_value()) z = zero->contiguous();
      Packed p{q.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), z.defined() ? z.const_data_ptr<float>() : nullptr,
               static_cast<int>(bits), group_size, K, N, d.G};
      int64_t largest = 0, smallest = used;  // rows of the largest and smallest non-empty group
      for (int64_t g = 0, start = 0; g < static_cast<int64_t>(ends.size()); start = ends[g], ++g) {
        largest = std::max(largest, ends[g] - start);
        if (ends[g] > start) smallest = std::min(smallest, ends[g] - start);
      }
      Inputs in{};
      in.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
      at::Tensor ac = a.contiguous(), afb, ahb, asum;
      quant::a8::Activations act;
      quant::a8::BlockMap bm;
      if (int8_act && isa >= Isa::kAvx512 && quant::a8::available() && smallest <= kA8Rows) {
        quant::a8::quantize_rows(p, ac, ends, kA8Rows, act);
        bm = quant::a8::block_map(p);
        in.act = &act;
        in.bm = &bm;
      }
      const bool float_groups = in.act == nullptr || largest > kA8Rows;  // groups the float kernels take
      if (float_groups && bf16_in && bits == 4 && isa == Isa::kAvx512Bf16) {
        // bf16 rows for VDPBF16PS, padded by 32 elements when several rows share a weight row (rows
        // 4 KiB apart fall in one L1 set); one row is used as it is
        const int64_t ldh = used > 1 ? K + 32 : K;
        const bool reorder = bf16_reorder(group_size);
        if (ldh == K && !reorder) {
          ahb = ac;
        } else {
          ahb = at::empty({used, ldh}, a.options());
          const c10::BFloat16* src = ac.const_data_ptr<c10::BFloat16>();
          c10::BFloat16* dst = ahb.data_ptr<c10::BFloat16>();
          // the 16-element chunks of every 64 in the order 0, 2, 1, 3 (fused_bf16's wide loop)
          static constexpr int kChunk[4] = {0, 2, 1, 3};
          for (int64_t m = 0; m < used; ++m) {
            const c10::BFloat16* in_row = src + m * K;
            c10::BFloat16* out_row = dst + m * ldh;
            if (!reorder) {
              std::memcpy(out_row, in_row, K * sizeof(c10::BFloat16));
              continue;
            }
            for (int64_t k = 0; k < K; k += 64)
              for (int c = 0; c < 4; ++c) std::memcpy(out_row + k + 16 * c, in_row + k + 16 * kChunk[c], 32);
          }
        }
        in.ah = ahb.const_data_ptr<c10::BFloat16>();
        in.ldh = ldh;
        if (p.z != nullptr) {
          asum = ac.narrow(0, 0, used).view({used, d.G, group_size}).sum(-1, false, at::kFloat);
          in.asum = asum.const_data_ptr<float>();
        }
      }
      if (float_groups && bf16_in && cpu::lowp_native(at::kBFloat16) && isa >= Isa::kAvx512)
        in.ab = ac.const_data_ptr<c10::BFloat16>();
      if (float_groups && (in.ah == nullptr || largest > kBf16Rows)) {
        // a in float32 with rows padded by 16 floats (the float32 kernels; the panels without bf16)
        const int64_t lda = K + 16;
        afb = at::empty({M, lda}, a.options().dtype(at::kFloat));
        afb.narrow(1, 0, K).copy_(a);
        in.af = afb.const_data_ptr<float>();
        in.lda = lda;
      }
      qmm_run(p, in, ends, out_f.data_ptr<float>());
    }
  }
  return a.scalar_type() == at::kFloat ? out_f : out_f.to(a.scalar_type());
}

// activations: "float" (weight-only: a as it is), "int8" (a quantized per call, the VNNI kernels:
// quant_a8_cpu.cpp) or "auto" (int8 for bfloat16 / float16 a, whose own rounding is of the same
// order; float for float32). int8 takes effect where the CPU has AVX-512 VNNI (and
// MOESTREAM_QUANT_ISA does not cap it below avx512); elsewhere the float kernels run.
bool int8_activations(const at::Tensor& a, c10::string_view activations, const char* op) {
  MS_CHECK(activations == "auto" || activations == "int8" || activations == "float", op,
           "activations must be 'auto', 'int8' or 'float', got '", std::string(activations), "'");
  if (activations == "auto") return a.scalar_type() != at::kFloat;
  return activations == "int8";
}

at::Tensor qgrouped_mm_cpu(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& zero, const at::Tensor& offsets, int64_t bits,
                           int64_t group_size, const c10::optional<at::Tensor>& bias, c10::string_view activations) {
  // a [M, K] rows sorted by group; qweight uint8 [E, N, K*bits/8]; scale (zero) float32 [E, N, K/gs];
  // offsets [E] cumulative row ends; bias [E, N] -> out [M, N] in a's dtype, rows past offsets[-1] zero.
  constexpr const char* op = "qgrouped_mm";
  const QmmDims d = check_qmm_args(a, qweight, scale, zero, bits, group_size, bias, op, 1, "a");
  check_same_device(a, offsets, op, "a", "offsets");
  const auto ends = check_offsets(offsets, d.E, d.M, op, "a", /*read_values=*/true);
  return qmm_common(a, qweight, scale, zero, bits, group_size, ends, bias, d, int8_activations(a, activations, op));
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                       const c10::optional<at::Tensor>& bias, c10::string_view activations) {
  // x [M, K]; qweight uint8 [N, K*bits/8]; scale (zero) float32 [N, K/gs]; bias [N] -> [M, N] in x's dtype.
  constexpr const char* op = "qlinear";
  const QmmDims d = check_qmm_args(x, qweight, scale, zero, bits, group_size, bias, op, 0, "x");
  return qmm_common(x, qweight, scale, zero, bits, group_size, {d.M}, bias, d, int8_activations(x, activations, op));
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) {
  m.impl("qgrouped_mm", &qgrouped_mm_cpu);
  m.impl("qlinear", &qlinear_cpu);
}

}  // namespace moestream
