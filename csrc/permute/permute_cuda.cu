// Permute / unpermute CUDA kernels.
//
// permute orders the n = T * k (token, slot) entries by expert, keeping (token, slot) order within
// an expert. The order comes from a stable LSD radix sort (cub::DeviceRadixSort::SortPairs) of the
// expert ids (keys, only the bits needed for num_experts) with the flat index t * k + s as value:
// stable, deterministic, asynchronous (no host synchronisation, CUDA-graph capturable), any number
// of experts. Up to kSmallN entries (decoding) a single block ranks them directly instead: one
// launch instead of a sort's several. A last kernel copies the rows with the widest access (16, 8,
// 4, 2 or 1 bytes) the row size and pointers allow, writes perm and computes offsets by binary
// search in the sorted keys.
//
// Out-of-range ids (< 0 or >= num_experts) cannot raise without a synchronisation: they get the key
// num_experts, so they sort after every expert and land in the rows past offsets[-1] that no expert
// owns. Every write stays in bounds.
#include <cub/device/device_radix_sort.cuh>

#include "common/cuda_utils.cuh"
#include "permute/permute_cuda.h"

namespace moestream {
namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kSmallN = 512;  // entries ranked by one block (kSmallThreads threads, one entry each)
constexpr int kSmallThreads = 512;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

template <typename IdT>
__device__ __forceinline__ uint32_t expert_key(IdT id, int64_t num_experts) {
  const int64_t v = static_cast<int64_t>(id);
  return (v >= 0 && v < num_experts) ? static_cast<uint32_t>(v) : static_cast<uint32_t>(num_experts);
}

template <typename IdT>
__global__ void __launch_bounds__(kThreads)
    permute_keys_kernel(const IdT* __restrict__ ids, int64_t n, int64_t num_experts, uint32_t* __restrict__ keys,
                        int32_t* __restrict__ vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < n; f += stride) {
    keys[f] = expert_key(ids[f], num_experts);
    vals[f] = static_cast<int32_t>(f);
  }
}

// n <= kSmallN: rank of entry f = #{g : key_g < key_f} + #{g < f : key_g == key_f} (stable);
// offsets[e] = #{g : key_g <= e}. Shared-memory reads are broadcasts (all threads read keys[g]).
template <typename IdT>
__global__ void __launch_bounds__(kSmallThreads)
    permute_small_index_kernel(const IdT* __restrict__ ids, int n, int64_t num_experts, int32_t* __restrict__ order,
                               int64_t* __restrict__ perm, int64_t* __restrict__ offsets) {
  __shared__ uint32_t keys[kSmallN];
  for (int f = threadIdx.x; f < n; f += blockDim.x) keys[f] = expert_key(ids[f], num_experts);
  __syncthreads();
  for (int f = threadIdx.x; f < n; f += blockDim.x) {
    const uint32_t kf = keys[f];
    int rank = 0;
    for (int g = 0; g < n; ++g) {
      const uint32_t kg = keys[g];
      rank += (kg < kf || (kg == kf && g < f)) ? 1 : 0;
    }
    order[rank] = f;
    perm[f] = rank;
  }
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int c = 0;
    for (int g = 0; g < n; ++g) c += (static_cast<int64_t>(keys[g]) <= e) ? 1 : 0;
    offsets[e] = c;
  }
}

// One warp per destination row r (grid-stride): x_sorted[r] = x[order[r] / k], in units of V
// (the access width). Also perm[order[r]] = r and offsets (upper bounds in sorted_keys) when given.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    permute_rows_kernel(const V* __restrict__ x, V* __restrict__ out, const int32_t* __restrict__ order, int64_t n,
                        int64_t k, int64_t row_len, int64_t* __restrict__ perm,
                        const uint32_t* __restrict__ sorted_keys, int64_t* __restrict__ offsets,
                        int64_t num_experts) {
  const int lane = threadIdx.x & 31;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (offsets != nullptr) {
    for (int64_t e = tid; e < num_experts; e += nthreads) {
      int64_t lo = 0, hi = n;  // first position whose key is > e
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (static_cast<int64_t>(sorted_keys[mid]) <= e)
          lo = mid + 1;
        else
          hi = mid;
      }
      offsets[e] = lo;
    }
  }
  constexpr int kUnroll = 4;
  for (int64_t r = tid >> 5; r < n; r += nthreads >> 5) {
    const int64_t f = order[r];
    if (perm != nullptr && lane == 0) perm[f] = r;
    const V* src = x + (f / k) * row_len;
    V* dst = out + r * row_len;
    for (int64_t c0 = lane; c0 < row_len; c0 += 32 * kUnroll) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + 32 * u;
        if (c < row_len) v[u] = src[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + 32 * u;
        if (c < row_len) dst[c] = v[u];
      }
    }
  }
}

