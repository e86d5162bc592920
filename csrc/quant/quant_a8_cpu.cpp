// The int8-activation kernels of the CPU compressed matmuls (quant_cpu.h, namespace a8).
//
// Why: on the AVX-512 machines measured (the 2-core Sapphire Rapids test VM), the float32 FMA and
// VDPBF16PS kernels on int4 / int8 weights are bound by their arithmetic, not by reading the
// weights: VDPBF16PS issued about once per ns (32 multiply-adds), an FMA about 3 per ns (16 each),
// VPDPBUSD about 2.6 per ns with 64 multiply-adds each. With the activations in int8 an int4 weight
// costs 3 instructions per 128 codes to decode (and, shift, and) and two VPDPBUSD per row of a, an
// int8 weight none and one; the kernels then read the codes at the memory's speed up to a few rows
// of a. The cost is the activations' rounding: relative error about 0.5% per dot product (scale
// max|a| / 127 per group), well under an int4 weight's own (about 9% per weight at group 64).
//
// Layout. int4: a 64-byte load holds four 32-element runs (16 bytes each: byte i = elements i and
// 16 + i); the low nibbles give 64 unsigned bytes (run r's elements 0-15 at bytes 16r..16r+15), the
// high nibbles the other halves. VPDPBUSD sums 4 neighbouring bytes into one int32 lane, so lanes
// 4r..4r+3 hold run r, and a run lies in one weight group (group sizes are multiples of 32). The
// activations are stored in the same order (per 128 elements the 16-element chunks 0 2 4 6, then 1
// 3 5 7). int8: a 64-byte load is 64 consecutive elements, lane l = elements 4l..4l+3.
// Each block's int32 lanes are converted and scaled by the activations' and the weight's group
// scales (lanes to groups: BlockMap); the zero point's term, sum over groups of weight scale *
// zero * (activation scale * sum of the group's activation codes), is subtracted once per output.
// Loop order per block: the weight rows are decoded once, then every row of a reads its codes once
// and feeds all of them (the activations are read once per block and weight-row tile).
#include "quant/quant_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/cpu_isa.h"

#if MS_HAVE_X86_SIMD
#define MS_TARGET_A8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

namespace moestream {
namespace quant {
namespace a8 {

bool available() {
#if MS_HAVE_X86_SIMD
  static const bool ok = cpu::has_avx512_bw_vl_dq() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

#if MS_HAVE_X86_SIMD
namespace {

int64_t block_of(const Packed& p) { return p.bits == 4 ? 128 : 64; }

// the element offset within its block of lane l's first element
inline int64_t lane_offset(int bits, int l) { return bits == 4 ? 32 * (l / 4) : 4 * l; }

// 16 elements of a row in float32
template <typename T>
MS_TARGET_A8 inline __m512 load16(const T* x);
template <>
MS_TARGET_A8 inline __m512 load16<float>(const float* x) {
  return _mm512_loadu_ps(x);
}
template <>
MS_TARGET_A8 inline __m512 load16<c10::BFloat16>(const c10::BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
MS_TARGET_A8 inline __m512 load16<c10::Half>(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// one row: K elements of x -> codes (natural order, kp bytes, zero past K) and the groups' scales
template <typename T>
MS_TARGET_A8 void quantize_row(const T* x, int64_t K, int64_t gs, int8_t* codes, float* gscale, float* gcorr) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t g = 0; g * gs < K; ++g) {
    const T* xg = x + g * gs;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;  // MAXPS drops NaNs: they are looked for on their own
    for (int64_t i = 0; i < gs; i += 16) {
      const __m512 v = load16(xg + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      mx = _mm512_max_ps(mx, _mm512_and_ps(v, sign));
    }
    const float amax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
    // a non-finite group gives a non-finite scale, so that the result is not finite either
    gscale[g] = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f && std::isfinite(amax) ? 127.f / amax : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < gs; i += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(xg + i), inv));  // nearest even
      const __m128i c = _mm512_cvtsepi32_epi8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * gs + i), c);
      sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(c));
    }
    gcorr[g] = gscale[g] * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
}

// rows [r0, r1) of a
template <typename T>
MS_TARGET_A8 void quantize_range(const Packed& p, const T* a, int64_t r0, int64_t r1, Activations& A) {
  const int64_t K = p.K, gs = p.gs, G = p.G, kp = A.kp, nblk = A.nblk, B = A.block;
  {
    std::vector<int8_t> nat(kp);
    for (int64_t m = r0; m < r1; ++m) {
      std::fill(nat.begin() + K, nat.end(), int8_t(0));
      quantize_row(a + m * K, K, gs, nat.data(), A.gscale.data() + m * G, A.gcorr.data() + m * G);
      int8_t* q = A.q.data() + m * kp;
      if (p.bits == 4) {
        static constexpr int kChunk[8] = {0, 2, 4, 6, 1, 3, 5, 7};
        for (int64_t b = 0; b < nblk; ++b)
          for (int c = 0; c < 8; ++c) std::memcpy(q + b * B + 16 * c, nat.data() + b * B + 16 * kChunk[c], 16);
      } else {
        std::memcpy(q, nat.data(), kp);
      }
    }
  }
}

// the rows of the groups (row ends `ends`) of at most max_rows rows
template <typename T>
void quantize_all(const Packed& p, const T* a, const std::vector<int64_t>& ends, int64_t max_rows, Activations& A) {
  std::vector<int64_t> rows;  // the rows to quantize, in order
  for (int64_t g = 0, start = 0; g < static_cast<int64_t>(ends.size()); start = ends[g], ++g)
    if (ends[g] - start <= max_rows)
      for (int64_t r = start; r < ends[g]; ++r) rows.push_back(r);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    // runs of consecutive rows
    for (int64_t i = i0; i < i1;) {
      int64_t j = i + 1;
      while (j < i1 && rows[j] == rows[j - 1] + 1) ++j;
      quantize_range(p, a, rows[i], rows[j - 1] + 1, A);
      i = j;
    }
  });
}

