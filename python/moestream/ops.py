"""The functional API: thin wrappers over ``torch.ops.moestream.*``.

Every op here is a dispatcher op with a CPU kernel (and a CUDA kernel when built with CUDA), a fake
kernel for FakeTensor / ``torch.compile`` and an autograd formula written with moestream's own ops.
Shapes use T tokens, k slots per token, E experts, H hidden, I expert intermediate size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C, pipeline
from ._op_checks import (  # noqa: F401 (ACTIVATIONS, KINDS, LAYOUTS, SCORES: part of ops' namespace)
    ACTIVATIONS,
    KINDS,
    LAYOUTS,
    SCORES,
    _check_activations,
    _check_experts_args,
    _check_gated_activation_args,
    _check_gated_activation_backward_args,
    _check_grouped_bias_grad_args,
    _check_grouped_mm_args,
    _check_grouped_mm_weight_grad_args,
    _check_permute_args,
    _check_router_aux_loss_args,
    _check_router_logits,
    _check_router_scalar_grad,
    _check_router_topk_args,
    _check_router_topk_backward_args,
    _check_unpermute_args,
    _check_unpermute_backward_args,
    _Checks,
)

__all__ = [
    "gated_activation",
    "grouped_mm",
    "moe_experts",
    "permute",
    "qgrouped_mm",
    "qlinear",
    "router_aux_loss",
    "router_topk",
    "router_z_loss",
    "unpermute",
]

# the forward wrappers call the ops' .default overloads: no overload resolution per call (~6 us)
_ops = torch.ops.moestream

#: every dispatcher op of the extension (csrc/registration.cpp)
OP_NAMES = (
    "router_topk",
    "router_topk_backward",
    "router_aux_loss",
    "router_aux_loss_backward",
    "router_z_loss",
    "router_z_loss_backward",
    "permute",
    "unpermute",
    "unpermute_backward",
    "grouped_mm",
    "grouped_mm_weight_grad",
    "grouped_bias_grad",
    "gated_activation",
    "gated_activation_backward",
    "moe_experts",
)


# ----------------------------------------------------------------------------------------------
# router


def router_topk(
    logits: Tensor,
    k: int,
    score: str = "softmax",
    topk_first: bool = False,
    bias: Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Fused router gating: logits [T, E] -> (weights [T, k] float32, ids [T, k] int64).

    Computes in float32 whatever the logits' dtype. Ties go to the lower expert id; ids are
    ordered by descending selection score.

    - ``score="softmax"``, ``topk_first=False``: softmax over E, then top-k (Mixtral, Qwen2/3-MoE,
      OLMoE; add ``normalize=True`` where the model renormalises).
    - ``score="sigmoid"`` with ``bias``, groups and ``normalize``/``scale``: DeepSeek-V3
      (bias [E] is added for selection only; groups are ranked by the sum of their top-2 scores;
      a k beyond the kept groups' experts continues with the dropped groups' experts, lowest ids
      first, with their real weights, like transformers).
    - ``topk_first=True``: top-k on the logits, then softmax over the k (GPT-OSS) or sigmoid (Llama 4).
    - ``normalize`` divides by (sum + 1e-20); ``scale`` multiplies the result (routed scaling factor).

    Differentiable with respect to ``logits`` (the selection itself is not).
    """
    return _ops.router_topk.default(
        logits, k, score, topk_first, bias, num_groups, topk_groups, normalize, scale
    )