int key_bits(int64_t num_experts) {  // bits to represent num_experts (the out-of-range key)
  int bits = 1;
  while ((int64_t(1) << bits) <= num_experts) ++bits;
  return bits;
}

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

cudaError_t launch_rows(const PermuteParams& p, const int32_t* order, int64_t n, int64_t* perm,
                        const uint32_t* sorted_keys, int64_t* offsets, cudaStream_t stream) {
  const int64_t row_bytes = p.hidden * p.elem_size;
  int unit = 16;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.x_sorted);
  while (unit > 1 && (row_bytes % unit != 0 || addr % unit != 0)) unit >>= 1;
  const int64_t row_len = row_bytes / unit;
  int64_t blocks = ceil_div(n, kWarpsPerBlock);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const dim3 grid(static_cast<unsigned>(blocks));
#define MS_PERMUTE_ROWS(VT)                                                                             \
  permute_rows_kernel<VT><<<grid, kThreads, 0, stream>>>(static_cast<const VT*>(p.x), static_cast<VT*>(p.x_sorted), \
                                                          order, n, p.k, row_len, perm, sorted_keys, offsets,       \
                                                          p.num_experts)
  switch (unit) {
    case 16:
      MS_PERMUTE_ROWS(uint4);
      break;
    case 8:
      MS_PERMUTE_ROWS(uint2);
      break;
    case 4:
      MS_PERMUTE_ROWS(uint32_t);
      break;
    case 2:
      MS_PERMUTE_ROWS(uint16_t);
      break;
    default:
      MS_PERMUTE_ROWS(uint8_t);
      break;
  }
#undef MS_PERMUTE_ROWS
  MS_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename IdT>
cudaError_t permute_typed(const PermuteParams& p, cudaStream_t stream) {
  const int64_t n = p.tokens * p.k;
  const IdT* ids = static_cast<const IdT*>(p.ids);
  size_t need = 0;
  MS_CUDA_TRY(permute_workspace_bytes(n, p.num_experts, &need));
  if (p.workspace_bytes < need) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);

  if (n <= kSmallN) {
    int32_t* order = reinterpret_cast<int32_t*>(ws);
    permute_small_index_kernel<IdT><<<1, kSmallThreads, 0, stream>>>(ids, static_cast<int>(n), p.num_experts, order,
                                                                     p.perm, p.offsets);
    MS_CUDA_LAUNCH_CHECK();
    return launch_rows(p, order, n, nullptr, nullptr, nullptr, stream);
  }

  const size_t seg = align_up(static_cast<size_t>(n) * 4);
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(ws);
  uint32_t* keys_out = reinterpret_cast<uint32_t*>(ws + seg);
  int32_t* vals_in = reinterpret_cast<int32_t*>(ws + 2 * seg);
  int32_t* vals_out = reinterpret_cast<int32_t*>(ws + 3 * seg);
  void* temp = ws + 4 * seg;
  size_t temp_bytes = p.workspace_bytes - 4 * seg;

  int64_t blocks = ceil_div(n, kThreads);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  permute_keys_kernel<IdT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ids, n, p.num_experts, keys_in,
                                                                                    vals_in);
  MS_CUDA_LAUNCH_CHECK();
  MS_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out,
                                              static_cast<int>(n), 0, key_bits(p.num_experts), stream));
  MS_CUDA_LAUNCH_CHECK();
  return launch_rows(p, vals_out, n, p.perm, keys_out, p.offsets, stream);
}

