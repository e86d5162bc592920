// CPU kernels of the router ops: fused gating (router_topk) and its backward, the load-balancing
// auxiliary loss and the router z-loss with their backwards. Numerics follow
// python/moestream/reference.py: math in float32 (float64 for float64 logits), ties to the lower
// expert id, NaN ranked above every number (as torch.sort does), fixed reduction order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "router/router_checks.h"

namespace moestream {
namespace {

using Score = RouterScore;

// Token chunk of the loss reductions. Partial sums are formed per chunk and combined in chunk
// order, so the result does not depend on the number of threads.
constexpr int64_t kLossChunk = 256;

// Rows handed to one task of at::parallel_for: enough elements per task to amortise the
// scheduling, whatever E is.
int64_t row_grain(int64_t E) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)); }

// ---------------------------------------------------------------------------------------------
// selection order: a strict total order on (value, index)
//
// (v, i) ranks before (w, j) when v > w, NaN counting above every number (as torch.sort does),
// and equal values (NaN against NaN, -0 against +0 included) go to the lower index. Each pair is
// encoded as one unsigned key whose natural order is that order: the value's bits made monotone,
// then the complemented index. Selection then compares plain integers, no branches on NaN
// (topk_first, k = 8 of E = 64, 16384 rows on one core: 12.6 ms with a comparator on
// (value, index), 10.1 ms with keys).

// float: 32 monotone value bits | 32 bits of (2^32 - 1 - index)
using KeyF = uint64_t;

