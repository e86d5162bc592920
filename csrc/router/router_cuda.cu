// Router CUDA kernels: fused top-k gating (forward and backward), load-balancing loss and z-loss.
//
// router_topk: one warp per token. For up to 512 experts a lane keeps its experts (e = lane + 32 j)
// in registers; above that the warp streams the logits row from global memory (slower, unbounded).
// Selection is k rounds of a warp arg-max over a strict total order (score descending, NaN first
// as in torch.sort, ties to the lower id): round i takes the best element ranked strictly after the
// pick of round i-1, so no "taken" flags are needed and the result equals a stable descending sort.
//
// Losses are deterministic: per-block partial sums over fixed token tiles, then one block sums the
// partials in block order. No float atomics, no host synchronisation.
#include <climits>

#include "common/cuda_utils.cuh"
#include "router/router_cuda.h"

namespace moestream {
namespace {

using namespace dev;

constexpr int kRouterWarps = 4;  // tokens per block, one warp each
constexpr int kRouterThreads = 32 * kRouterWarps;
constexpr int kRegisterMaxExperts = 512;  // 32 lanes x 16 register slots
constexpr int kBwdVPT = 8;                // backward: experts per lane per chunk (chunks of 256)

constexpr int kLossThreads = 256;
constexpr int kLossWarps = kLossThreads / 32;
constexpr int kLossTile = 64;  // tokens per partial-sum block (fixed: results do not depend on the GPU)

// (a, ia) ranks strictly before (b, ib): larger value first, NaN before everything (torch's
// descending sort), equal values by lower index. A strict total order since indices are unique.
template <typename A>
__device__ __forceinline__ bool ranks_before(A a, int ia, A b, int ib) {
  const bool an = ms_isnan(a), bn = ms_isnan(b);
  if (an != bn) return an;
  if (!an && a != b) return a > b;
  return ia < ib;
}

template <typename A>
__device__ __forceinline__ bool greater_nan_first(A a, A b) {
  return ms_isnan(a) ? !ms_isnan(b) : (a > b);
}

// Warp-wide arg-best under ranks_before; `raw` travels with the winner. All lanes end with the
// same winner because the order is total.
template <typename A>
__device__ __forceinline__ void warp_argbest(A& v, int& id, A& raw) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(kFullMask, v, o);
    const int oid = __shfl_xor_sync(kFullMask, id, o);
    const A oraw = __shfl_xor_sync(kFullMask, raw, o);
    if (ranks_before(ov, oid, v, id)) {
      v = ov;
      id = oid;
      raw = oraw;
    }
  }
}

// Group scores: sum of the top-2 selection values of each group of `group_size` consecutive
// experts (the top-1 when a group has one expert). Lanes take groups g = lane + 32 j; the scan
// starts at a group-dependent offset so lanes hit different shared-memory banks (the top-2 sum
// does not depend on the scan order).
template <typename A, typename SelAt>
__device__ __forceinline__ void group_scores(SelAt sel_at, int num_groups, int group_size, int lane, A* gs) {
  for (int g = lane; g < num_groups; g += 32) {
    A b1 = neg_inf<A>(), b2 = neg_inf<A>();
    const int rot = g % group_size;
    for (int i = 0; i < group_size; ++i) {
      int ii = i + rot;
      if (ii >= group_size) ii -= group_size;
      const A v = sel_at(g * group_size + ii);
      if (greater_nan_first(v, b1)) {
        b2 = b1;
        b1 = v;
      } else if (greater_nan_first(v, b2)) {
        b2 = v;
      }
    }
    gs[g] = group_size >= 2 ? b1 + b2 : b1;
  }
}

