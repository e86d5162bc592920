// The CPU matmuls on the packed group-wise format (python/moestream/quant.py), shared by the
// weight-only kernels (quant_cpu.cpp) and the int8-activation kernels (quant_a8_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moestream {
namespace quant {

// One packed weight: rows of N, K input elements, codes `bits` wide, G groups of gs per row.
struct Packed {
  const uint8_t* q;  // [E, N, K * bits / 8]
  const float* s;    // [E, N, G]
  const float* z;    // [E, N, G] or null (symmetric: zero = 2^(bits-1))
  int bits;
  int64_t gs, K, N, G;
  int64_t row_bytes() const { return bits == 4 ? K / 2 : K; }
  // weight row n of group e: its codes, its G scales, its G zeros (null when symmetric)
  const uint8_t* codes(int64_t e, int64_t n) const { return q + (e * N + n) * row_bytes(); }
  const float* scales(int64_t e, int64_t n) const { return s + (e * N + n) * G; }
  const float* zeros(int64_t e, int64_t n) const { return z ? z + (e * N + n) * G : nullptr; }
};

// The tiles of a few-row work item: rows [r0, r1) of a in blocks of up to 8 (mb), output columns
// [n0, n1) in tiles of nb_of(mb) weight rows (single rows at the end). kernel(mb, nb, n, m0, res)
// fills res[j * mb + m] = <row m0 + m of a, weight row n + j>; out[m][n] (stride N) = finish(value,
// m, n) (the bias, a zero-point term).
template <typename NbOf, typename Kernel, typename Finish>
void for_each_tile(int64_t r0, int64_t r1, int64_t n0, int64_t n1, int64_t N, NbOf nb_of, Kernel&& kernel,
                   Finish&& finish, float* out) {
  constexpr int kMaxMB = 8, kMaxNB = 8;
  for (int64_t m0 = r0; m0 < r1; m0 += kMaxMB) {
    const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, r1 - m0));
    const int NB = nb_of(mb);
    float res[kMaxNB * kMaxMB];
    for (int64_t n = n0; n < n1;) {
      const int nb = n + NB <= n1 ? NB : 1;
      kernel(mb, nb, n, m0, res);
      for (int j = 0; j < nb; ++j)
        for (int m = 0; m < mb; ++m) out[(m0 + m) * N + n + j] = finish(res[j * mb + m], m0 + m, n + j);
      n += nb;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// int8 activations (AVX-512 VNNI): the rows of a are quantized per call, per row and weight group,
// to int8 with the scale max|a| / 127 (round to nearest even), and VPDPBUSD multiplies the unsigned
// weight codes with them in int32; each block's int32 sums are scaled by the weight's and the
// activations' scales in float32. What it computes is dequantize(W) @ dequantize(quantize(a)).

namespace a8 {

// AVX-512 F/BW/VL/DQ + VNNI: everything the int8-activation kernels use.
bool available();

// The rows of a, quantized and laid out for the kernels. A block is the run of K a kernel step
// reads: 128 elements for int4 weights (64 bytes of codes), 64 for int8; nblk = ceil(K / block).
struct Activations {
  int64_t nblk = 0, block = 0, kp = 0;  // kp = nblk * block: the padded row length
  std::vector<int8_t> q;       // [rows, kp] int8 codes in the kernels' order (int4: per block the
                               // 16-element chunks 0 2 4 6 1 3 5 7), zero past K
  std::vector<float> gscale;   // [rows, G] each group's scale, max|a| / 127
  std::vector<float> gcorr;    // [rows, G] gscale * the sum of the group's codes (the zero term)
};

// a [rows, K] contiguous (float32, bfloat16 or float16) -> out, for weights p: the rows of the
// groups (cumulative row ends `ends`) of at most max_rows rows (the others stay zero).
void quantize_rows(const Packed& p, const at::Tensor& a, const std::vector<int64_t>& ends, int64_t max_rows,
                   Activations& out);

// Where each block's 16 lanes find their weight group: g0 the first group of the block, idx the
// group of each lane minus g0, mask the groups to load (so that no load passes the row's end).
struct BlockMap {
  std::vector<int64_t> g0;
  std::vector<int32_t> idx;  // [nblk, 16]
  std::vector<uint16_t> mask;
  uint64_t tail = ~uint64_t(0);  // byte mask of the last block's codes
};
BlockMap block_map(const Packed& p);

// out[r0:r1, n0:n1] (stride N; rows of a in act, row i of act = row i of out) of group e, with bias
// bg [N] (or null) added.
void item(const Packed& p, const Activations& act, const BlockMap& bm, int64_t e, int64_t r0, int64_t r1,
          int64_t n0, int64_t n1, const float* bg, float* out);

}  // namespace a8
}  // namespace quant
}  // namespace moestream