inline KeyF rank_key(float v, int64_t i) {
  // branch-free: random signs would mispredict (k = 1 of 64, 16384 rows: 7.8 ms with branches on
  // sign and NaN, 3.0 ms without)
  v = v + 0.0f;  // -0 ranks like +0 (NaN stays NaN)
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  const uint32_t neg = static_cast<uint32_t>(static_cast<int32_t>(b) >> 31);
  b ^= neg | 0x80000000u;
  b = std::isnan(v) ? 0xFFFFFFFFu : b;
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
}
inline int64_t key_index(KeyF key) { return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

// double: 64 monotone value bits, then the complemented index
struct KeyD {
  uint64_t value;
  uint32_t index;
  bool operator>(const KeyD& o) const { return value != o.value ? value > o.value : index > o.index; }
};

inline KeyD rank_key(double v, int64_t i) {
  v = v + 0.0;
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  const uint64_t neg = static_cast<uint64_t>(static_cast<int64_t>(b) >> 63);
  b ^= neg | (uint64_t(1) << 63);
  b = std::isnan(v) ? ~uint64_t(0) : b;
  return KeyD{b, 0xFFFFFFFFu - static_cast<uint32_t>(i)};
}
inline int64_t key_index(const KeyD& key) { return static_cast<int64_t>(0xFFFFFFFFu - key.index); }

template <typename acc_t>
using key_type = std::conditional_t<std::is_same_v<acc_t, double>, KeyD, KeyF>;

// Writes the indices of the k best of v[0..n) into out[0..k), best first. `scratch` holds at
// least n keys. For small k (or small n) keep a sorted list of k keys and scan once: a candidate
// that does not beat the current k-th costs one comparison. Otherwise nth_element + sort of the k
// winners, O(n + k log k). Both give the same answer because the order is total. The switch point
// is measured (whole op, one core, 1M logits): n = 64: sorted list 10.4 / 23.1 ms vs 13.1 / 29.1 ms
// at k = 8 / 48; n = 256: 9.9 vs 11.6 ms at k = 24, but 17.4 vs 14.7 ms at k = 48.
template <typename acc_t>
void select_topk(const acc_t* v, int64_t n, int64_t k, int64_t* out, key_type<acc_t>* scratch) {
  using key_t = key_type<acc_t>;
  if (k <= 32 || n <= 128) {
    key_t* top = scratch;
    int64_t filled = 0;
    for (int64_t i = 0; i < n; ++i) {
      const key_t key = rank_key(v[i], i);
      if (filled == k && !(key > top[k - 1])) continue;
      int64_t pos = filled < k ? filled++ : k - 1;
      while (pos > 0 && key > top[pos - 1]) {
        top[pos] = top[pos - 1];
        --pos;
      }
      top[pos] = key;
    }
    for (int64_t j = 0; j < k; ++j) out[j] = key_index(top[j]);
    return;
  }
  auto greater = [](const key_t& a, const key_t& b) { return a > b; };
  for (int64_t i = 0; i < n; ++i) scratch[i] = rank_key(v[i], i);
  if (k < n) std::nth_element(scratch, scratch + k, scratch + n, greater);
  std::sort(scratch, scratch + k, greater);
  for (int64_t j = 0; j < k; ++j) out[j] = key_index(scratch[j]);
}

// ---------------------------------------------------------------------------------------------
// row primitives (acc_t = float or double)

// exp in float32 written so that loops over it vectorise (a call to glibc's expf does not):
// Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, within 2 ulp), with
// 2^n applied as two factors so that subnormal results and overflow to inf are rounded once.
// NaN gives NaN, -inf gives 0, +inf gives inf. Clamping and NaN handling are done on the bits with
// integer masks: float comparisons may trap, which keeps GCC from if-converting (and vectorising)
// the loop without -fno-trapping-math. Measured on one core, 1M logits: softmax top-1 8.9 -> 6.3 ms,
// z-loss 5.4 -> 3.6 ms against std::exp.
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// float bits -> int32 in the float's order (for non-NaN values)
inline int32_t ordered(uint32_t b) {
  return static_cast<int32_t>(b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) & 0x7FFFFFFFu));
}
inline uint32_t mask_of(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint32_t select_bits(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

inline float exp_f32(float x) {
  constexpr uint32_t kLo = 0xC2D00000u;  // -104: exp rounds to 0 below
  constexpr uint32_t kHi = 0x42B20000u;  // 89: exp overflows to inf above
  const uint32_t bx = f2u(x);
  const uint32_t nan = mask_of((bx & 0x7FFFFFFFu) > 0x7F800000u);
  const int32_t ox = ordered(bx);
  uint32_t bc = select_bits(mask_of(ox < ordered(kLo)), kLo, bx);
  bc = select_bits(mask_of(ox > ordered(kHi)), kHi, bc) & ~nan;
  const float xc = u2f(bc);
  // n = round(xc / ln 2) by the 1.5 * 2^23 trick (exact in round-to-nearest)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 64]: normal powers of two
  const float s1 = u2f(static_cast<uint32_t>(n1 + 127) << 23), s2 = u2f(static_cast<uint32_t>(n2 + 127) << 23);
  const float res = (q * s1) * s2;
  return u2f(select_bits(nan, bx, f2u(res)));
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

// Row reductions over kLanes interleaved partials (so they vectorise), combined in a fixed order.
constexpr int64_t kLanes = 8;

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {  // NaN entries are skipped
  acc_t m[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
  }
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  acc_t r = m[0];
  for (int64_t l = 1; l < kLanes; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) s[l] += x[i + l];
  }
  for (; i < n; ++i) s[0] += x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// p[0..n) = softmax(x[0..n)); p may alias x.
template <typename acc_t>
inline void softmax_row_impl(const acc_t* x, acc_t* p, int64_t n) {
  const acc_t m = row_max(x, n);
  for (int64_t i = 0; i < n; ++i) p[i] = exp_acc(x[i] - m);
  const acc_t inv = acc_t(1) / row_sum(p, n);
  for (int64_t i = 0; i < n; ++i) p[i] *= inv;
}

// logsumexp as torch computes it: an infinite maximum is replaced by 0 so that all -inf rows give
// -inf and rows containing +inf give +inf instead of NaN. `tmp` holds n values.
template <typename acc_t>
inline acc_t logsumexp_row_impl(const acc_t* x, acc_t* tmp, int64_t n) {
  acc_t m = row_max(x, n);
  if (std::isinf(m)) m = 0;
  for (int64_t i = 0; i < n; ++i) tmp[i] = exp_acc(x[i] - m);
  return std::log(row_sum(tmp, n)) + m;
}

template <typename acc_t>
inline void sigmoid_row_impl(const acc_t* x, acc_t* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = sigmoid(x[i]);
}

// The float32 row functions are also compiled for AVX2 and picked at load time (MS_AVX2_CLONES,
// common/cpu_isa.h), since the build itself targets baseline x86-64.
// FMA is left out on purpose: without contraction both versions round identically, so results do
// not depend on the CPU. Measured on one core, 1M logits, baseline -> with the AVX2 clone: softmax
// top-1 6.4 -> 5.0 ms (E = 64) and 4.8 -> 3.2 ms (E = 1024); z-loss 3.0 -> 2.5 ms (E = 1024).
MS_AVX2_CLONES void softmax_row_f32(const float* x, float* p, int64_t n) { softmax_row_impl(x, p, n); }
MS_AVX2_CLONES float logsumexp_row_f32(const float* x, float* tmp, int64_t n) { return logsumexp_row_impl(x, tmp, n); }
MS_AVX2_CLONES void sigmoid_row_f32(const float* x, float* s, int64_t n) { sigmoid_row_impl(x, s, n); }

inline void softmax_row(const float* x, float* p, int64_t n) { softmax_row_f32(x, p, n); }
inline void softmax_row(const double* x, double* p, int64_t n) { softmax_row_impl(x, p, n); }
inline float logsumexp_row(const float* x, float* tmp, int64_t n) { return logsumexp_row_f32(x, tmp, n); }
inline double logsumexp_row(const double* x, double* tmp, int64_t n) { return logsumexp_row_impl(x, tmp, n); }
inline void sigmoid_row(const float* x, float* s, int64_t n) { sigmoid_row_f32(x, s, n); }
inline void sigmoid_row(const double* x, double* s, int64_t n) { sigmoid_row_impl(x, s, n); }

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// ---------------------------------------------------------------------------------------------
// router_topk

template <typename scalar_t>
void router_topk_kernel(const scalar_t* logits, const acc_t<scalar_t>* bias, int64_t T, int64_t E, int64_t k,
                        Score score, bool topk_first, int64_t num_groups, int64_t topk_groups, bool normalize,
                        double scale, acc_t<scalar_t>* weights, int64_t* ids) {
  using acc_t = moestream::acc_t<scalar_t>;
  const int64_t group_size = E / num_groups;
  const int64_t group_top = std::min<int64_t>(2, group_size);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale_a = static_cast<acc_t>(scale);
  const acc_t eps = static_cast<acc_t>(1e-20);
  at::parallel_for(0, T, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> lg(E), s(E), sel(E), gscore(num_groups), w(k);
    std::vector<key_type<acc_t>> scratch(E);
    std::vector<int64_t> top(std::max<int64_t>({k, topk_groups, 2})), gkeep(num_groups);
    for (int64_t t = begin; t < end; ++t) {
      load_row(logits + t * E, lg.data(), E);
      // scores: what the weights are taken from (unless topk_first) and what selection starts from
      const acc_t* base = lg.data();
      if (!topk_first) {
        if (score == Score::kSoftmax) {
          softmax_row(lg.data(), s.data(), E);
        } else {
          sigmoid_row(lg.data(), s.data(), E);
        }
        base = s.data();
      }
      const acc_t* choice = base;
      if (bias != nullptr || num_groups > 1) {
        for (int64_t e = 0; e < E; ++e) sel[e] = bias != nullptr ? base[e] + bias[e] : base[e];
        choice = sel.data();
      }
      if (num_groups > 1) {
        // rank groups by the sum of their best min(2, group size) scores, keep the best topk_groups
        for (int64_t g = 0; g < num_groups; ++g) {
          const acc_t* v = sel.data() + g * group_size;
          select_topk(v, group_size, group_top, top.data(), scratch.data());
          gscore[g] = group_top == 2 ? v[top[0]] + v[top[1]] : v[top[0]];
        }
        select_topk(gscore.data(), num_groups, topk_groups, top.data(), scratch.data());
        std::fill(gkeep.begin(), gkeep.end(), 0);
        for (int64_t j = 0; j < topk_groups; ++j) gkeep[top[j]] = 1;
        for (int64_t g = 0; g < num_groups; ++g) {
          if (!gkeep[g]) std::fill(sel.begin() + g * group_size, sel.begin() + (g + 1) * group_size, neg_inf);
        }
      }
      int64_t* id = ids + t * k;
      select_topk(choice, E, k, id, scratch.data());
      if (topk_first) {
        for (int64_t j = 0; j < k; ++j) w[j] = lg[id[j]];
        if (score == Score::kSoftmax) {
          softmax_row(w.data(), w.data(), k);
        } else {
          for (int64_t j = 0; j < k; ++j) w[j] = sigmoid(w[j]);
        }
      } else {
        for (int64_t j = 0; j < k; ++j) w[j] = s[id[j]];
      }
      acc_t* out = weights + t * k;
      if (normalize) {
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += w[j];
        const acc_t denom = sum + eps;
        for (int64_t j = 0; j < k; ++j) out[j] = (w[j] / denom) * scale_a;
      } else {
        for (int64_t j = 0; j < k; ++j) out[j] = w[j] * scale_a;
      }
    }
  });
}

// logits [T, E] float (any of the four float dtypes), k in [1, E], bias [E] float (optional),
// num_groups divides E, topk_groups in [1, num_groups] (k may exceed the kept groups' experts)
// -> weights [T, k] float32 (float64 for float64 logits), ids [T, k] int64.
std::tuple<at::Tensor, at::Tensor> router_topk_cpu(const at::Tensor& logits, int64_t k, std::string_view score,
                                                   bool topk_first, const std::optional<at::Tensor>& bias,
                                                   int64_t num_groups, int64_t topk_groups, bool normalize,
                                                   double scale) {
  const RouterDims d = check_router_topk_args(logits, k, score, bias, num_groups, topk_groups);
  const int64_t T = d.T, E = d.E;
  const Score sc = d.score;
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor lg = logits.contiguous();
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, ids};
  MS_DISPATCH_FLOATS(lg.scalar_type(), "router_topk_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    router_topk_kernel<scalar_t>(lg.const_data_ptr<scalar_t>(),
                                 bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr, T, E, k, sc,
                                 topk_first, num_groups, topk_groups, normalize, scale,
                                 weights.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int64_t>());
  });
  return {weights, ids};
}