// The topk_groups-th best group (thr_v, thr_g): group g is kept iff it does not rank after it,
// i.e. !ranks_before(thr_v, thr_g, gs[g], g). gs must be visible to the whole warp.
template <typename A>
__device__ __forceinline__ void group_threshold(const A* gs, int num_groups, int topk_groups, int lane, A& thr_v,
                                                int& thr_g) {
  bool have = false;
  thr_v = A(0);
  thr_g = 0;
  for (int r = 0; r < topk_groups; ++r) {
    A bv = neg_inf<A>();
    int bi = INT_MAX;
    A unused = A(0);
    for (int g = lane; g < num_groups; g += 32) {
      const A v = gs[g];
      if ((!have || ranks_before(thr_v, thr_g, v, g)) && ranks_before(v, g, bv, bi)) {
        bv = v;
        bi = g;
      }
    }
    warp_argbest(bv, bi, unused);
    thr_v = bv;
    thr_g = bi;
    have = true;
  }
}

// wrow[i] holds the raw value of pick i (the score, or with topk_first the logit); it was written
// by lane i % 32, which is the lane that reads and rewrites it here (no synchronisation needed).
// Applies the topk_first scoring (softmax over the k, or sigmoid), normalize and scale.
template <typename A>
__device__ __forceinline__ void finalize_weights(A* wrow, int k, int lane, bool sigmoid, bool topk_first,
                                                 A raw_max, bool normalize, A scale) {
  const bool softmax_k = topk_first && !sigmoid;
  A part = A(0);
  for (int i = lane; i < k; i += 32) {
    const A r = wrow[i];
    const A w = topk_first ? (sigmoid ? ms_sigmoid(r) : ms_exp(r - raw_max)) : r;
    wrow[i] = w;
    part += w;
  }
  A total = warp_sum(part);
  if (softmax_k) {
    part = A(0);
    for (int i = lane; i < k; i += 32) {
      const A w = wrow[i] / total;
      wrow[i] = w;
      part += w;
    }
    total = warp_sum(part);
  }
  const A denom = total + A(1e-20);
  for (int i = lane; i < k; i += 32) {
    const A w = wrow[i];
    wrow[i] = (normalize ? w / denom : w) * scale;
  }
}

// ---- row statistics and the picks -----------------------------------------------------------------
// m = max of the row, z = sum of exp(l - m): the row's softmax is exp(l - m) / z. Every lane gets both.
template <typename T>
__device__ __forceinline__ void row_softmax_stats(const T* row, int E, int lane, acc_t<T>& m, acc_t<T>& z) {
  using A = acc_t<T>;
  A mx = neg_inf<A>();
  for (int e = lane; e < E; e += 32) mx = ms_fmax(mx, to_acc(row[e]));
  mx = warp_max(mx);
  A s = A(0);
  for (int e = lane; e < E; e += 32) s += ms_exp(to_acc(row[e]) - mx);
  m = mx;
  z = warp_sum(s);
}

// logsumexp of a row; +-inf maxima are returned as is (like torch.logsumexp).
template <typename T>
__device__ __forceinline__ acc_t<T> row_lse(const T* row, int E, int lane) {
  acc_t<T> m, z;
  row_softmax_stats(row, E, lane, m, z);
  return ms_isinf(m) ? m : m + ms_log(z);
}

// The k rounds of selection of one warp: each lane offers its candidates for the round, the warp
// takes the best, lane i % 32 writes pick i (its id, and its raw value for finalize_weights).
template <typename A>
struct TopkPicker {
  A prev_v = A(0);
  int prev_i = -1;  // nothing picked yet
  A raw_max = neg_inf<A>();
  A bv;
  int bi;
  A braw;

  __device__ __forceinline__ void begin_round() {
    bv = neg_inf<A>();
    bi = INT_MAX;
    braw = A(0);
  }
  // candidate (selection value v, expert e, raw value raw): kept when it ranks after the previous
  // pick and before this lane's best so far
  __device__ __forceinline__ void offer(A v, int e, A raw) {
    if ((prev_i < 0 || ranks_before(prev_v, prev_i, v, e)) && ranks_before(v, e, bv, bi)) {
      bv = v;
      bi = e;
      braw = raw;
    }
  }
  __device__ __forceinline__ void end_round(int i, int lane, int64_t* irow, A* wrow) {
    warp_argbest(bv, bi, braw);
    prev_v = bv;
    prev_i = bi;
    raw_max = ms_fmax(raw_max, braw);
    if (lane == (i & 31)) {
      irow[i] = bi;
      wrow[i] = braw;
    }
  }
};