def router_aux_loss(logits: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Load-balancing auxiliary loss (Switch Transformer; transformers' ``load_balancing_loss_func``).

    logits [T, E], ids [T, k] (the experts chosen), mask [T] optional token weights (1 = real token)
    -> float32 scalar E * sum_e f_e * P_e. Differentiable with respect to ``logits``."""
    return _ops.router_aux_loss.default(logits, ids, mask)


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, float32 scalar."""
    return _ops.router_z_loss.default(logits)


# ----------------------------------------------------------------------------------------------
# permute / unpermute


def permute(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token dispatch: x [T, H], ids [T, k] (int32 or int64) ->

    - x_sorted [T*k, H]: x's rows in (expert, token, slot) order;
    - perm [T, k] int64: the row of x_sorted holding token t's slot s;
    - offsets [E] int64: cumulative row ends per expert (offsets[-1] == T*k).

    On CUDA, ids are not range-checked without a host sync: out-of-range ids are dropped (placed
    past offsets[-1]); the tuning key ``check_inputs`` (:mod:`moestream._tuning`, initially
    ``MOESTREAM_CHECK_INPUTS=1`` in the environment) makes them raise as on the CPU.
    """
    return _ops.permute.default(x, ids, num_experts)


def unpermute(y_sorted: Tensor, perm: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted combine back to token order: y[t] = sum_s weights[t, s] * y_sorted[perm[t, s]].

    y_sorted [N, H], perm [T, k] from :func:`permute`, weights [T, k] (any float dtype, optional)
    -> y [T, H] in y_sorted's dtype; slots are summed in order with float32 accumulation."""
    return _ops.unpermute.default(y_sorted, perm, weights)


# ----------------------------------------------------------------------------------------------
# grouped matmul


def grouped_mm(
    a: Tensor, b: Tensor, offsets: Tensor, transpose_b: bool = False, bias: Tensor | None = None
) -> Tensor:
    """Grouped matmul: a [M, K] with rows sorted by group, b [E, K, N] ([E, N, K] with
    ``transpose_b``, the layout of transformers' fused experts), offsets [E] cumulative row ends
    (int32 or int64), bias [E, N] optional -> out [M, N]. Rows past offsets[-1] are zero.

    On CUDA the offsets' values are not checked (that would need a host sync): bad offsets give
    wrong groups but never out-of-bounds accesses. The tuning key ``check_inputs``
    (:mod:`moestream._tuning`, initially ``MOESTREAM_CHECK_INPUTS=1`` in the environment) validates them."""
    return _ops.grouped_mm.default(a, b, offsets, transpose_b, bias)


# ----------------------------------------------------------------------------------------------
# gated activation


def gated_activation(
    x: Tensor, kind: str = "swiglu", layout: str = "concat", alpha: float = 1.702, limit: float = 7.0
) -> Tensor:
    """Fused gated activation: x [..., 2I] -> [..., I].

    kind: ``swiglu`` silu(gate)*up, ``geglu`` gelu(gate)*up (erf form), ``gptoss`` GPT-OSS's
    clamp(gate, max=limit) * sigmoid(alpha*gate) * (clamp(up, -limit, limit) + 1).
    layout: ``concat`` ([gate | up] halves) or ``interleaved`` (gate0, up0, gate1, up1, ...)."""
    return _ops.gated_activation.default(x, kind, layout, alpha, limit)


# ----------------------------------------------------------------------------------------------
# whole expert path


def moe_experts(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    kind: str = "swiglu",
    layout: str = "concat",
    transpose_b: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """The whole expert path: permute -> grouped_mm -> gated activation -> grouped_mm -> weighted
    unpermute (:mod:`moestream.pipeline`).

    x [T, H], ids [T, k], weights [T, k]; w_gate_up [E, H, 2I] and w_down [E, I, H]
    (with ``transpose_b``: [E, 2I, H] and [E, H, I], transformers' layout); optional biases
    b_gate_up [E, 2I], b_down [E, H] (GPT-OSS) -> out [T, H] in x's dtype.

    What runs:

    - no gradient needed, CPU: one fused native kernel (no [T*k, 2I] intermediate in memory);
    - no gradient needed, CUDA: ``torch.ops.moestream.moe_experts``, which on CUDA is not fused: it
      runs the pipeline on the CUDA kernels of permute, grouped_mm, gated_activation and unpermute
      (intermediates materialised; no host synchronisation);
    - gradients needed (any device): the same pipeline on the individual ops, each saving what its
      backward needs, so nothing is recomputed.

    I = 0 always takes the composed path (each routed slot then contributes its b_down)."""
    if (
        _needs_grad(x, weights, w_gate_up, w_down, b_gate_up, b_down)
        or w_down.shape[2 if transpose_b else 1] == 0
    ):
        return _moe_experts_composite(
            x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b, alpha, limit
        )
    return _ops.moe_experts.default(
        x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b, alpha, limit
    )


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


#: moestream's ops as the pipeline's op set; differentiable through their registered backwards.
OPS = pipeline.ExpertOps(permute, grouped_mm, gated_activation, unpermute)


def _moe_experts_composite(
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb, alpha, limit
):
    _check_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb)
    return pipeline.moe_experts(
        OPS, x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb, alpha, limit
    )


# ----------------------------------------------------------------------------------------------
# compressed weights (moestream.quant's packed format; inference only)


def qgrouped_mm(
    a: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    offsets: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    activations: str = "auto",
) -> Tensor:
    """Grouped matmul on compressed weights: a [M, K] (float32, bfloat16 or float16) with rows
    sorted by group, packed weights qweight uint8 [E, N, K] (int8) or [E, N, K/2] (int4), scale
    float32 [E, N, K/group_size], zero (asymmetric) like scale or None, offsets [E] cumulative row
    ends (grouped_mm's convention), bias [E, N] optional -> out [M, N] = a_g @ W_g^T in a's dtype,
    rows past offsets[-1] zero. ``grouped_mm(a, dequantize(...), offsets, transpose_b=True, bias)``
    without materialising the dequantised weights (see :mod:`moestream.quant` for the format).

    ``activations`` (CPU): ``"float"`` uses a as it is (weight-only); ``"int8"`` quantizes a per
    row and weight group to int8 (scale max|a| / 127) and multiplies in int32 (AVX-512 VNNI; the
    result is ``dequantize(W) @ dequantized int8 a``, about 0.5% from the exact product); ``"auto"``
    is int8 for bfloat16 / float16 a and float for float32 a. Where the CPU has no AVX-512 VNNI,
    int8 runs the float kernels.

    Inference only: asking for a gradient raises. On CPU a native kernel; on other devices (no
    kernel yet) the weights of the call are dequantised and :func:`grouped_mm` runs (unverified on
    CUDA; ``activations`` has no effect there)."""
    if a.device.type != "cpu":
        _check_activations("qgrouped_mm", activations)
        from .quant import dequantize

        w = dequantize(qweight, scale, zero, bits, group_size, a.dtype)
        return grouped_mm(a, w, offsets, True, bias)
    return _ops.qgrouped_mm.default(a, qweight, scale, zero, offsets, bits, group_size, bias, activations)


def qlinear(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    activations: str = "auto",
) -> Tensor:
    """``F.linear(x, W, bias)`` on a compressed weight W [N, K]: x [..., K] -> [..., N] in x's dtype;
    qweight uint8 [N, K] (int8) or [N, K/2] (int4), scale / zero float32 [N, K/group_size], bias [N];
    ``activations`` as in :func:`qgrouped_mm`. Inference only; on other devices than the CPU the
    weight is dequantised first (unverified)."""
    if x.device.type != "cpu":
        _check_activations("qlinear", activations)
        from .quant import dequantize

        w = dequantize(qweight, scale, zero, bits, group_size, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    lead = x.shape[:-1]
    out = _ops.qlinear.default(
        x.reshape(-1, x.shape[-1]), qweight, scale, zero, bits, group_size, bias, activations
    )
    return out.view(*lead, out.shape[-1])


def _qgrouped_mm_packed(a: Tensor, w, offsets: Tensor, transpose_b: bool, bias: Tensor | None) -> Tensor:
    # the pipeline's grouped_mm on a moestream.quant.PackedWeight (always [E, N, K]: transpose_b is moot)
    return qgrouped_mm(
        a, w.qweight, w.scale, w.zero, offsets, w.bits, w.group_size, bias, getattr(w, "activations", "auto")
    )


#: The expert pipeline's op set for compressed experts (pipeline.Experts holding PackedWeights).
QUANT_OPS = pipeline.ExpertOps(permute, _qgrouped_mm_packed, gated_activation, unpermute)


# ----------------------------------------------------------------------------------------------
# fake (meta) kernels: the argument checks above, then shapes, dtypes and strides as the kernels
# return them (contiguous, except where a kernel keeps its input's strides)


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("moestream::router_topk")
    def _(logits, k, score, topk_first, bias, num_groups, topk_groups, normalize, scale):
        _check_router_topk_args(logits, k, score, bias, num_groups, topk_groups)
        T = logits.shape[0]
        return logits.new_empty((T, k), dtype=_acc(logits)), logits.new_empty((T, k), dtype=torch.int64)

    @reg("moestream::router_topk_backward")
    def _(grad_weights, logits, ids, score, topk_first, normalize, scale):
        _check_router_topk_backward_args(grad_weights, logits, ids, score)
        return logits.new_empty(logits.shape)

    @reg("moestream::router_aux_loss")
    def _(logits, ids, mask):
        _check_router_aux_loss_args(_Checks("router_aux_loss"), logits, ids, mask)
        return logits.new_empty((), dtype=_acc(logits))

    @reg("moestream::router_aux_loss_backward")
    def _(grad, logits, ids, mask):
        c = _Checks("router_aux_loss_backward")
        _check_router_aux_loss_args(c, logits, ids, mask)
        _check_router_scalar_grad(c, grad, logits)
        return logits.new_empty(logits.shape)

    @reg("moestream::router_z_loss")
    def _(logits):
        _check_router_logits(_Checks("router_z_loss"), logits)
        return logits.new_empty((), dtype=_acc(logits))

    @reg("moestream::router_z_loss_backward")
    def _(grad, logits):
        c = _Checks("router_z_loss_backward")
        _check_router_logits(c, logits)
        _check_router_scalar_grad(c, grad, logits)
        return logits.new_empty(logits.shape)

    @reg("moestream::permute")
    def _(x, ids, num_experts):
        _check_permute_args(x, ids, num_experts)
        T, k = ids.shape
        return (
            x.new_empty((T * k, x.shape[1])),
            ids.new_empty((T, k), dtype=torch.int64),
            ids.new_empty((num_experts,), dtype=torch.int64),
        )

    @reg("moestream::unpermute")
    def _(y_sorted, perm, weights):
        _check_unpermute_args(y_sorted, perm, weights)
        return y_sorted.new_empty((perm.shape[0], y_sorted.shape[1]))

    @reg("moestream::unpermute_backward")
    def _(grad_y, y_sorted, perm, weights, needs_weights_grad):
        _check_unpermute_backward_args(grad_y, y_sorted, perm, weights)
        gw_shape = tuple(perm.shape) if (weights is not None and needs_weights_grad) else (0,)
        return y_sorted.new_empty(y_sorted.shape), y_sorted.new_empty(gw_shape, dtype=_acc(y_sorted))

    @reg("moestream::grouped_mm")
    def _(a, b, offsets, transpose_b, bias):
        _check_grouped_mm_args(a, b, offsets, transpose_b, bias)
        n = b.shape[1] if transpose_b else b.shape[2]
        return a.new_empty((a.shape[0], n))

    @reg("moestream::grouped_mm_weight_grad")
    def _(a, grad_out, offsets, transpose_b):
        _check_grouped_mm_weight_grad_args(a, grad_out, offsets)
        E, K, N = offsets.shape[0], a.shape[1], grad_out.shape[1]
        return a.new_empty((E, N, K) if transpose_b else (E, K, N))

    @reg("moestream::grouped_bias_grad")
    def _(grad_out, offsets):
        _check_grouped_bias_grad_args(grad_out, offsets)
        return grad_out.new_empty((offsets.shape[0], grad_out.shape[1]))

    @reg("moestream::gated_activation")
    def _(x, kind, layout, alpha, limit):
        _check_gated_activation_args(x, kind, layout)
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @reg("moestream::gated_activation_backward")
    def _(grad, x, kind, layout, alpha, limit):
        _check_gated_activation_backward_args(grad, x, kind, layout)
        return torch.empty_like(x)  # the kernels keep x's strides

    @reg("moestream::moe_experts")
    def _(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b, alpha, limit):
        _check_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b)
        return torch.empty_like(x)  # the kernels keep x's strides

    @reg("moestream::qgrouped_mm")
    def _(a, qweight, scale, zero, offsets, bits, group_size, bias, activations="auto"):
        _check_activations("qgrouped_mm", activations)
        return a.new_empty((a.shape[0], qweight.shape[1]))

    @reg("moestream::qlinear")
    def _(x, qweight, scale, zero, bits, group_size, bias, activations="auto"):
        _check_activations("qlinear", activations)
        return x.new_empty((x.shape[0], qweight.shape[0]))


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# autograd, written with moestream's own ops


def _register_autograd() -> None:
    def reg(name, backward, setup_context):
        torch.library.register_autograd(f"moestream::{name}", backward, setup_context=setup_context)

    # router_topk ------------------------------------------------------------------------------
    def router_setup(ctx, inputs, output):
        logits, k, score, topk_first, bias, num_groups, topk_groups, normalize, scale = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.args = (score, topk_first, normalize, scale)

    def router_backward(ctx, grad_weights, grad_ids):
        logits, ids = ctx.saved_tensors
        score, topk_first, normalize, scale = ctx.args
        g = _ops.router_topk_backward(
            grad_weights.contiguous(), logits, ids, score, topk_first, normalize, scale
        )
        return g, None, None, None, None, None, None, None, None

    reg("router_topk", router_backward, router_setup)

    # losses -------------------------------------------------------------------------------------
    def aux_setup(ctx, inputs, output):
        ctx.save_for_backward(*[t for t in inputs if t is not None])
        ctx.has_mask = inputs[2] is not None

    def aux_backward(ctx, grad):
        saved = ctx.saved_tensors
        logits, ids = saved[0], saved[1]
        mask = saved[2] if ctx.has_mask else None
        return _ops.router_aux_loss_backward(grad, logits, ids, mask), None, None

    reg("router_aux_loss", aux_backward, aux_setup)

    def z_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def z_backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return _ops.router_z_loss_backward(grad, logits)

    reg("router_z_loss", z_backward, z_setup)

    # permute / unpermute --------------------------------------------------------------------------
    def permute_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1], output[2])

    def permute_backward(ctx, grad_sorted, grad_perm, grad_offsets):
        (perm,) = ctx.saved_tensors
        # d x[t] = sum_s d x_sorted[perm[t, s]]: an unweighted unpermute.
        return _ops.unpermute(grad_sorted.contiguous(), perm, None), None, None

    reg("permute", permute_backward, permute_setup)

    def unpermute_setup(ctx, inputs, output):
        y_sorted, perm, weights = inputs
        ctx.has_weights = weights is not None
        ctx.weights_dtype = weights.dtype if weights is not None else None
        ctx.save_for_backward(y_sorted, perm, weights if weights is not None else y_sorted.new_empty(0))

    def unpermute_backward(ctx, grad_y):
        y_sorted, perm, weights = ctx.saved_tensors
        w = weights if ctx.has_weights else None
        need_w = ctx.has_weights and ctx.needs_input_grad[2]
        gy, gw = _ops.unpermute_backward(grad_y.contiguous(), y_sorted, perm, w, need_w)
        return gy, None, (gw.to(ctx.weights_dtype) if need_w else None)

    reg("unpermute", unpermute_backward, unpermute_setup)

    def unpermute_bw_setup(ctx, inputs, output):
        grad_y, y_sorted, perm, weights, _ = inputs
        ctx.has_weights = weights is not None
        ctx.save_for_backward(
            grad_y, y_sorted, perm, weights if weights is not None else y_sorted.new_empty(0)
        )

    def unpermute_bw_backward(ctx, gg_ys, gg_w):
        # second order. unpermute_backward is linear: gys[perm[t, s]] += w[t, s] grad_y[t] and
        # gw[t, s] = <grad_y[t], y_sorted[perm[t, s]]>, so each term is an unpermute or an
        # unpermute_backward again.
        grad_y, y_sorted, perm, weights = ctx.saved_tensors
        w = weights if ctx.has_weights else None
        if gg_w is not None and gg_w.numel() == 0:
            gg_w = None  # gw was not computed (no weights, or not wanted)
        d_gy = d_ys = d_w = None
        if ctx.needs_input_grad[0]:
            d_gy = torch.zeros_like(grad_y)
            if gg_ys is not None:
                d_gy = d_gy + _ops.unpermute(gg_ys.contiguous(), perm, w)
            if gg_w is not None:
                d_gy = d_gy + _ops.unpermute(y_sorted, perm, gg_w.contiguous())
        if ctx.needs_input_grad[1] and gg_w is not None:
            d_ys = _ops.unpermute_backward(grad_y, y_sorted, perm, gg_w.contiguous(), False)[0]
        if ctx.has_weights and ctx.needs_input_grad[3] and gg_ys is not None:
            d_w = _ops.unpermute_backward(grad_y, gg_ys.contiguous(), perm, w, True)[1].to(w.dtype)
        return d_gy, d_ys, None, d_w, None

    reg("unpermute_backward", unpermute_bw_backward, unpermute_bw_setup)

    # grouped matmul -------------------------------------------------------------------------------
    def gmm_setup(ctx, inputs, output):
        a, b, offsets, transpose_b, bias = inputs
        ctx.transpose_b = transpose_b
        ctx.has_bias = bias is not None
        ctx.save_for_backward(a, b, offsets)

    def gmm_backward(ctx, grad_out):
        a, b, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        ga = gb = gbias = None
        if ctx.needs_input_grad[0]:
            ga = _ops.grouped_mm(grad_out, b, offsets, not ctx.transpose_b, None)
        if ctx.needs_input_grad[1]:
            gb = _ops.grouped_mm_weight_grad(a, grad_out, offsets, ctx.transpose_b)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gbias = _ops.grouped_bias_grad(grad_out, offsets)
        return ga, gb, None, None, gbias

    reg("grouped_mm", gmm_backward, gmm_setup)

    def gmm_wg_setup(ctx, inputs, output):
        a, grad_out, offsets, transpose_b = inputs
        ctx.transpose_b = transpose_b
        ctx.save_for_backward(a, grad_out, offsets)

    def gmm_wg_backward(ctx, gg):
        # second order: W = a^T dy per group (or dy^T a); dW is linear in both a and dy.
        a, dy, offsets = ctx.saved_tensors
        gg = gg.contiguous()
        tb = ctx.transpose_b
        ga = gdy = None
        if ctx.needs_input_grad[0]:
            # W_g = a_g^T dy_g  ->  d a_g = dy_g gg_g^T  (tb: W_g = dy_g^T a_g -> d a_g = dy_g gg_g)
            ga = _ops.grouped_mm(dy, gg, offsets, not tb, None)
        if ctx.needs_input_grad[1]:
            gdy = _ops.grouped_mm(a, gg, offsets, tb, None)
        return ga, gdy, None, None

    reg("grouped_mm_weight_grad", gmm_wg_backward, gmm_wg_setup)

    def gbias_setup(ctx, inputs, output):
        grad_out, offsets = inputs
        ctx.rows = grad_out.shape[0]
        ctx.save_for_backward(offsets)

    def gbias_backward(ctx, gg):
        # second order: grad_bias[g] = sum of group g's rows -> every row of g gets gg[g], rows past
        # offsets[-1] get 0: a grouped matmul of a column of ones with gg[g] as a 1 x N block.
        (offsets,) = ctx.saved_tensors
        gg = gg.contiguous()
        ones = gg.new_ones((ctx.rows, 1))
        return _ops.grouped_mm(ones, gg.unsqueeze(1), offsets, False, None), None

    reg("grouped_bias_grad", gbias_backward, gbias_setup)

    # gated activation -----------------------------------------------------------------------------
    def act_setup(ctx, inputs, output):
        x, kind, layout, alpha, limit = inputs
        ctx.args = (kind, layout, alpha, limit)
        ctx.save_for_backward(x)

    def act_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _ops.gated_activation_backward(grad.contiguous(), x, *ctx.args), None, None, None, None

    reg("gated_activation", act_backward, act_setup)

    # whole expert path: the op's own autograd keeps only its inputs and recomputes the forward
    # with the pipeline on the differentiable ops, then differentiates that (each op's backward
    # above); ms.moe_experts avoids the recompute by composing the ops when grads are needed.
    def experts_setup(ctx, inputs, output):
        x, ids, weights, w1, w2, b1, b2, kind, layout, tb, alpha, limit = inputs
        ctx.args = (kind, layout, tb, alpha, limit)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        empty = x.new_empty(0)
        ctx.save_for_backward(
            x, ids, weights, w1, w2, b1 if b1 is not None else empty, b2 if b2 is not None else empty
        )

    def experts_backward(ctx, grad):
        x, ids, weights, w1, w2, b1, b2 = ctx.saved_tensors
        kind, layout, tb, alpha, limit = ctx.args
        tensors = [x, None, weights, w1, w2, b1 if ctx.has_b1 else None, b2 if ctx.has_b2 else None]
        wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
        if torch.is_grad_enabled():
            # create_graph: differentiate the recomputed pipeline on the saved inputs themselves, so
            # the gradients stay connected to the graph (second order through each op's backward)
            out = pipeline.moe_experts(OPS, *tensors[:1], ids, *tensors[2:], kind, layout, tb, alpha, limit)
            grads = torch.autograd.grad(out, [tensors[i] for i in wanted], grad, create_graph=True)
            result = [None] * 12
            for i, g in zip(wanted, grads):
                result[i] = g
            return tuple(result)
        with torch.enable_grad():
            leaves = [
                t if t is None else t.detach().requires_grad_(i in wanted) for i, t in enumerate(tensors)
            ]
            leaves[1] = ids
            out = pipeline.moe_experts(OPS, *leaves, kind, layout, tb, alpha, limit)
            grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad)
        result = [None] * 12
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    reg("moe_experts", experts_backward, experts_setup)

    # backward ops without a second derivative: a clear error where autograd would otherwise give
    # silent zeros / None for the gradient of the gradient
    def no_double_backward(name: str, forward: str):
        def setup(ctx, inputs, output):
            pass

        def backward(ctx, *grads):
            raise RuntimeError(
                f"moestream.{forward}: double backward (the gradient of its gradient, e.g. "
                "torch.autograd.grad(..., create_graph=True) then backward again) is not supported"
            )

        reg(name, backward, setup)

    for forward in ("router_topk", "router_aux_loss", "router_z_loss", "gated_activation"):
        no_double_backward(f"{forward}_backward", forward)

    # qgrouped_mm / qlinear (inference only) have their Autograd kernels in C++
    # (csrc/quant/quant_autograd.cpp): no Python layer per decode call