// ---------------------------------------------------------------------------------------------
// router_topk_backward

template <typename scalar_t, typename index_t>
void router_topk_backward_kernel(const acc_t<scalar_t>* grad_w, const scalar_t* logits, const index_t* ids,
                                 int64_t T, int64_t E, int64_t k, Score score, bool topk_first, bool normalize,
                                 double scale, scalar_t* grad_logits) {
  using acc_t = moestream::acc_t<scalar_t>;
  const acc_t scale_a = static_cast<acc_t>(scale);
  const acc_t eps = static_cast<acc_t>(1e-20);
  at::parallel_for(0, T, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> lg(E), p(E), out(E), g(k), dg(k);
    for (int64_t t = begin; t < end; ++t) {
      load_row(logits + t * E, lg.data(), E);
      const index_t* id = ids + t * k;
      const acc_t* dw = grad_w + t * k;
      // g: the weights before normalisation and scaling, recomputed from the logits
      const bool full_softmax = score == Score::kSoftmax && !topk_first;
      if (full_softmax) {
        softmax_row(lg.data(), p.data(), E);
        for (int64_t j = 0; j < k; ++j) g[j] = p[id[j]];
      } else if (score == Score::kSigmoid) {
        for (int64_t j = 0; j < k; ++j) g[j] = sigmoid(lg[id[j]]);
      } else {
        for (int64_t j = 0; j < k; ++j) g[j] = lg[id[j]];
        softmax_row(g.data(), g.data(), k);
      }
      // w = scale * g / (sum g + eps)  ->  dg_j = scale / D * (dw_j - sum_i dw_i g_i / D)
      if (normalize) {
        acc_t sum = 0, dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          sum += g[j];
          dot += dw[j] * g[j];
        }
        const acc_t denom = sum + eps;
        const acc_t c = dot / denom;
        for (int64_t j = 0; j < k; ++j) dg[j] = scale_a * (dw[j] - c) / denom;
      } else {
        for (int64_t j = 0; j < k; ++j) dg[j] = scale_a * dw[j];
      }
      if (full_softmax) {
        // dl = p * (dp - <p, dp>) with dp the scatter of dg onto the chosen experts
        acc_t c = 0;
        for (int64_t j = 0; j < k; ++j) c += g[j] * dg[j];
        for (int64_t e = 0; e < E; ++e) out[e] = -p[e] * c;
        for (int64_t j = 0; j < k; ++j) out[id[j]] += g[j] * dg[j];
      } else if (score == Score::kSigmoid) {
        std::fill(out.begin(), out.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) out[id[j]] += dg[j] * g[j] * (acc_t(1) - g[j]);
      } else {
        // softmax over the k chosen logits: da = g * (dg - <g, dg>)
        acc_t c = 0;
        for (int64_t j = 0; j < k; ++j) c += g[j] * dg[j];
        std::fill(out.begin(), out.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) out[id[j]] += g[j] * (dg[j] - c);
      }
      scalar_t* dst = grad_logits + t * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<scalar_t>(out[e]);
    }
  });
}