// ---- router_topk, experts <= 512: values in registers -------------------------------------------
template <typename T, int VPT>
__global__ void __launch_bounds__(kRouterThreads)
    router_topk_reg_kernel(const T* __restrict__ logits, const acc_t<T>* __restrict__ bias, int64_t tokens, int E,
                           int k, bool sigmoid, bool topk_first, int num_groups, int topk_groups, bool normalize,
                           acc_t<T> scale, acc_t<T>* __restrict__ weights, int64_t* __restrict__ ids) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char router_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;  // uniform per warp
  const T* row = logits + t * E;

  A sc[VPT];   // score (softmax / sigmoid), or the logit with topk_first
  A sel[VPT];  // selection value: score (+ bias), -inf where masked
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    sc[j] = e < E ? to_acc(row[e]) : A(0);
  }
  if (!topk_first) {
    if (sigmoid) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) sc[j] = ms_sigmoid(sc[j]);
    } else {
      A m = neg_inf<A>();
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (lane + 32 * j < E) m = ms_fmax(m, sc[j]);
      m = warp_max(m);
      A z = A(0);
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        if (lane + 32 * j < E) {
          sc[j] = ms_exp(sc[j] - m);
          z += sc[j];
        }
      }
      z = warp_sum(z);
#pragma unroll
      for (int j = 0; j < VPT; ++j) sc[j] = sc[j] / z;
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    sel[j] = e < E ? (bias != nullptr ? sc[j] + bias[e] : sc[j]) : neg_inf<A>();
  }

  if (num_groups > 1) {
    A* ssel = reinterpret_cast<A*>(router_smem) + static_cast<size_t>(warp) * (E + num_groups);
    A* sgs = ssel + E;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + 32 * j;
      if (e < E) ssel[e] = sel[j];
    }
    __syncwarp();
    const int G = E / num_groups;
    group_scores<A>([&](int e) { return ssel[e]; }, num_groups, G, lane, sgs);
    __syncwarp();
    A thr_v;
    int thr_g;
    group_threshold(sgs, num_groups, topk_groups, lane, thr_v, thr_g);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + 32 * j;
      if (e < E) {
        const int g = e / G;
        if (ranks_before(thr_v, thr_g, sgs[g], g)) sel[j] = neg_inf<A>();
      }
    }
  }

  A* wrow = weights + t * k;
  int64_t* irow = ids + t * k;
  TopkPicker<A> pick;
  for (int i = 0; i < k; ++i) {
    pick.begin_round();
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + 32 * j;
      if (e < E) pick.offer(sel[j], e, sc[j]);
    }
    pick.end_round(i, lane, irow, wrow);
  }
  finalize_weights(wrow, k, lane, sigmoid, topk_first, pick.raw_max, normalize, scale);
}

// ---- router_topk, experts > 512: the warp streams the row from global memory ---------------------
template <typename T>
__global__ void __launch_bounds__(kRouterThreads)
    router_topk_stream_kernel(const T* __restrict__ logits, const acc_t<T>* __restrict__ bias, int64_t tokens, int E,
                              int k, bool sigmoid, bool topk_first, int num_groups, int topk_groups, bool normalize,
                              acc_t<T> scale, acc_t<T>* __restrict__ weights, int64_t* __restrict__ ids,
                              acc_t<T>* __restrict__ group_ws) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  const T* row = logits + t * E;

  A m = A(0), z = A(1);
  if (!topk_first && !sigmoid) row_softmax_stats(row, E, lane, m, z);
  auto score = [&](int e) -> A {
    const A l = to_acc(row[e]);
    if (topk_first) return l;
    return sigmoid ? ms_sigmoid(l) : ms_exp(l - m) / z;
  };
  auto select = [&](int e, A s) -> A { return bias != nullptr ? s + bias[e] : s; };

  const bool grouped = num_groups > 1;
  const int G = E / num_groups;
  A* gs = grouped ? group_ws + t * num_groups : nullptr;
  A thr_v = A(0);
  int thr_g = 0;
  if (grouped) {
    group_scores<A>([&](int e) { return select(e, score(e)); }, num_groups, G, lane, gs);
    __syncwarp();  // orders the global writes above before other lanes read them
    group_threshold(gs, num_groups, topk_groups, lane, thr_v, thr_g);
  }

  A* wrow = weights + t * k;
  int64_t* irow = ids + t * k;
  TopkPicker<A> pick;
  for (int i = 0; i < k; ++i) {
    pick.begin_round();
    for (int e = lane; e < E; e += 32) {
      const A s = score(e);
      A v = select(e, s);
      if (grouped) {
        const int g = e / G;
        if (ranks_before(thr_v, thr_g, gs[g], g)) v = neg_inf<A>();
      }
      pick.offer(v, e, s);
    }
    pick.end_round(i, lane, irow, wrow);
  }
  finalize_weights(wrow, k, lane, sigmoid, topk_first, pick.raw_max, normalize, scale);
}

