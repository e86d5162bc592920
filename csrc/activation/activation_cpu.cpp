// CPU kernels of gated_activation and gated_activation_backward: one pass over the rows, float32
// math (float64 for float64), parallel over rows, AVX2 inner loops where the CPU has them.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "activation/activation_checks.h"
#include "activation/gated_activation_cpu.h"
#include "common/checks.h"
#include "common/cpu_memory.h"

namespace moestream {
namespace {

// Rows per parallel chunk: about 16K elements of work each, so small inputs stay on one thread.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len)); }

// Points g / u at the gate and up values of one row of x (2n values) in the accumulation type,
// converting / de-interleaving into the scratch buffers only when needed.
template <typename scalar_t>
void load_gate_up(const scalar_t* xr, int64_t n, ActLayout layout, acc_t<scalar_t>* gbuf, acc_t<scalar_t>* ubuf,
                  acc_t<scalar_t>* tmp, const acc_t<scalar_t>** g, const acc_t<scalar_t>** u) {
  using acc = acc_t<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc>;
  if (layout == ActLayout::kConcat) {
    if constexpr (same) {
      *g = reinterpret_cast<const acc*>(xr);
      *u = reinterpret_cast<const acc*>(xr) + n;
      return;
    } else {
      cpu::to_acc_fast(xr, gbuf, n);
      cpu::to_acc_fast(xr + n, ubuf, n);
    }
  } else {
    const acc* src;
    if constexpr (same) {
      src = reinterpret_cast<const acc*>(xr);
    } else {
      cpu::to_acc_fast(xr, tmp, 2 * n);
      src = tmp;
    }
    cpu::deinterleave(src, gbuf, ubuf, n);
  }
  *g = gbuf;
  *u = ubuf;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, int64_t rows, int64_t n, ActKind kind, ActLayout layout,
                    double alpha, double limit) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t r0, int64_t r1) {
    std::vector<acc> buf(5 * n);
    acc *gbuf = buf.data(), *ubuf = gbuf + n, *obuf = ubuf + n, *tmp = obuf + n;
    for (int64_t r = r0; r < r1; ++r) {
      const acc *g, *u;
      load_gate_up(x + r * 2 * n, n, layout, gbuf, ubuf, tmp, &g, &u);
      if constexpr (std::is_same_v<scalar_t, acc>) {
        cpu::act_fwd(kind, n, g, u, out + r * n, acc(alpha), acc(limit));
      } else {
        cpu::act_fwd(kind, n, g, u, obuf, acc(alpha), acc(limit));
        cpu::from_acc_fast(obuf, out + r * n, n);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* x, scalar_t* gx, int64_t rows, int64_t n, ActKind kind,
                     ActLayout layout, double alpha, double limit) {
  using acc = acc_t<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc>;
  at::parallel_for(0, rows, row_grain(3 * n), [&](int64_t r0, int64_t r1) {
    std::vector<acc> buf(8 * n);
    acc *gbuf = buf.data(), *ubuf = gbuf + n, *dybuf = ubuf + n, *dg = dybuf + n, *du = dg + n, *tmp = du + n;
    for (int64_t r = r0; r < r1; ++r) {
      const acc *g, *u, *dy;
      load_gate_up(x + r * 2 * n, n, layout, gbuf, ubuf, tmp, &g, &u);
      if constexpr (same) {
        dy = grad + r * n;
      } else {
        cpu::to_acc_fast(grad + r * n, dybuf, n);
        dy = dybuf;
      }
      scalar_t* gxr = gx + r * 2 * n;
      if (layout == ActLayout::kConcat) {
        if constexpr (same) {
          cpu::act_bwd(kind, n, g, u, dy, gxr, gxr + n, acc(alpha), acc(limit));
        } else {
          cpu::act_bwd(kind, n, g, u, dy, dg, du, acc(alpha), acc(limit));
          cpu::from_acc_fast(dg, gxr, n);
          cpu::from_acc_fast(du, gxr + n, n);
        }
      } else {
        cpu::act_bwd(kind, n, g, u, dy, dg, du, acc(alpha), acc(limit));
        if constexpr (same) {
          cpu::interleave(dg, du, gxr, n);
        } else {
          cpu::interleave(dg, du, tmp, n);
          cpu::from_acc_fast(tmp, gxr, 2 * n);
        }
      }
    }
  });
}

// x [..., 2I] (any float dtype) -> out [..., I] in x's dtype.
at::Tensor gated_activation_cpu(const at::Tensor& x, c10::string_view kind, c10::string_view layout, double alpha,
                                double limit) {
  const GatedActArgs g = check_gated_activation_args(x, kind, layout);
  at::Tensor out = cpu::empty_large(g.out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  MS_DISPATCH_FLOATS(x.scalar_type(), "gated_activation_cpu", [&] {
    forward_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g.rows, g.I, g.kind,
                             g.layout, alpha, limit);
  });
  return out;
}

// grad [..., I], x [..., 2I] -> grad_x [..., 2I] in x's dtype (grad is converted to x's dtype).
at::Tensor gated_activation_backward_cpu(const at::Tensor& grad, const at::Tensor& x, c10::string_view kind,
                                         c10::string_view layout, double alpha, double limit) {
  const GatedActArgs g = check_gated_activation_backward_args(grad, x, kind, layout);
  // x's strides, like the fake kernel (empty_like); computed contiguously, copied if they differ
  at::Tensor gx = x.is_contiguous() ? cpu::empty_large(x.sizes(), x.options()) : at::empty_like(x);
  if (gx.numel() == 0) return gx;
  at::Tensor gxc = gx.is_contiguous() ? gx : at::empty(x.sizes(), x.options());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous();
  MS_DISPATCH_FLOATS(x.scalar_type(), "gated_activation_backward_cpu", [&] {
    backward_kernel<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                              gxc.mutable_data_ptr<scalar_t>(), g.rows, g.I, g.kind, g.layout, alpha, limit);
  });
  if (!gxc.is_same(gx)) gx.copy_(gxc);
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, CPU, m) {
  m.impl("gated_activation", &gated_activation_cpu);
  m.impl("gated_activation_backward", &gated_activation_backward_cpu);
}

}  // namespace moestream