// grad_weights [T, k] float, logits [T, E] float, ids [T, k] int32|int64 in [0, E)
// -> grad_logits [T, E] in logits' dtype.
at::Tensor router_topk_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& ids,
                                    std::string_view score, bool topk_first, bool normalize, double scale) {
  const char* op = "router_topk_backward";
  const RouterDims d = check_router_topk_backward_args(grad_weights, logits, ids, score);
  const int64_t T = d.T, E = d.E, k = d.k;
  const Score sc = d.score;
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor lg = logits.contiguous();
  const at::Tensor id = ids.contiguous();
  const at::Tensor gw = grad_weights.to(acc).contiguous();
  check_router_ids_range(id, E, op);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0 || E == 0) return grad_logits;
  MS_DISPATCH_FLOATS_AND_INDEX(lg.scalar_type(), id.scalar_type(), "router_topk_backward_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    router_topk_backward_kernel<scalar_t, index_t>(gw.const_data_ptr<acc_t>(), lg.const_data_ptr<scalar_t>(),
                                                   id.const_data_ptr<index_t>(), T, E, k, sc, topk_first, normalize,
                                                   scale, grad_logits.mutable_data_ptr<scalar_t>());
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------------------------
// load-balancing loss

// Per-expert sums that both directions need: counts[e] = sum of mask[t] over the (t, s) with
// ids[t, s] == e, and total = sum of mask. Chunk partials combined in chunk order.
template <typename acc_t, typename index_t>
void expert_counts(const index_t* ids, const acc_t* mask, int64_t T, int64_t E, int64_t k, acc_t* counts,
                   acc_t* total) {
  const int64_t nchunks = (T + kLossChunk - 1) / kLossChunk;
  std::vector<acc_t> part(nchunks * E, acc_t(0)), mpart(nchunks, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* cnt = part.data() + c * E;
      acc_t msum = 0;
      for (int64_t t = c * kLossChunk; t < std::min(T, (c + 1) * kLossChunk); ++t) {
        const acc_t m = mask != nullptr ? mask[t] : acc_t(1);
        msum += m;
        for (int64_t j = 0; j < k; ++j) cnt[ids[t * k + j]] += m;
      }
      mpart[c] = msum;
    }
  });
  acc_t tot = 0;
  for (int64_t c = 0; c < nchunks; ++c) tot += mpart[c];
  *total = tot;
  for (int64_t e = 0; e < E; ++e) {
    acc_t s = 0;
    for (int64_t c = 0; c < nchunks; ++c) s += part[c * E + e];
    counts[e] = s;
  }
}

