// Gated activation CUDA kernels (forward and backward): swiglu, geglu (erf), gptoss; gate/up as
// two halves ("concat") or alternating ("interleaved"). Elementwise, math in float32 (float64 for
// float64). Rows are spread over blockDim.y and a grid-stride loop, the row's elements over
// blockDim.x; when the half-row is a multiple of 16 bytes and the pointers are 16-byte aligned each
// thread moves 16 bytes per access (8 bf16 / fp16), otherwise one element.
#include "activation/activation_cuda.h"
#include "common/cuda_utils.cuh"

namespace moestream {
namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int kSwiglu = static_cast<int>(ActKind::kSwiglu);
constexpr int kGeglu = static_cast<int>(ActKind::kGeglu);

template <typename A>
__device__ __forceinline__ A clamp_max(A v, A hi) {  // NaN stays NaN, like torch.clamp
  return v > hi ? hi : v;
}
template <typename A>
__device__ __forceinline__ A clamp_both(A v, A lo, A hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename A>
__device__ __forceinline__ A gelu_cdf(A g) {
  return A(0.5) * (A(1) + ms_erf(g * A(0.70710678118654752440)));
}

template <int KIND, typename A>
__device__ __forceinline__ A act_fwd(A g, A u, A alpha, A limit) {
  if constexpr (KIND == kSwiglu) {
    return g * ms_sigmoid(g) * u;
  } else if constexpr (KIND == kGeglu) {
    return g * gelu_cdf(g) * u;
  } else {
    const A gc = clamp_max(g, limit);
    const A uc = clamp_both(u, -limit, limit);
    return gc * ms_sigmoid(gc * alpha) * (uc + A(1));
  }
}

// Clamp gradients pass where min <= x <= max (torch.clamp's backward).
template <int KIND, typename A>
__device__ __forceinline__ void act_bwd(A g, A u, A dy, A alpha, A limit, A& dg, A& du) {
  if constexpr (KIND == kSwiglu) {
    const A s = ms_sigmoid(g);
    dg = dy * u * (s * (A(1) + g * (A(1) - s)));
    du = dy * (g * s);
  } else if constexpr (KIND == kGeglu) {
    const A cdf = gelu_cdf(g);
    const A pdf = ms_exp(A(-0.5) * g * g) * A(0.39894228040143267794);
    dg = dy * u * (cdf + g * pdf);
    du = dy * (g * cdf);
  } else {
    const A gc = clamp_max(g, limit);
    const A uc = clamp_both(u, -limit, limit);
    const A s = ms_sigmoid(gc * alpha);
    const A dgc = dy * (uc + A(1)) * (s + alpha * gc * s * (A(1) - s));
    dg = g <= limit ? dgc : A(0);
    du = (u >= -limit && u <= limit) ? dy * (gc * s) : A(0);
  }
}

// gate/up values of the N outputs c*N .. c*N+N-1 of row xr (vector path)
template <typename T, bool INTER>
__device__ __forceinline__ void load_gate_up(const T* xr, int64_t I, int64_t c, acc_t<T>* g, acc_t<T>* u) {
  constexpr int N = Vec<T>::N;
  if constexpr (INTER) {
    const Vec<T> a = load_vec(xr + 2 * c * N);
    const Vec<T> b = load_vec(xr + 2 * c * N + N);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      g[i] = to_acc(a.v[2 * i]);
      u[i] = to_acc(a.v[2 * i + 1]);
      g[i + N / 2] = to_acc(b.v[2 * i]);
      u[i + N / 2] = to_acc(b.v[2 * i + 1]);
    }
  } else {
    const Vec<T> a = load_vec(xr + c * N);
    const Vec<T> b = load_vec(xr + I + c * N);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      g[i] = to_acc(a.v[i]);
      u[i] = to_acc(b.v[i]);
    }
  }
}

template <typename T, int KIND, bool INTER, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gated_act_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t R, int64_t I, acc_t<T> alpha,
                         acc_t<T> limit) {
  using A = acc_t<T>;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < R; r += row_stride) {
    const T* xr = x + r * 2 * I;
    T* orow = out + r * I;
    if constexpr (VEC) {
      constexpr int N = Vec<T>::N;
      const int64_t nv = I / N;
      for (int64_t c = threadIdx.x; c < nv; c += blockDim.x) {
        A g[N], u[N];
        load_gate_up<T, INTER>(xr, I, c, g, u);
        Vec<T> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(act_fwd<KIND>(g[i], u[i], alpha, limit));
        store_vec(orow + c * N, o);
      }
    } else {
      for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
        const A g = to_acc(xr[INTER ? 2 * i : i]);
        const A u = to_acc(xr[INTER ? 2 * i + 1 : I + i]);
        orow[i] = from_acc<T>(act_fwd<KIND>(g, u, alpha, limit));
      }
    }
  }
}

