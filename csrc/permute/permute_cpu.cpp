// CPU kernels for token dispatch (permute) and weighted combine (unpermute) and its backward.
//
// permute is a stable counting sort of the (token, slot) pairs by expert id: a histogram per fixed
// chunk of the flattened ids, an exclusive scan in (expert, chunk) order, then a scatter in which
// each chunk walks its pairs in order. The resulting order, (expert, token, slot), is unique, so it
// does not depend on the chunking or on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_memory.h"
#include "permute/permute_checks.h"

namespace moestream {
namespace {

// Rows per parallel task for row copies / per-token combines: enough work to amortise a task.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// ----------------------------------------------------------------------------------------------
// permute

// Ids per chunk of permute_indices' histograms.
constexpr int64_t kPermuteChunk = 1 << 14;

template <typename index_t>
void permute_indices(const index_t* ids, int64_t n, int64_t E, int64_t* perm, int64_t* offsets) {
  // Fixed chunking (independent of the thread count); each chunk keeps its own histogram.
  constexpr int64_t kChunk = kPermuteChunk;
  const int64_t nchunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<int64_t> counts(nchunks * E, 0);
  // First out-of-range position per chunk (n if none), so the error names the first bad id.
  std::vector<int64_t> bad(nchunks, n);

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * E;
      const int64_t i1 = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < i1; ++i) {
        const int64_t e = static_cast<int64_t>(ids[i]);
        if (e < 0 || e >= E) {
          bad[c] = i;
          break;
        }
        cnt[e]++;
      }
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    if (bad[c] < n) fail_expert_id(E, static_cast<int64_t>(ids[bad[c]]), bad[c]);
  }

  // Exclusive scan in (expert, chunk) order: counts[c][e] becomes chunk c's first row for expert e.
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t v = counts[c * E + e];
      counts[c * E + e] = running;
      running += v;
    }
    offsets[e] = running;
  }

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * E;
      const int64_t i1 = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < i1; ++i) perm[i] = next[static_cast<int64_t>(ids[i])]++;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                           int64_t num_experts) {
  // x [T, H] float, ids [T, k] int32|int64 in [0, num_experts)
  //   -> x_sorted [T*k, H] (x's dtype), perm [T, k] int64, offsets [num_experts] int64
  const PermuteDims d = check_permute_args(x_in, ids_in, num_experts);
  const int64_t T = d.T, k = d.k, H = d.H;
  const int64_t n = T * k;
  {
    // offsets [num_experts] and one histogram of num_experts counts per chunk of permute_indices
    const int64_t need = (std::max<int64_t>(1, (n + kPermuteChunk - 1) / kPermuteChunk) + 1) * num_experts * 8;
    const int64_t have = cpu::physical_memory_bytes();
    MS_CHECK(have == 0 || need <= have, "permute", "num_experts = ", num_experts, " needs ", need >> 20,
             " MiB for its offsets and expert counts, more than this machine's ", have >> 20, " MiB of memory");
  }
  auto x = x_in.contiguous();
  auto ids = ids_in.contiguous();
  auto x_sorted = cpu::empty_large({n, H}, x.options());
  auto perm = at::empty({T, k}, ids.options().dtype(at::kLong));
  auto offsets = at::empty({num_experts}, ids.options().dtype(at::kLong));

  int64_t* perm_p = perm.data_ptr<int64_t>();
  if (ids.scalar_type() == at::kInt) {
    permute_indices(ids.data_ptr<int32_t>(), n, num_experts, perm_p, offsets.data_ptr<int64_t>());
  } else {
    permute_indices(ids.data_ptr<int64_t>(), n, num_experts, perm_p, offsets.data_ptr<int64_t>());
  }

  if (n > 0 && H > 0) {
    // Each token's row is read once and written to its k destinations.
    const size_t row_bytes = static_cast<size_t>(H) * x.element_size();
    const char* src = static_cast<const char*>(x.const_data_ptr());
    char* dst = static_cast<char*>(x_sorted.data_ptr());
    at::parallel_for(0, T, std::max<int64_t>(1, row_grain(H) / std::max<int64_t>(k, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const char* row = src + t * row_bytes;
        for (int64_t s = 0; s < k; ++s) std::memcpy(dst + perm_p[t * k + s] * row_bytes, row, row_bytes);
      }
    });
  }
  return {x_sorted, perm, offsets};
}

// ----------------------------------------------------------------------------------------------
// unpermute

// perm -> int64 contiguous, every value checked to lie in [0, N).
at::Tensor checked_perm(const at::Tensor& perm_in, int64_t N, const char* op) {
  auto perm = perm_in.to(at::kLong).contiguous();
  check_perm_range(perm, N, op);
  return perm;
}

template <typename scalar_t, typename acc_t>
void unpermute_kernel(const scalar_t* ys, const int64_t* perm, const acc_t* w, scalar_t* out, int64_t T, int64_t k,
                      int64_t H) {
  at::parallel_for(0, T, row_grain(H) / std::max<int64_t>(k, 1) + 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(H);
    acc_t* a = acc.data();
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(a, a + H, acc_t(0));
      for (int64_t s = 0; s < k; ++s) {
        const scalar_t* row = ys + perm[t * k + s] * H;
        if (w != nullptr) {
          const acc_t ws = w[t * k + s];
          for (int64_t h = 0; h < H; ++h) a[h] += static_cast<acc_t>(row[h]) * ws;
        } else {
          for (int64_t h = 0; h < H; ++h) a[h] += static_cast<acc_t>(row[h]);
        }
      }
      scalar_t* o = out + t * H;
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(a[h]);
    }
  });
}