template <typename scalar_t, typename index_t>
acc_t<scalar_t> aux_loss_kernel(const scalar_t* logits, const index_t* ids,
                                          const acc_t<scalar_t>* mask, int64_t T, int64_t E, int64_t k) {
  using acc_t = moestream::acc_t<scalar_t>;
  std::vector<acc_t> counts(E);
  acc_t total;
  expert_counts(ids, mask, T, E, k, counts.data(), &total);
  const int64_t nchunks = (T + kLossChunk - 1) / kLossChunk;
  std::vector<acc_t> part(nchunks * E, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> p(E);
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* psum = part.data() + c * E;
      for (int64_t t = c * kLossChunk; t < std::min(T, (c + 1) * kLossChunk); ++t) {
        load_row(logits + t * E, p.data(), E);
        softmax_row(p.data(), p.data(), E);
        const acc_t m = mask != nullptr ? mask[t] : acc_t(1);
        for (int64_t e = 0; e < E; ++e) psum[e] += p[e] * m;
      }
    }
  });
  acc_t loss = 0;
  for (int64_t e = 0; e < E; ++e) {
    acc_t s = 0;
    for (int64_t c = 0; c < nchunks; ++c) s += part[c * E + e];
    loss += (counts[e] / total) * (s / total);
  }
  return loss * static_cast<acc_t>(E);
}