// ---- unpermute ------------------------------------------------------------------------------------
// One warp per token (grid-stride): y[t] = sum_s w[t, s] * y_sorted[perm[t, s]], slots in order,
// accumulated in acc; 16-byte accesses when VEC.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const T* __restrict__ y, const int64_t* __restrict__ perm, const acc_t<T>* __restrict__ w,
                     T* __restrict__ out, int64_t tokens, int k, int64_t rows, int64_t H) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t t = tid >> 5; t < tokens; t += nwarps) {
    const int64_t* prow = perm + t * k;
    const A* wrow = w != nullptr ? w + t * k : nullptr;
    T* orow = out + t * H;
    if constexpr (VEC) {
      constexpr int N = Vec<T>::N;
      const int64_t nv = H / N;
      for (int64_t c = lane; c < nv; c += 32) {
        A acc[N];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = A(0);
        for (int s = 0; s < k; ++s) {
          const int64_t r = prow[s];
          if (r < 0 || r >= rows) continue;
          const Vec<T> v = load_vec(y + r * H + c * N);
          if (wrow != nullptr) {
            const A ws = wrow[s];
#pragma unroll
            for (int i = 0; i < N; ++i) acc[i] += to_acc(v.v[i]) * ws;
          } else {
#pragma unroll
            for (int i = 0; i < N; ++i) acc[i] += to_acc(v.v[i]);
          }
        }
        Vec<T> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(acc[i]);
        store_vec(orow + c * N, o);
      }
    } else {
      for (int64_t h = lane; h < H; h += 32) {
        A acc = A(0);
        for (int s = 0; s < k; ++s) {
          const int64_t r = prow[s];
          if (r < 0 || r >= rows) continue;
          const A v = to_acc(y[r * H + h]);
          acc += wrow != nullptr ? v * wrow[s] : v;
        }
        orow[h] = from_acc<T>(acc);
      }
    }
  }
}

// inverse[r] = the flat (token, slot) index f with perm[f] == r; -1 (memset) where none. With a
// permutation every row has at most one; should perm repeat a row, the largest f wins (deterministic).
__global__ void __launch_bounds__(kThreads)
    inverse_perm_kernel(const int64_t* __restrict__ perm, int64_t n, int64_t rows, int32_t* __restrict__ inverse) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < n; f += stride) {
    const int64_t r = perm[f];
    if (r >= 0 && r < rows) atomicMax(inverse + r, static_cast<int32_t>(f));
  }
}

// One warp per row r of grad_y_sorted (grid-stride), so every row is written: rows no (token, slot)
// maps to become zero. grad_y_sorted[r] = w_f * grad_y[f / k]; grad_weights[f] = <grad_y[f / k],
// y_sorted[r]> (lane partials in order, then a butterfly: deterministic).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_backward_kernel(const T* __restrict__ gy, const T* __restrict__ y, const int32_t* __restrict__ inverse,
                              const acc_t<T>* __restrict__ w, int64_t rows, int k, int64_t H, T* __restrict__ gys,
                              acc_t<T>* __restrict__ gw) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = tid >> 5; r < rows; r += nwarps) {
    const int64_t f = inverse[r];  // uniform across the warp
    T* drow = gys + r * H;
    if (f < 0) {
      if constexpr (VEC) {
        constexpr int N = Vec<T>::N;
        Vec<T> zero;
#pragma unroll
        for (int i = 0; i < N; ++i) zero.v[i] = from_acc<T>(A(0));
        for (int64_t c = lane; c < H / N; c += 32) store_vec(drow + c * N, zero);
      } else {
        for (int64_t h = lane; h < H; h += 32) drow[h] = from_acc<T>(A(0));
      }
      continue;
    }
    const int64_t t = f / k;
    const A ws = w != nullptr ? w[f] : A(1);
    const T* grow = gy + t * H;
    const T* yrow = y + r * H;
    A dot = A(0);
    if constexpr (VEC) {
      constexpr int N = Vec<T>::N;
      const int64_t nv = H / N;
      for (int64_t c = lane; c < nv; c += 32) {
        const Vec<T> g = load_vec(grow + c * N);
        Vec<T> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(to_acc(g.v[i]) * ws);
        store_vec(drow + c * N, o);
        if (gw != nullptr) {
          const Vec<T> yv = load_vec(yrow + c * N);
#pragma unroll
          for (int i = 0; i < N; ++i) dot += to_acc(g.v[i]) * to_acc(yv.v[i]);
        }
      }
    } else {
      for (int64_t h = lane; h < H; h += 32) {
        const A g = to_acc(grow[h]);
        drow[h] = from_acc<T>(g * ws);
        if (gw != nullptr) dot += g * to_acc(yrow[h]);
      }
    }
    if (gw != nullptr) {
      dot = warp_sum(dot);
      if (lane == 0) gw[f] = dot;
    }
  }
}

