// The Autograd kernels of moestream::qgrouped_mm and moestream::qlinear (inference only). Without a
// gradient to track they go straight to the device kernel, so a decode step pays no Python
// autograd layer per call; when an input requires a gradient the result is attached to a node
// whose backward raises: the forward still works (a model called without torch.no_grad()), and
// asking for a gradient says why there is none.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <utility>

namespace moestream {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct InferenceOnly : public torch::autograd::Function<InferenceOnly> {
  template <typename Run>
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias,
                            const std::string& op, Run&& run) {
    ctx->saved_data["op"] = op;
    return run();
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "moestream.", ctx->saved_data["op"].toStringRef(),
                " is inference only: compressed weights have no backward (train on the full-precision model, "
                "then quantize it)");
  }
};

bool needs_grad(const at::Tensor& a, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                const c10::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  return a.requires_grad() || scale.requires_grad() || (zero.has_value() && zero->requires_grad()) ||
         (bias.has_value() && bias->requires_grad());
}

template <typename Run>
at::Tensor with_autograd(const char* op, const at::Tensor& a, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, Run&& run) {
  auto below = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return run();
  };
  if (!needs_grad(a, scale, zero, bias)) return below();
  return InferenceOnly::apply(a, c10::optional<at::Tensor>(scale), zero, bias, std::string(op), below);
}

at::Tensor qgrouped_mm_autograd(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& zero, const at::Tensor& offsets, int64_t bits,
                                int64_t group_size, const c10::optional<at::Tensor>& bias,
                                c10::string_view activations) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moestream::qgrouped_mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t,
                                         const c10::optional<at::Tensor>&, c10::string_view)>();
  return with_autograd("qgrouped_mm", a, scale, zero, bias, [&] {
    return op.call(a, qweight, scale, zero, offsets, bits, group_size, bias, activations);
  });
}

at::Tensor qlinear_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                            const c10::optional<at::Tensor>& bias, c10::string_view activations) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moestream::qlinear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, int64_t, int64_t,
                                         const c10::optional<at::Tensor>&, c10::string_view)>();
  return with_autograd("qlinear", x, scale, zero, bias, [&] {
    return op.call(x, qweight, scale, zero, bits, group_size, bias, activations);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moestream, Autograd, m) {
  m.impl("qgrouped_mm", &qgrouped_mm_autograd);
  m.impl("qlinear", &qlinear_autograd);
}

}  // namespace moestream