// ---- router_topk backward ------------------------------------------------------------------------
// Forward chain per token: r_i (score of pick i, or its logit with topk_first) -> w_i (identity,
// softmax over the k, or sigmoid) -> n_i = w_i / (sum w + 1e-20) if normalize -> scale * n_i.
// Backward, with dn_i = scale * g_i:
//   normalize:        dw_i = (dn_i - sum_j dn_j n_j) / (sum w + 1e-20), else dw_i = dn_i
//   softmax over E:   dl_e = p_e (dp_e - sum_i w_i dw_i), dp_e = sum of dw_i over picks i of e
//   softmax over k:   dl_{id_i} += w_i (dw_i - sum_j w_j dw_j)
//   sigmoid (both):   dl_{id_i} += dw_i w_i (1 - w_i)
// One warp per token; experts are processed in chunks of 32 * kBwdVPT held in registers, picks
// are broadcast 32 at a time with shuffles, so any E and k work without scratch memory.
template <typename T>
__global__ void __launch_bounds__(kRouterThreads)
    router_topk_backward_kernel(const acc_t<T>* __restrict__ grad_w, const T* __restrict__ logits,
                                const int64_t* __restrict__ ids, int64_t tokens, int E, int k, bool sigmoid,
                                bool topk_first, bool normalize, acc_t<T> scale, T* __restrict__ grad_logits) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  const T* row = logits + t * E;
  const int64_t* irow = ids + t * k;
  const A* grow = grad_w + t * k;
  T* out = grad_logits + t * E;
  const bool full_softmax = !topk_first && !sigmoid;
  const bool softmax_k = topk_first && !sigmoid;

  A m = A(0), z = A(1);
  if (full_softmax) row_softmax_stats(row, E, lane, m, z);
  auto pick_id = [&](int i) -> int {
    const int64_t id = irow[i];
    return (id >= 0 && id < E) ? static_cast<int>(id) : -1;
  };
  auto pick_raw = [&](int id) -> A {
    const A l = to_acc(row[id]);
    if (topk_first) return l;
    return sigmoid ? ms_sigmoid(l) : ms_exp(l - m) / z;
  };
  A rmax = A(0);
  if (softmax_k) {
    A v = neg_inf<A>();
    for (int i = lane; i < k; i += 32) {
      const int id = pick_id(i);
      if (id >= 0) v = ms_fmax(v, pick_raw(id));
    }
    rmax = warp_max(v);
  }
  // weight before normalisation, without the softmax-over-k division
  auto pick_w0 = [&](int id) -> A {
    const A r = pick_raw(id);
    return topk_first ? (sigmoid ? ms_sigmoid(r) : ms_exp(r - rmax)) : r;
  };
  A part = A(0);
  for (int i = lane; i < k; i += 32) {
    const int id = pick_id(i);
    if (id >= 0) part += pick_w0(id);
  }
  const A s1 = warp_sum(part);
  auto pick_w = [&](int id) -> A { return softmax_k ? pick_w0(id) / s1 : pick_w0(id); };
  A wsum = s1;
  if (softmax_k) {
    part = A(0);
    for (int i = lane; i < k; i += 32) {
      const int id = pick_id(i);
      if (id >= 0) part += pick_w(id);
    }
    wsum = warp_sum(part);
  }
  const A denom = wsum + A(1e-20);
  A ncorr = A(0);  // sum_j dn_j n_j
  if (normalize) {
    part = A(0);
    for (int i = lane; i < k; i += 32) {
      const int id = pick_id(i);
      if (id >= 0) part += scale * grow[i] * (pick_w(id) / denom);
    }
    ncorr = warp_sum(part);
  }
  auto pick_dw = [&](int i) -> A {
    const A dn = scale * grow[i];
    return normalize ? (dn - ncorr) / denom : dn;
  };
  A wdot = A(0);  // sum_i w_i dw_i
  if (!sigmoid) {
    part = A(0);
    for (int i = lane; i < k; i += 32) {
      const int id = pick_id(i);
      if (id >= 0) part += pick_w(id) * pick_dw(i);
    }
    wdot = warp_sum(part);
  }
  auto pick_q = [&](int i, int id) -> A {
    const A w = pick_w(id);
    const A dw = pick_dw(i);
    if (sigmoid) return dw * w * (A(1) - w);
    if (topk_first) return w * (dw - wdot);
    return dw;  // full softmax: dp contribution
  };

  for (int base = 0; base < E; base += 32 * kBwdVPT) {
    A dp[kBwdVPT];
#pragma unroll
    for (int j = 0; j < kBwdVPT; ++j) dp[j] = A(0);
    for (int i0 = 0; i0 < k; i0 += 32) {
      const int i = i0 + lane;
      int my_id = -1;
      A my_q = A(0);
      if (i < k) {
        my_id = pick_id(i);
        if (my_id >= 0) my_q = pick_q(i, my_id);
      }
      const int n = min(32, k - i0);
      for (int src = 0; src < n; ++src) {  // picks in order: a fixed summation order
        const int id = __shfl_sync(kFullMask, my_id, src);
        const A q = __shfl_sync(kFullMask, my_q, src);
        const int rel = id - base - lane;  // == 32 j when id is this lane's j-th expert of the chunk
#pragma unroll
        for (int j = 0; j < kBwdVPT; ++j)
          if (rel == 32 * j) dp[j] += q;
      }
    }
#pragma unroll
    for (int j = 0; j < kBwdVPT; ++j) {
      const int e = base + lane + 32 * j;
      if (e < E) {
        const A g = full_softmax ? (ms_exp(to_acc(row[e]) - m) / z) * (dp[j] - wdot) : dp[j];
        out[e] = from_acc<T>(g);
      }
    }
  }
}