template <typename T>
bool use_vec(int64_t H, const void* a, const void* b, const void* c = nullptr) {
  return (H * static_cast<int64_t>(sizeof(T))) % 16 == 0 && is_aligned16(a) && is_aligned16(b) &&
         (c == nullptr || is_aligned16(c));
}

unsigned warp_grid(int64_t items) {
  int64_t blocks = ceil_div(items, kWarpsPerBlock);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace

cudaError_t permute_workspace_bytes(int64_t n, int64_t num_experts, size_t* bytes) {
  *bytes = 0;
  if (n <= 0) return cudaSuccess;
  if (n <= kSmallN) {
    *bytes = align_up(static_cast<size_t>(n) * 4);
    return cudaSuccess;
  }
  size_t temp = 0;
  MS_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const uint32_t*>(nullptr),
                                              static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
                                              key_bits(num_experts)));
  *bytes = 4 * align_up(static_cast<size_t>(n) * 4) + temp;
  return cudaSuccess;
}

cudaError_t permute_launch(const PermuteParams& p, cudaStream_t stream) {
  const int64_t n = p.tokens * p.k;
  if (p.num_experts <= 0) return cudaErrorInvalidValue;
  if (n <= 0) {
    MS_CUDA_TRY(cudaMemsetAsync(p.offsets, 0, static_cast<size_t>(p.num_experts) * sizeof(int64_t), stream));
    return cudaSuccess;
  }
  return p.ids_int64 ? permute_typed<int64_t>(p, stream) : permute_typed<int32_t>(p, stream);
}

cudaError_t unpermute_launch(const UnpermuteParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.hidden == 0) return cudaSuccess;
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const T* y = static_cast<const T*>(p.y_sorted);
    T* out = static_cast<T*>(p.out);
    const A* w = static_cast<const A*>(p.weights);
    if (use_vec<T>(p.hidden, y, out)) {
      unpermute_kernel<T, true><<<warp_grid(p.tokens), kThreads, 0, stream>>>(y, p.perm, w, out, p.tokens,
                                                                               static_cast<int>(p.k), p.rows, p.hidden);
    } else {
      unpermute_kernel<T, false><<<warp_grid(p.tokens), kThreads, 0, stream>>>(
          y, p.perm, w, out, p.tokens, static_cast<int>(p.k), p.rows, p.hidden);
    }
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t unpermute_backward_launch(const UnpermuteBackwardParams& p, cudaStream_t stream) {
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const int64_t n = p.tokens * p.k;
    A* gw = static_cast<A*>(p.grad_weights);
    // (token, slot) pairs whose perm entry is out of range get no dot product: they stay 0
    if (gw != nullptr && n > 0) MS_CUDA_TRY(cudaMemsetAsync(gw, 0, static_cast<size_t>(n) * sizeof(A), stream));
    if (p.rows == 0) return cudaSuccess;
    MS_CUDA_TRY(cudaMemsetAsync(p.inverse, 0xff, static_cast<size_t>(p.rows) * sizeof(int32_t), stream));
    if (n > 0) {
      int64_t blocks = ceil_div(n, kThreads);
      if (blocks > kMaxBlocks) blocks = kMaxBlocks;
      inverse_perm_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p.perm, n, p.rows, p.inverse);
      MS_CUDA_LAUNCH_CHECK();
    }
    if (p.hidden == 0) return cudaSuccess;
    const T* gy = static_cast<const T*>(p.grad_y);
    const T* y = static_cast<const T*>(p.y_sorted);
    T* gys = static_cast<T*>(p.grad_y_sorted);
    const A* w = static_cast<const A*>(p.weights);
    const int k = static_cast<int>(p.k);
    if (use_vec<T>(p.hidden, gy, gys, gw != nullptr ? y : nullptr)) {
      unpermute_backward_kernel<T, true><<<warp_grid(p.rows), kThreads, 0, stream>>>(gy, y, p.inverse, w, p.rows, k,
                                                                                      p.hidden, gys, gw);
    } else {
      unpermute_backward_kernel<T, false><<<warp_grid(p.rows), kThreads, 0, stream>>>(gy, y, p.inverse, w, p.rows,
                                                                                       k, p.hidden, gys, gw);
    }
    MS_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace moestream