// The checked inputs of router_aux_loss and its backward, contiguous, the mask in the accumulation
// dtype (undefined without one), the ids range checked.
struct AuxLossInputs {
  RouterDims d;
  at::Tensor lg, id, m;
};

AuxLossInputs aux_loss_inputs(const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                              const char* op) {
  AuxLossInputs in;
  in.d = check_router_aux_loss_args(logits, ids, mask, op);
  in.lg = logits.contiguous();
  in.id = ids.contiguous();
  if (mask.has_value()) in.m = mask->to(acc_dtype(logits.scalar_type())).contiguous();
  check_router_ids_range(in.id, in.d.E, op);
  return in;
}

// logits [T, E] float, ids [T, k] int32|int64 in [0, E), mask [T] (optional; float, int or bool)
// -> scalar float32 (float64 for float64 logits) E * sum_e f_e P_e. NaN when the mask sums to 0
// (no tokens), like the reference.
at::Tensor router_aux_loss_cpu(const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& mask) {
  const AuxLossInputs in = aux_loss_inputs(logits, ids, mask, "router_aux_loss");
  const int64_t T = in.d.T, E = in.d.E, k = in.d.k;
  const at::Tensor &lg = in.lg, &id = in.id, &m = in.m;
  at::Tensor out = at::empty({}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  MS_DISPATCH_FLOATS_AND_INDEX(lg.scalar_type(), id.scalar_type(), "router_aux_loss_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    *out.mutable_data_ptr<acc_t>() =
        aux_loss_kernel<scalar_t, index_t>(lg.const_data_ptr<scalar_t>(), id.const_data_ptr<index_t>(),
                                           m.defined() ? m.const_data_ptr<acc_t>() : nullptr, T, E, k);
  });
  return out;
}

template <typename scalar_t, typename index_t>
void aux_loss_backward_kernel(double grad, const scalar_t* logits, const index_t* ids,
                              const acc_t<scalar_t>* mask, int64_t T, int64_t E, int64_t k,
                              scalar_t* grad_logits) {
  using acc_t = moestream::acc_t<scalar_t>;
  std::vector<acc_t> f(E);
  acc_t total;
  expert_counts(ids, mask, T, E, k, f.data(), &total);
  for (int64_t e = 0; e < E; ++e) f[e] /= total;
  // loss = E / total * sum_t m_t sum_e f_e p_te  ->  dp_te = grad * E * m_t / total * f_e
  const acc_t coef = static_cast<acc_t>(grad) * static_cast<acc_t>(E) / total;
  at::parallel_for(0, T, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(E);
    for (int64_t t = begin; t < end; ++t) {
      load_row(logits + t * E, p.data(), E);
      softmax_row(p.data(), p.data(), E);
      const acc_t r = coef * (mask != nullptr ? mask[t] : acc_t(1));
      acc_t c = 0;
      for (int64_t e = 0; e < E; ++e) c += p[e] * f[e];
      scalar_t* dst = grad_logits + t * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<scalar_t>(r * p[e] * (f[e] - c));
    }
  });
}

double scalar_grad(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  check_router_scalar_grad(grad, logits, op);
  return grad.to(at::kDouble).item<double>();
}