// ---- losses -------------------------------------------------------------------------------------
// Per tile of kLossTile tokens: part_p[b, e] = sum_t mask_t p_te (skipped when part_p is null),
// part_c[b, e] = sum over (t, s) with ids[t, s] == e of mask_t, part_total[b] = sum_t mask_t.
template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    aux_partial_kernel(const T* __restrict__ logits, const int64_t* __restrict__ ids,
                       const acc_t<T>* __restrict__ mask, int64_t tokens, int E, int k, acc_t<T>* __restrict__ part_p,
                       acc_t<T>* __restrict__ part_c, acc_t<T>* __restrict__ part_total) {
  using A = acc_t<T>;
  __shared__ A s_m[kLossTile], s_z[kLossTile], s_mask[kLossTile];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  const int64_t t0 = b * kLossTile;
  const int nt = static_cast<int>(tokens - t0 < kLossTile ? tokens - t0 : kLossTile);
  for (int w = warp; w < nt; w += kLossWarps) {
    const int64_t t = t0 + w;
    if (part_p != nullptr) {
      A m, z;
      row_softmax_stats(logits + t * E, E, lane, m, z);
      if (lane == 0) {
        s_m[w] = m;
        s_z[w] = z;
      }
    }
    if (lane == 0) s_mask[w] = mask != nullptr ? mask[t] : A(1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kLossThreads) {
    A p = A(0), c = A(0);
    for (int w = 0; w < nt; ++w) {
      const int64_t t = t0 + w;
      const A mk = s_mask[w];
      if (part_p != nullptr) p += (ms_exp(to_acc(logits[t * E + e]) - s_m[w]) / s_z[w]) * mk;
      const int64_t* irow = ids + t * k;
      for (int s = 0; s < k; ++s)
        if (irow[s] == e) c += mk;
    }
    if (part_p != nullptr) part_p[b * E + e] = p;
    part_c[b * E + e] = c;
  }
  if (threadIdx.x == 0) {
    A tot = A(0);
    for (int w = 0; w < nt; ++w) tot += s_mask[w];
    part_total[b] = tot;
  }
}

// loss = E * sum_e (C_e / total) (P_e / total); partials summed in block order.
template <typename A>
__global__ void __launch_bounds__(kLossThreads)
    aux_finalize_kernel(const A* __restrict__ part_p, const A* __restrict__ part_c,
                        const A* __restrict__ part_total, int64_t nblocks, int E, A* __restrict__ out) {
  __shared__ A scratch[kLossWarps];
  A total = A(0);
  for (int64_t b = 0; b < nblocks; ++b) total += part_total[b];
  A acc = A(0);
  for (int e = threadIdx.x; e < E; e += kLossThreads) {
    A p = A(0), c = A(0);
    for (int64_t b = 0; b < nblocks; ++b) {
      p += part_p[b * E + e];
      c += part_c[b * E + e];
    }
    acc += (c / total) * (p / total);
  }
  acc = block_sum<kLossThreads>(acc, scratch);
  if (threadIdx.x == 0) *out = acc * static_cast<A>(E);
}

// coef[e] = grad * E * C_e / total^2 = dLoss / d(mask_t p_te)
template <typename A>
__global__ void __launch_bounds__(kLossThreads)
    aux_coef_kernel(const A* __restrict__ grad, const A* __restrict__ part_c, const A* __restrict__ part_total,
                    int64_t nblocks, int E, A* __restrict__ coef) {
  A total = A(0);
  for (int64_t b = 0; b < nblocks; ++b) total += part_total[b];
  const A g = *grad;
  for (int e = threadIdx.x; e < E; e += kLossThreads) {
    A c = A(0);
    for (int64_t b = 0; b < nblocks; ++b) c += part_c[b * E + e];
    coef[e] = g * static_cast<A>(E) * (c / total) / total;
  }
}

// dl_te = mask_t p_te (coef_e - sum_f p_tf coef_f); one warp per token.
template <typename T>
__global__ void __launch_bounds__(kRouterThreads)
    aux_backward_kernel(const T* __restrict__ logits, const acc_t<T>* __restrict__ mask,
                        const acc_t<T>* __restrict__ coef, int64_t tokens, int E, T* __restrict__ grad_logits) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  const T* row = logits + t * E;
  A m, z;
  row_softmax_stats(row, E, lane, m, z);
  A part = A(0);
  for (int e = lane; e < E; e += 32) part += (ms_exp(to_acc(row[e]) - m) / z) * coef[e];
  const A dot = warp_sum(part);
  const A mk = mask != nullptr ? mask[t] : A(1);
  for (int e = lane; e < E; e += 32) {
    const A p = ms_exp(to_acc(row[e]) - m) / z;
    grad_logits[t * E + e] = from_acc<T>(mk * p * (coef[e] - dot));
  }
}