at::Tensor unpermute_cpu(const at::Tensor& y_sorted_in, const at::Tensor& perm_in,
                         const c10::optional<at::Tensor>& weights) {
  // y_sorted [N, H] float, perm [T, k] int64 (int32 accepted) in [0, N), weights [T, k] any float (optional)
  //   -> y [T, H] in y_sorted's dtype
  constexpr const char* op = "unpermute";
  const UnpermuteDims d = check_unpermute_args(y_sorted_in, perm_in, weights);
  const int64_t N = d.N, H = d.H, T = d.T, k = d.k;
  auto perm = checked_perm(perm_in, N, op);
  auto ys = y_sorted_in.contiguous();
  auto out = cpu::empty_large({T, H}, ys.options());
  if (T == 0 || H == 0) return out;

  MS_DISPATCH_FLOATS(ys.scalar_type(), "moestream.unpermute", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    at::Tensor w;
    if (weights.has_value()) w = weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    unpermute_kernel<scalar_t, acc_t>(ys.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
                                      w.defined() ? w.const_data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>(), T,
                                      k, H);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// unpermute backward

template <typename scalar_t, typename acc_t>
void unpermute_backward_kernel(const scalar_t* gy, const scalar_t* ys, const int64_t* perm, const acc_t* w,
                               scalar_t* gys, acc_t* gw, int64_t N, int64_t T, int64_t k, int64_t H) {
  const int64_t n = T * k;
  // Inverse of perm as CSR (row -> the (t, s) pairs that read it, in flat order). With perm from
  // permute every row has exactly one pair; duplicates are summed in flat order, unreferenced rows
  // are zero. Building it is O(N + T*k) and keeps the row loop race-free and deterministic.
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t i = 0; i < n; ++i) start[perm[i] + 1]++;
  for (int64_t r = 0; r < N; ++r) start[r + 1] += start[r];
  std::vector<int64_t> pairs(n);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) pairs[next[perm[i]]++] = i;
  }

  at::parallel_for(0, N, row_grain(H), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(H);
    acc_t* a = acc.data();
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* o = gys + r * H;
      const int64_t p0 = start[r], p1 = start[r + 1];
      if (p1 - p0 == 1) {
        const int64_t i = pairs[p0];
        const scalar_t* g = gy + (i / k) * H;
        if (w != nullptr) {
          const acc_t ws = w[i];
          for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(static_cast<acc_t>(g[h]) * ws);
        } else {
          std::memcpy(o, g, sizeof(scalar_t) * H);
        }
        continue;
      }
      std::fill(a, a + H, acc_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = pairs[p];
        const scalar_t* g = gy + (i / k) * H;
        const acc_t ws = w != nullptr ? w[i] : acc_t(1);
        for (int64_t h = 0; h < H; ++h) a[h] += static_cast<acc_t>(g[h]) * ws;
      }
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(a[h]);
    }
  });

  if (gw != nullptr) {
    // grad_w[t, s] = <grad_y[t], y_sorted[perm[t, s]]>, 8 partial sums in a fixed order.
    at::parallel_for(0, T, row_grain(H) / std::max<int64_t>(k, 1) + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* g = gy + t * H;
        for (int64_t s = 0; s < k; ++s) {
          const scalar_t* y = ys + perm[t * k + s] * H;
          acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t h = 0;
          for (; h + 8 <= H; h += 8) {
            for (int j = 0; j < 8; ++j) part[j] += static_cast<acc_t>(g[h + j]) * static_cast<acc_t>(y[h + j]);
          }
          for (int j = 0; h < H; ++h, ++j) part[j] += static_cast<acc_t>(g[h]) * static_cast<acc_t>(y[h]);
          gw[t * k + s] = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& y_sorted_in,
                                                          const at::Tensor& perm_in,
                                                          const c10::optional<at::Tensor>& weights,
                                                          bool needs_weights_grad) {
  // grad_y [T, H], y_sorted [N, H] (same dtype), perm [T, k] in [0, N), weights [T, k] (optional)
  //   -> grad_y_sorted [N, H] (y_sorted's dtype), grad_weights [T, k] float32 (float64 for float64
  //      inputs) or an empty [0] tensor when weights is None or needs_weights_grad is false
  constexpr const char* op = "unpermute_backward";
  const UnpermuteDims d = check_unpermute_backward_args(grad_y_in, y_sorted_in, perm_in, weights);
  const int64_t N = d.N, H = d.H, T = d.T, k = d.k;

  auto perm = checked_perm(perm_in, N, op);
  auto gy = grad_y_in.contiguous();
  auto ys = y_sorted_in.contiguous();
  const auto acc_type = acc_dtype(ys.scalar_type());
  const bool want_gw = weights.has_value() && needs_weights_grad;
  auto grad_ys = cpu::empty_large({N, H}, ys.options());
  const std::vector<int64_t> gw_shape = want_gw ? std::vector<int64_t>{T, k} : std::vector<int64_t>{0};
  auto grad_w = at::empty(gw_shape, ys.options().dtype(acc_type));
  if (H == 0) {
    if (want_gw) grad_w.zero_();
    return {grad_ys, grad_w};
  }

  MS_DISPATCH_FLOATS(ys.scalar_type(), "moestream.unpermute_backward", [&] {
    using acc_t = moestream::acc_t<scalar_t>;
    at::Tensor w;
    if (weights.has_value()) w = weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    unpermute_backward_kernel<scalar_t, acc_t>(gy.const_data_ptr<scalar_t>(), ys.const_data_ptr<scalar_t>(),
                                               perm.const_data_ptr<int64_t>(),
                                               w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                               grad_ys.data_ptr<scalar_t>(),
                                               want_gw ? grad_w.data_ptr<acc_t>() : nullptr, N, T, k, H);
  });
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moestream