_register_fakes()
_register_autograd()


# ----------------------------------------------------------------------------------------------
# the CUDA kernel of moe_experts: the pipeline on the CUDA kernels of its ops (not fused)


def _moe_experts_cuda(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb, alpha, limit):
    # Every step runs on the current stream without host synchronisation; expert ids are not range
    # checked here (that would need a sync): permute drops out-of-range ids.
    _check_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        return torch.zeros_like(x)
    y = pipeline.moe_experts(
        OPS, x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb, alpha, limit
    )
    return y if x.is_contiguous() else torch.empty_like(x).copy_(y)  # x's strides, like the fake kernel


if _C.with_cuda:
    torch.library.impl("moestream::moe_experts", "CUDA", _moe_experts_cuda)
else:
    # A CPU-only build next to a CUDA torch: CUDA tensors would meet the dispatcher's "could not
    # run ... with arguments from the 'CUDA' backend"; say what is missing instead.
    def _no_cuda_kernel(name: str):
        def impl(*args, **kwargs):
            raise RuntimeError(
                f"moestream.{name}: got CUDA tensors, but this build of moestream has no CUDA kernels (it was "
                "built against a torch without CUDA, or with MOESTREAM_CUDA=OFF); rebuild it with a CUDA torch "
                "installed (pip install --no-build-isolation .), or pass CPU tensors"
            )

        return impl

    for _name in OP_NAMES:
        torch.library.impl(f"moestream::{_name}", "CUDA", _no_cuda_kernel(_name))