// part[b] = sum over the tile's tokens of lse_t^2, warps in order, tokens in order within a warp.
template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    z_partial_kernel(const T* __restrict__ logits, int64_t tokens, int E, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A s_warp[kLossWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kLossTile;
  const int nt = static_cast<int>(tokens - t0 < kLossTile ? tokens - t0 : kLossTile);
  A acc = A(0);
  for (int w = warp; w < nt; w += kLossWarps) {
    const A lse = row_lse(logits + (t0 + w) * E, E, lane);
    acc += lse * lse;
  }
  if (lane == 0) s_warp[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = A(0);
    for (int w = 0; w < kLossWarps; ++w) s += s_warp[w];
    part[blockIdx.x] = s;
  }
}

template <typename A>
__global__ void __launch_bounds__(kLossThreads)
    z_finalize_kernel(const A* __restrict__ part, int64_t nblocks, int64_t tokens, A* __restrict__ out) {
  __shared__ A scratch[kLossWarps];
  A acc = A(0);
  for (int64_t b = threadIdx.x; b < nblocks; b += kLossThreads) acc += part[b];
  acc = block_sum<kLossThreads>(acc, scratch);
  if (threadIdx.x == 0) *out = acc / static_cast<A>(tokens);  // 0 tokens: NaN, like torch.mean
}

// dl_te = grad * 2 lse_t / T * softmax_te
template <typename T>
__global__ void __launch_bounds__(kRouterThreads)
    z_backward_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ logits, int64_t tokens, int E,
                      T* __restrict__ grad_logits) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= tokens) return;
  const T* row = logits + t * E;
  A m, z;
  row_softmax_stats(row, E, lane, m, z);
  const A lse = ms_isinf(m) ? m : m + ms_log(z);
  const A coef = *grad * A(2) * lse / static_cast<A>(tokens);
  for (int e = lane; e < E; e += 32) grad_logits[t * E + e] = from_acc<T>(coef * (ms_exp(to_acc(row[e]) - m) / z));
}