// grad scalar, logits [T, E], ids [T, k], mask [T] (optional) -> grad_logits [T, E] in logits' dtype.
at::Tensor router_aux_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ids,
                                        const std::optional<at::Tensor>& mask) {
  const char* op = "router_aux_loss_backward";
  const AuxLossInputs in = aux_loss_inputs(logits, ids, mask, op);
  const double g = scalar_grad(grad, logits, op);
  const int64_t T = in.d.T, E = in.d.E, k = in.d.k;
  const at::Tensor &lg = in.lg, &id = in.id, &m = in.m;
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0 || E == 0) return grad_logits;
  MS_DISPATCH_FLOATS_AND_INDEX(lg.scalar_type(), id.scalar_type(), "router_aux_loss_backward_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    aux_loss_backward_kernel<scalar_t, index_t>(g, lg.const_data_ptr<scalar_t>(), id.const_data_ptr<index_t>(),
                                                m.defined() ? m.const_data_ptr<acc_t>() : nullptr, T, E, k,
                                                grad_logits.mutable_data_ptr<scalar_t>());
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------------------------
// z-loss

// logits [T, E] float -> scalar float32 (float64 for float64 logits) mean_t logsumexp(logits_t)^2
// (NaN for T = 0, the mean of nothing, like the reference).
at::Tensor router_z_loss_cpu(const at::Tensor& logits) {
  const char* op = "router_z_loss";
  check_router_logits(logits, op);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor lg = logits.contiguous();
  at::Tensor out = at::empty({}, logits.options().dtype(acc));
  MS_DISPATCH_FLOATS(lg.scalar_type(), "router_z_loss_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    const scalar_t* x = lg.const_data_ptr<scalar_t>();
    const int64_t nchunks = (T + kLossChunk - 1) / kLossChunk;
    std::vector<acc_t> part(nchunks, acc_t(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> row(E), tmp(E);
      for (int64_t c = cb; c < ce; ++c) {
        acc_t s = 0;
        for (int64_t t = c * kLossChunk; t < std::min(T, (c + 1) * kLossChunk); ++t) {
          load_row(x + t * E, row.data(), E);
          const acc_t lse = logsumexp_row(row.data(), tmp.data(), E);
          s += lse * lse;
        }
        part[c] = s;
      }
    });
    acc_t sum = 0;
    for (int64_t c = 0; c < nchunks; ++c) sum += part[c];
    *out.mutable_data_ptr<acc_t>() = sum / static_cast<acc_t>(T);
  });
  return out;
}

// grad scalar, logits [T, E] -> grad_logits [T, E] = grad * 2 * lse_t / T * softmax(logits_t).
at::Tensor router_z_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "router_z_loss_backward";
  check_router_logits(logits, op);
  const double g = scalar_grad(grad, logits, op);
  const int64_t T = logits.size(0), E = logits.size(1);
  const at::Tensor lg = logits.contiguous();
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0 || E == 0) return grad_logits;
  MS_DISPATCH_FLOATS(lg.scalar_type(), "router_z_loss_backward_cpu", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    const scalar_t* x = lg.const_data_ptr<scalar_t>();
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    const acc_t coef = static_cast<acc_t>(2.0 * g) / static_cast<acc_t>(T);
    at::parallel_for(0, T, row_grain(E), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(E), tmp(E);
      for (int64_t t = begin; t < end; ++t) {
        load_row(x + t * E, row.data(), E);
        const acc_t r = coef * logsumexp_row(row.data(), tmp.data(), E);
        softmax_row(row.data(), row.data(), E);
        for (int64_t e = 0; e < E; ++e) gl[t * E + e] = static_cast<scalar_t>(r * row[e]);
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk_backward", &router_topk_backward_cpu);
  m.impl("router_aux_loss", &router_aux_loss_cpu);
  m.impl("router_aux_loss_backward", &router_aux_loss_backward_cpu);
  m.impl("router_z_loss", &router_z_loss_cpu);
  m.impl("router_z_loss_backward", &router_z_loss_backward_cpu);
}

}  // namespace moestream
