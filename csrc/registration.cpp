// Every moestream operator schema, in one place. Kernels register implementations with
// TORCH_LIBRARY_IMPL(moestream, <backend>, m) next to their code; autograd and fake (meta)
// kernels are registered from python/moestream/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moestream, m) {
  // ---- router -------------------------------------------------------------------------------
  // logits [T, E] (any float dtype) -> weights [T, k] float32, ids [T, k] int64.
  // score: "softmax" | "sigmoid". topk_first: select on raw logits (+bias), then score over the k.
  // bias [E] (optional): added to the scores for selection only (DeepSeek-V3 correction bias).
  // num_groups/topk_groups: group-limited selection, groups ranked by the sum of their top-2.
  m.def(
      "router_topk(Tensor logits, int k, str score, bool topk_first, Tensor? bias, int num_groups, "
      "int topk_groups, bool normalize, float scale) -> (Tensor weights, Tensor ids)");
  // grad_weights [T, k] -> grad_logits [T, E] in logits' dtype (selection is not differentiated).
  m.def(
      "router_topk_backward(Tensor grad_weights, Tensor logits, Tensor ids, str score, bool topk_first, "
      "bool normalize, float scale) -> Tensor");
  // Switch-Transformer load-balancing loss: E * sum_e f_e * P_e, f_e = share of (token, slot)
  // assignments to e, P_e = mean softmax probability of e. mask [T] (optional) weights tokens.
  m.def("router_aux_loss(Tensor logits, Tensor ids, Tensor? mask) -> Tensor");
  m.def("router_aux_loss_backward(Tensor grad, Tensor logits, Tensor ids, Tensor? mask) -> Tensor");
  // ST-MoE router z-loss: mean_t logsumexp(logits_t)^2.
  m.def("router_z_loss(Tensor logits) -> Tensor");
  m.def("router_z_loss_backward(Tensor grad, Tensor logits) -> Tensor");

  // ---- permute ------------------------------------------------------------------------------
  // x [T, H], ids [T, k] (int32 | int64) -> x_sorted [T*k, H] rows in (expert, token, slot) order,
  // perm [T, k] int64 (row of x_sorted that holds token t's slot s), offsets [E] int64 cumulative ends.
  m.def("permute(Tensor x, Tensor ids, int num_experts) -> (Tensor x_sorted, Tensor perm, Tensor offsets)");
  // y_sorted [N, H], perm [T, k], weights [T, k] (optional) -> y [T, H],
  // y[t] = sum_s weights[t, s] * y_sorted[perm[t, s]] (slots summed in order, float32 accumulation).
  m.def("unpermute(Tensor y_sorted, Tensor perm, Tensor? weights) -> Tensor");
  // -> grad_y_sorted [N, H] (rows not referenced by perm are zero), grad_weights [T, k] float32
  //    (empty when weights is None or needs_weights_grad is false).
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor perm, Tensor? weights, "
      "bool needs_weights_grad) -> (Tensor, Tensor)");

  // ---- grouped matmul -----------------------------------------------------------------------
  // a [M, K] rows sorted by group, b [E, K, N] (or [E, N, K] if transpose_b), offsets [E]
  // (int32 | int64) cumulative ends, bias [E, N] optional -> out [M, N]; rows past offsets[-1] are 0.
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets, bool transpose_b, Tensor? bias) -> Tensor");
  // a [M, K], grad_out [M, N] -> grad_b in b's layout: [E, K, N] (a_g^T dy_g) or [E, N, K] (dy_g^T a_g).
  m.def("grouped_mm_weight_grad(Tensor a, Tensor grad_out, Tensor offsets, bool transpose_b) -> Tensor");
  // grad_out [M, N] -> grad_bias [E, N] (per-group row sums).
  m.def("grouped_bias_grad(Tensor grad_out, Tensor offsets) -> Tensor");

  // ---- gated activation ---------------------------------------------------------------------
  // x [..., 2I] -> [..., I]. kind: "swiglu" | "geglu" | "gptoss"; layout: "concat" | "interleaved".
  // alpha/limit are used by "gptoss" only: gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(+-limit) + 1).
  m.def("gated_activation(Tensor x, str kind, str layout, float alpha, float limit) -> Tensor");
  m.def("gated_activation_backward(Tensor grad, Tensor x, str kind, str layout, float alpha, float limit) -> Tensor");

  // ---- whole expert path (inference; training composes the ops above) ----------------------
  // x [T, H], ids [T, k], weights [T, k], w_gate_up [E, H, 2I] ([E, 2I, H] if transpose_b),
  // w_down [E, I, H] ([E, H, I] if transpose_b), b_gate_up [E, 2I], b_down [E, H] -> out [T, H].
  m.def(
      "moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor w_gate_up, Tensor w_down, Tensor? b_gate_up, "
      "Tensor? b_down, str kind, str layout, bool transpose_b, float alpha, float limit) -> Tensor");

  // ---- compressed weights (inference only: no backward) ---------------------------------------
  // The packed group-wise format of python/moestream/quant.py: codes uint8 (int8: [.., N, K]; int4:
  // [.., N, K/2], two per byte), scale float32 [.., N, K/group_size], zero (asymmetric) like scale.
  // a [M, K] rows sorted by group, qweight [E, N, K*bits/8], offsets [E] (int32 | int64) cumulative
  // ends, bias [E, N] optional -> out [M, N] = a_g @ W_g^T per group, in a's dtype; rows past
  // offsets[-1] are 0 (grouped_mm with transpose_b).
  m.def(
      "qgrouped_mm(Tensor a, Tensor qweight, Tensor scale, Tensor? zero, Tensor offsets, int bits, int group_size, "
      "Tensor? bias, str activations=\"auto\") -> Tensor");
  // x [M, K], qweight [N, K*bits/8], scale/zero [N, K/group_size], bias [N] optional -> x @ W^T [M, N].
  // activations: "auto" | "int8" | "float" (how the CPU kernels treat a: quant/quant_cpu.cpp)
  m.def(
      "qlinear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int bits, int group_size, Tensor? bias, "
      "str activations=\"auto\") -> Tensor");
}