inline unsigned router_grid(int64_t tokens) { return static_cast<unsigned>(ceil_div(tokens, kRouterWarps)); }
inline int64_t loss_blocks(int64_t tokens) { return ceil_div(tokens, kLossTile); }

template <typename T, int VPT>
cudaError_t launch_topk_reg(const RouterTopkParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const size_t smem =
      p.num_groups > 1 ? static_cast<size_t>(kRouterWarps) * static_cast<size_t>(p.experts + p.num_groups) * sizeof(A)
                       : 0;
  router_topk_reg_kernel<T, VPT><<<router_grid(p.tokens), kRouterThreads, smem, stream>>>(
      static_cast<const T*>(p.logits), static_cast<const A*>(p.bias), p.tokens, static_cast<int>(p.experts),
      static_cast<int>(p.k), p.sigmoid, p.topk_first, static_cast<int>(p.num_groups), static_cast<int>(p.topk_groups),
      p.normalize, static_cast<A>(p.scale), static_cast<A*>(p.weights), p.ids);
  MS_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

int64_t router_topk_group_workspace_elems(int64_t tokens, int64_t experts, int64_t num_groups) {
  return (experts > kRegisterMaxExperts && num_groups > 1) ? tokens * num_groups : 0;
}

cudaError_t router_topk_launch(const RouterTopkParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.k == 0) return cudaSuccess;
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const int64_t E = p.experts;
    if (E <= 32) return launch_topk_reg<T, 1>(p, stream);
    if (E <= 64) return launch_topk_reg<T, 2>(p, stream);
    if (E <= 128) return launch_topk_reg<T, 4>(p, stream);
    if (E <= 256) return launch_topk_reg<T, 8>(p, stream);
    if (E <= kRegisterMaxExperts) return launch_topk_reg<T, 16>(p, stream);
    if (p.num_groups > 1 && p.group_workspace == nullptr) return cudaErrorInvalidValue;
    router_topk_stream_kernel<T><<<router_grid(p.tokens), kRouterThreads, 0, stream>>>(
        static_cast<const T*>(p.logits), static_cast<const A*>(p.bias), p.tokens, static_cast<int>(E),
        static_cast<int>(p.k), p.sigmoid, p.topk_first, static_cast<int>(p.num_groups),
        static_cast<int>(p.topk_groups), p.normalize, static_cast<A>(p.scale), static_cast<A*>(p.weights), p.ids,
        static_cast<A*>(p.group_workspace));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t router_topk_backward_launch(const RouterTopkBackwardParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.experts == 0) return cudaSuccess;
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    router_topk_backward_kernel<T><<<router_grid(p.tokens), kRouterThreads, 0, stream>>>(
        static_cast<const A*>(p.grad_weights), static_cast<const T*>(p.logits), p.ids, p.tokens,
        static_cast<int>(p.experts), static_cast<int>(p.k), p.sigmoid, p.topk_first, p.normalize,
        static_cast<A>(p.scale), static_cast<T*>(p.grad_logits));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

int64_t router_aux_loss_workspace_elems(int64_t tokens, int64_t experts) {
  return loss_blocks(tokens) * (2 * experts + 1) + experts;
}

cudaError_t router_aux_loss_launch(const void* logits, FloatKind dtype, int64_t tokens, int64_t experts,
                                   const int64_t* ids, int64_t k, const void* mask, void* out, void* workspace,
                                   cudaStream_t stream) {
  return dispatch_float(dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const int64_t nb = loss_blocks(tokens);
    A* part_p = static_cast<A*>(workspace);
    A* part_c = part_p + nb * experts;
    A* part_total = part_c + nb * experts;
    if (nb > 0) {
      aux_partial_kernel<T><<<static_cast<unsigned>(nb), kLossThreads, 0, stream>>>(
          static_cast<const T*>(logits), ids, static_cast<const A*>(mask), tokens, static_cast<int>(experts),
          static_cast<int>(k), part_p, part_c, part_total);
      MS_CUDA_LAUNCH_CHECK();
    }
    aux_finalize_kernel<A><<<1, kLossThreads, 0, stream>>>(part_p, part_c, part_total, nb,
                                                           static_cast<int>(experts), static_cast<A*>(out));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t router_aux_loss_backward_launch(const void* grad, const void* logits, FloatKind dtype, int64_t tokens,
                                            int64_t experts, const int64_t* ids, int64_t k, const void* mask,
                                            void* grad_logits, void* workspace, cudaStream_t stream) {
  if (tokens == 0 || experts == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const int64_t nb = loss_blocks(tokens);
    A* part_c = static_cast<A*>(workspace) + nb * experts;  // same layout as the forward
    A* part_total = part_c + nb * experts;
    A* coef = part_total + nb;
    aux_partial_kernel<T><<<static_cast<unsigned>(nb), kLossThreads, 0, stream>>>(
        static_cast<const T*>(logits), ids, static_cast<const A*>(mask), tokens, static_cast<int>(experts),
        static_cast<int>(k), nullptr, part_c, part_total);
    MS_CUDA_LAUNCH_CHECK();
    aux_coef_kernel<A><<<1, kLossThreads, 0, stream>>>(static_cast<const A*>(grad), part_c, part_total, nb,
                                                       static_cast<int>(experts), coef);
    MS_CUDA_LAUNCH_CHECK();
    aux_backward_kernel<T><<<router_grid(tokens), kRouterThreads, 0, stream>>>(
        static_cast<const T*>(logits), static_cast<const A*>(mask), coef, tokens, static_cast<int>(experts),
        static_cast<T*>(grad_logits));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

int64_t router_z_loss_workspace_elems(int64_t tokens) { return loss_blocks(tokens); }

cudaError_t router_z_loss_launch(const void* logits, FloatKind dtype, int64_t tokens, int64_t experts, void* out,
                                 void* workspace, cudaStream_t stream) {
  return dispatch_float(dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const int64_t nb = loss_blocks(tokens);
    A* part = static_cast<A*>(workspace);
    if (nb > 0) {
      z_partial_kernel<T><<<static_cast<unsigned>(nb), kLossThreads, 0, stream>>>(
          static_cast<const T*>(logits), tokens, static_cast<int>(experts), part);
      MS_CUDA_LAUNCH_CHECK();
    }
    z_finalize_kernel<A><<<1, kLossThreads, 0, stream>>>(part, nb, tokens, static_cast<A*>(out));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t router_z_loss_backward_launch(const void* grad, const void* logits, FloatKind dtype, int64_t tokens,
                                          int64_t experts, void* grad_logits, cudaStream_t stream) {
  if (tokens == 0 || experts == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    z_backward_kernel<T><<<router_grid(tokens), kRouterThreads, 0, stream>>>(
        static_cast<const A*>(grad), static_cast<const T*>(logits), tokens, static_cast<int>(experts),
        static_cast<T*>(grad_logits));
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace moestream