template <typename T, int KIND, bool INTER, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gated_act_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gx, int64_t R, int64_t I,
                         acc_t<T> alpha, acc_t<T> limit) {
  using A = acc_t<T>;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < R; r += row_stride) {
    const T* xr = x + r * 2 * I;
    const T* grow = grad + r * I;
    T* gxr = gx + r * 2 * I;
    if constexpr (VEC) {
      constexpr int N = Vec<T>::N;
      const int64_t nv = I / N;
      for (int64_t c = threadIdx.x; c < nv; c += blockDim.x) {
        A g[N], u[N];
        load_gate_up<T, INTER>(xr, I, c, g, u);
        const Vec<T> dy = load_vec(grow + c * N);
        A dg[N], du[N];
#pragma unroll
        for (int i = 0; i < N; ++i) act_bwd<KIND>(g[i], u[i], to_acc(dy.v[i]), alpha, limit, dg[i], du[i]);
        Vec<T> a, b;
        if constexpr (INTER) {
#pragma unroll
          for (int i = 0; i < N / 2; ++i) {
            a.v[2 * i] = from_acc<T>(dg[i]);
            a.v[2 * i + 1] = from_acc<T>(du[i]);
            b.v[2 * i] = from_acc<T>(dg[i + N / 2]);
            b.v[2 * i + 1] = from_acc<T>(du[i + N / 2]);
          }
          store_vec(gxr + 2 * c * N, a);
          store_vec(gxr + 2 * c * N + N, b);
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) {
            a.v[i] = from_acc<T>(dg[i]);
            b.v[i] = from_acc<T>(du[i]);
          }
          store_vec(gxr + c * N, a);
          store_vec(gxr + I + c * N, b);
        }
      }
    } else {
      for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
        const int64_t gi = INTER ? 2 * i : i;
        const int64_t ui = INTER ? 2 * i + 1 : I + i;
        A dg, du;
        act_bwd<KIND>(to_acc(xr[gi]), to_acc(xr[ui]), to_acc(grow[i]), alpha, limit, dg, du);
        gxr[gi] = from_acc<T>(dg);
        gxr[ui] = from_acc<T>(du);
      }
    }
  }
}

// Threads along a row: the smallest power of two >= the row's work units, from 32 to kThreads;
// the rest of the block takes further rows.
struct Shape {
  dim3 grid, block;
};
Shape launch_shape(int64_t rows, int64_t units) {
  int tx = 32;
  while (tx < kThreads && tx < units) tx *= 2;
  const int ty = kThreads / tx;
  int64_t blocks = ceil_div(rows, ty);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

template <typename T>
bool use_vec(int64_t I, const void* a, const void* b, const void* c = nullptr) {
  return (I * static_cast<int64_t>(sizeof(T))) % 16 == 0 && is_aligned16(a) && is_aligned16(b) &&
         (c == nullptr || is_aligned16(c));
}

// Calls f(std::integral_constant<int, KIND>, std::bool_constant<INTER>, std::bool_constant<VEC>).
template <typename F>
cudaError_t dispatch_act(ActKind kind, bool inter, bool vec, F&& f) {
  auto with_kind = [&](auto kc) -> cudaError_t {
    if (inter) {
      return vec ? f(kc, std::true_type{}, std::true_type{}) : f(kc, std::true_type{}, std::false_type{});
    }
    return vec ? f(kc, std::false_type{}, std::true_type{}) : f(kc, std::false_type{}, std::false_type{});
  };
  switch (kind) {
    case ActKind::kSwiglu:
      return with_kind(std::integral_constant<int, kSwiglu>{});
    case ActKind::kGeglu:
      return with_kind(std::integral_constant<int, kGeglu>{});
    case ActKind::kGptoss:
      return with_kind(std::integral_constant<int, static_cast<int>(ActKind::kGptoss)>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gated_activation_launch(const GatedActParams& p, void* out_ptr, cudaStream_t stream) {
  if (p.rows == 0 || p.inter == 0) return cudaSuccess;
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(out_ptr);
    const bool vec = use_vec<T>(p.inter, x, out);
    const Shape sh = launch_shape(p.rows, vec ? p.inter / Vec<T>::N : p.inter);
    return dispatch_act(p.kind, p.interleaved, vec, [&](auto kc, auto ic, auto vc) -> cudaError_t {
      gated_act_fwd_kernel<T, decltype(kc)::value, decltype(ic)::value, decltype(vc)::value>
          <<<sh.grid, sh.block, 0, stream>>>(x, out, p.rows, p.inter, static_cast<A>(p.alpha), static_cast<A>(p.limit));
      MS_CUDA_LAUNCH_CHECK();
      return cudaSuccess;
    });
  });
}

cudaError_t gated_activation_backward_launch(const GatedActParams& p, const void* grad_ptr, void* grad_x_ptr,
                                             cudaStream_t stream) {
  if (p.rows == 0 || p.inter == 0) return cudaSuccess;
  return dispatch_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const T* grad = static_cast<const T*>(grad_ptr);
    const T* x = static_cast<const T*>(p.x);
    T* gx = static_cast<T*>(grad_x_ptr);
    const bool vec = use_vec<T>(p.inter, grad, x, gx);
    const Shape sh = launch_shape(p.rows, vec ? p.inter / Vec<T>::N : p.inter);
    return dispatch_act(p.kind, p.interleaved, vec, [&](auto kc, auto ic, auto vc) -> cudaError_t {
      gated_act_bwd_kernel<T, decltype(kc)::value, decltype(ic)::value, decltype(vc)::value>
          <<<sh.grid, sh.block, 0, stream>>>(grad, x, gx, p.rows, p.inter, static_cast<A>(p.alpha),
                                             static_cast<A>(p.limit));
      MS_CUDA_LAUNCH_CHECK();
      return cudaSuccess;
    });
  });
}

}  // namespace moestream