constexpr int64_t kPfBytes = 8192;  // software prefetch distance, as in quant_cpu.cpp

// sum over groups of s[g] * zero[g] * gcorr[g] (zero: z, or zdef when z is null)
MS_TARGET_A8 float zero_term(const float* s, const float* z, float zdef, const float* gcorr, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = G - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (G - g)) - 1);
    const __m512 zz = z ? _mm512_maskz_loadu_ps(m, z + g) : _mm512_set1_ps(zdef);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + g), zz), _mm512_maskz_loadu_ps(m, gcorr + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int NB, int MB, bool INT4>
MS_TARGET_A8 void kernel(const Packed& p, const Activations& A, const BlockMap& bm, int64_t e, int64_t n,
                         int64_t m0, float* res) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  const int64_t nblk = A.nblk, kp = A.kp, B = A.block, G = p.G;
  const uint8_t* q[NB];
  const float* s[NB];
  for (int j = 0; j < NB; ++j) {
    q[j] = p.codes(e, n + j);
    s[j] = p.scales(e, n + j);
  }
  const int8_t* xq = A.q.data() + m0 * kp;
  const float* as = A.gscale.data() + m0 * G;
  const __m512i m4 = _mm512_set1_epi8(15);
  for (int64_t b = 0; b < nblk; ++b) {
    const __mmask64 mk = b + 1 == nblk ? static_cast<__mmask64>(bm.tail) : ~__mmask64(0);
    const __m512i idx = _mm512_loadu_si512(bm.idx.data() + b * 16);
    const __mmask16 gm = bm.mask[b];
    const int64_t g0 = bm.g0[b];
    __m512i lo[NB], hi[NB];
    __m512 sv[NB];
    for (int j = 0; j < NB; ++j) {
      const uint8_t* qb = q[j] + b * 64;
      _mm_prefetch(reinterpret_cast<const char*>(qb + kPfBytes), _MM_HINT_T0);
      const __m512i w = _mm512_maskz_loadu_epi8(mk, qb);
      lo[j] = hi[j] = w;
      if (INT4) {
        lo[j] = _mm512_and_si512(w, m4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
      }
      sv[j] = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(gm, s[j] + g0));
    }
    for (int m = 0; m < MB; ++m) {
      const int8_t* xb = xq + m * kp + b * B;
      const __m512i x0 = _mm512_loadu_si512(xb);
      const __m512i x1 = INT4 ? _mm512_loadu_si512(xb + 64) : x0;
      const __m512 av = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(gm, as + m * G + g0));
      for (int j = 0; j < NB; ++j) {
        __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], x0);
        if (INT4) is = _mm512_dpbusd_epi32(is, hi[j], x1);
        acc[j][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(is), av), sv[j], acc[j][m]);
      }
    }
  }
  const float zdef = static_cast<float>(1 << (p.bits - 1));
  for (int j = 0; j < NB; ++j) {
    const float* z = p.zeros(e, n + j);
    for (int m = 0; m < MB; ++m)
      res[j * MB + m] = _mm512_reduce_add_ps(acc[j][m]) - zero_term(s[j], z, zdef, A.gcorr.data() + (m0 + m) * G, G);
  }
}

using KernelFn = void (*)(const Packed&, const Activations&, const BlockMap&, int64_t, int64_t, int64_t, float*);

// weight rows per call for MB rows of a: NB * MB float32 accumulators, at most 16 of the 32 registers
constexpr int nb_for(int mb) { return mb == 1 ? 4 : (mb == 2 ? 4 : (mb <= 4 ? 3 : 2)); }

template <int MB>
KernelFn pick2(bool full, bool int4) {
  if (int4) return full ? &kernel<nb_for(MB), MB, true> : &kernel<1, MB, true>;
  return full ? &kernel<nb_for(MB), MB, false> : &kernel<1, MB, false>;
}

KernelFn pick(int mb, bool full, bool int4) {
  switch (mb) {
    case 1: return pick2<1>(full, int4);
    case 2: return pick2<2>(full, int4);
    case 3: return pick2<3>(full, int4);
    case 4: return pick2<4>(full, int4);
    case 5: return pick2<5>(full, int4);
    case 6: return pick2<6>(full, int4);
    case 7: return pick2<7>(full, int4);
    default: return pick2<8>(full, int4);
  }
}

}  // namespace
#endif

void quantize_rows(const Packed& p, const at::Tensor& a, const std::vector<int64_t>& ends, int64_t max_rows,
                   Activations& A) {
  const int64_t rows = ends.empty() ? 0 : ends.back();
#if MS_HAVE_X86_SIMD
  const int64_t B = block_of(p);
  A.block = B;
  A.nblk = (p.K + B - 1) / B;
  A.kp = A.nblk * B;
  A.q.assign(rows * A.kp, 0);
  A.gscale.assign(rows * p.G, 0.f);
  A.gcorr.assign(rows * p.G, 0.f);
  switch (a.scalar_type()) {
    case at::kFloat: return quantize_all(p, a.const_data_ptr<float>(), ends, max_rows, A);
    case at::kBFloat16: return quantize_all(p, a.const_data_ptr<c10::BFloat16>(), ends, max_rows, A);
    default: return quantize_all(p, a.const_data_ptr<c10::Half>(), ends, max_rows, A);
  }
#else
  (void)p, (void)a, (void)ends, (void)max_rows, (void)A;
#endif
}

BlockMap block_map(const Packed& p) {
  BlockMap bm;
#if MS_HAVE_X86_SIMD
  const int64_t B = block_of(p), nblk = (p.K + B - 1) / B;
  bm.g0.resize(nblk);
  bm.idx.resize(nblk * 16);
  bm.mask.resize(nblk);
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t g0 = b * B / p.gs;
    int32_t hi = 0;
    for (int l = 0; l < 16; ++l) {
      const int64_t k = std::min(b * B + lane_offset(p.bits, l), p.K - 1);
      bm.idx[b * 16 + l] = static_cast<int32_t>(k / p.gs - g0);
      hi = std::max(hi, bm.idx[b * 16 + l]);
    }
    bm.g0[b] = g0;
    bm.mask[b] = static_cast<uint16_t>((1u << (hi + 1)) - 1);
  }
  const int64_t last = p.row_bytes() - (nblk - 1) * 64;  // bytes of codes in the last block
  bm.tail = last >= 64 ? ~uint64_t(0) : (uint64_t(1) << last) - 1;
#else
  (void)p;
#endif
  return bm;
}

void item(const Packed& p, const Activations& act, const BlockMap& bm, int64_t e, int64_t r0, int64_t r1,
          int64_t n0, int64_t n1, const float* bg, float* out) {
#if MS_HAVE_X86_SIMD
  const bool int4 = p.bits == 4;
  for_each_tile(
      r0, r1, n0, n1, p.N, nb_for,
      [&](int mb, int nb, int64_t n, int64_t m0, float* res) {
        pick(mb, nb == nb_for(mb), int4)(p, act, bm, e, n, m0, res);
      },
      [&](float v, int64_t, int64_t n) { return bg ? v + bg[n] : v; }, out);
#else
  (void)p, (void)act, (void)bm, (void)e, (void)r0, (void)r1, (void)n0, (void)n1, (void)bg, (void)out;
#endif
}

}  // namespace a8
}  // namespace quant
}  // namespace moestream
