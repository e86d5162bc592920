"""The argument contract of every moestream op in Python: the shape / dtype / device checks of
csrc/<op>/<op>_checks.h with the same messages (tests hold the two to them), run by the fake
kernels (meta tensors, FakeTensor, torch.compile) and by the wrappers that must reject before
dispatching. Checks of values (expert id ranges, offsets) need the data and stay in the kernels."""

from __future__ import annotations

import torch
from torch import Tensor

SCORES = ("softmax", "sigmoid")
KINDS = ("swiglu", "geglu", "gptoss")
LAYOUTS = ("concat", "interleaved")


def _check_experts_args(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, tb) -> None:
    """moe_experts' argument contract for the composed path, with the messages of the native
    kernel's checks (csrc/experts/moe_experts_checks.h; tests hold the two to the same messages).
    Expert id ranges are left to permute (checking them on a GPU would need a host sync)."""

    def fail(msg: str) -> None:
        raise RuntimeError(f"moestream.moe_experts: {msg}")

    def shape(t: Tensor) -> str:
        return "[" + ", ".join(str(d) for d in t.shape) + "]"

    def check_float(t: Tensor, name: str) -> None:
        if t.dtype not in _FLOATS:
            fail(f"{name} must be float32, bfloat16, float16 or float64, got {_dtype_name(t.dtype)}")

    def check_dim(t: Tensor, dim: int, name: str) -> None:
        if t.dim() != dim:
            fail(f"{name} must have {dim} dimensions, got shape {shape(t)}")

    def check_device(t: Tensor, name: str) -> None:
        if t.device != x.device:
            fail(f"x and {name} must be on the same device, got {x.device} and {t.device}")

    if kind not in KINDS:
        fail(f'kind must be one of "swiglu", "geglu", "gptoss", got "{kind}"')
    if layout not in LAYOUTS:
        fail(f'layout must be one of "concat", "interleaved", got "{layout}"')
    check_float(x, "x")
    check_dim(x, 2, "x")
    if ids.dtype not in (torch.int32, torch.int64):
        fail(f"ids must be int32 or int64, got {_dtype_name(ids.dtype)}")
    check_dim(ids, 2, "ids")
    check_float(weights, "weights")
    check_dim(weights, 2, "weights")
    check_dim(w_gate_up, 3, "w_gate_up")
    check_dim(w_down, 3, "w_down")
    for t, name in ((ids, "ids"), (weights, "weights"), (w_gate_up, "w_gate_up"), (w_down, "w_down")):
        check_device(t, name)
    T, H = x.shape
    if ids.shape[0] != T:
        fail(f"ids must have shape [T, k] with T = {T} (x's rows), got shape {shape(ids)}")
    if weights.shape != ids.shape:
        fail(f"weights must have ids' shape {shape(ids)}, got shape {shape(weights)}")
    for t, name in ((w_gate_up, "w_gate_up"), (w_down, "w_down")):
        if t.dtype != x.dtype:
            fail(f"{name} must have x's dtype {_dtype_name(x.dtype)}, got {_dtype_name(t.dtype)}")
    E = w_gate_up.shape[0]
    two_i, h_in = (w_gate_up.shape[1], w_gate_up.shape[2]) if tb else (w_gate_up.shape[2], w_gate_up.shape[1])
    if h_in != H or two_i % 2 != 0:
        want = "[E, 2I, H]" if tb else "[E, H, 2I]"
        fail(
            f"w_gate_up must have shape {want} with H = {H} (x's columns) and an even 2I, "
            f"got shape {shape(w_gate_up)}"
        )
    I = two_i // 2
    down = (E, H, I) if tb else (E, I, H)
    if tuple(w_down.shape) != down:
        fail(
            f"w_down must have shape [{', '.join(map(str, down))}] {'([E, H, I])' if tb else '([E, I, H])'}, "
            f"got shape {shape(w_down)}"
        )
    for b, name, n, what in ((b_gate_up, "b_gate_up", 2 * I, "[E, 2I]"), (b_down, "b_down", H, "[E, H]")):
        if b is not None:
            check_float(b, name)
            check_device(b, name)
            if b.dim() != 2 or b.shape[0] != E or b.shape[1] != n:
                fail(f"{name} must have shape {what} = [{E}, {n}], got shape {shape(b)}")


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    # c10's names, as the native checks print them
    return {
        torch.float32: "Float",
        torch.float64: "Double",
        torch.bfloat16: "BFloat16",
        torch.float16: "Half",
        torch.int32: "Int",
        torch.int64: "Long",
        torch.int16: "Short",
        torch.int8: "Char",
        torch.uint8: "Byte",
        torch.bool: "Bool",
        torch.uint16: "UInt16",
        torch.uint32: "UInt32",
        torch.uint64: "UInt64",
        torch.complex32: "ComplexHalf",
        torch.complex64: "ComplexFloat",
        torch.complex128: "ComplexDouble",
    }.get(dtype, str(dtype).removeprefix("torch.").capitalize())  # float8_e4m3fn -> Float8_e4m3fn


# ----------------------------------------------------------------------------------------------
# argument checks of the fake kernels: the shape / dtype / device contract of each op, with the
# messages of the native checks (csrc/<op>/<op>_checks.h; tests hold the two to the same messages),
# so meta tensors, FakeTensor and torch.compile reject what the CPU and CUDA kernels reject. Checks
# of values (expert id ranges, offsets) need the data and stay in the kernels.

_INT_MAX = 2**31 - 1


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


class _Checks:
    """The helpers of csrc/common/checks.h for one op: every failure is a RuntimeError
    "moestream.<op>: <message>", as TORCH_CHECK raises it."""

    def __init__(self, op: str) -> None:
        self.op = op

    def fail(self, msg: str) -> None:
        raise RuntimeError(f"moestream.{self.op}: {msg}")

    def check(self, cond: bool, msg) -> None:
        if not cond:
            self.fail(msg() if callable(msg) else msg)

    def float_(self, t: Tensor, name: str) -> None:
        if t.dtype not in _FLOATS:
            self.fail(f"{name} must be float32, bfloat16, float16 or float64, got {_dtype_name(t.dtype)}")

    def index(self, t: Tensor, name: str) -> None:
        if t.dtype not in (torch.int32, torch.int64):
            self.fail(f"{name} must be int32 or int64, got {_dtype_name(t.dtype)}")

    def dim(self, t: Tensor, dim: int, name: str) -> None:
        if t.dim() != dim:
            self.fail(f"{name} must have {dim} dimensions, got shape {_shape(t)}")

    def same_device(self, a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
        if a.device != b.device:
            self.fail(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")

    def choice(self, value: str, names: tuple[str, ...], what: str) -> None:
        if value not in names:
            listed = ", ".join(f'"{n}"' for n in names)
            self.fail(f'{what} must be one of {listed}, got "{value}"')


# router (csrc/router/router_checks.h) ----------------------------------------------------------


def _check_router_logits(c: _Checks, logits: Tensor) -> None:
    c.dim(logits, 2, "logits")
    c.float_(logits, "logits")
    c.check(
        logits.shape[1] < _INT_MAX,
        lambda: f"logits must have fewer than 2^31 - 1 experts, got E = {logits.shape[1]}",
    )


def _check_router_ids(c: _Checks, ids: Tensor, logits: Tensor) -> None:
    c.dim(ids, 2, "ids")
    c.index(ids, "ids")
    c.same_device(logits, ids, "logits", "ids")
    T = logits.shape[0]
    c.check(
        ids.shape[0] == T, lambda: f"ids must have T = logits.size(0) = {T} rows, got shape {_shape(ids)}"
    )


def _check_router_topk_args(logits, k, score, bias, num_groups, topk_groups) -> None:
    c = _Checks("router_topk")
    _check_router_logits(c, logits)
    E = logits.shape[1]
    c.check(1 <= k <= E, lambda: f"k must be in [1, E] with E = logits.size(1) = {E}, got k = {k}")
    c.choice(score, SCORES, "score")
    c.check(num_groups >= 1, lambda: f"num_groups must be >= 1, got {num_groups}")
    c.check(
        E % num_groups == 0,
        lambda: f"num_groups must divide the number of experts E = {E}, got num_groups = {num_groups}",
    )
    c.check(
        1 <= topk_groups <= num_groups,
        lambda: f"topk_groups must be in [1, num_groups = {num_groups}], got {topk_groups}",
    )
    if bias is not None:
        c.same_device(logits, bias, "logits", "bias")
        c.float_(bias, "bias")
        c.check(
            bias.dim() == 1 and bias.shape[0] == E,
            lambda: f"bias must have shape [E] = [{E}], got {_shape(bias)}",
        )


def _check_router_topk_backward_args(grad_weights, logits, ids, score) -> None:
    c = _Checks("router_topk_backward")
    _check_router_logits(c, logits)
    c.dim(grad_weights, 2, "grad_weights")
    c.float_(grad_weights, "grad_weights")
    c.same_device(logits, grad_weights, "logits", "grad_weights")
    _check_router_ids(c, ids, logits)
    T, k = logits.shape[0], ids.shape[1]
    c.check(
        tuple(grad_weights.shape) == (T, k),
        lambda: f"grad_weights must have the shape of ids [{T}, {k}], got {_shape(grad_weights)}",
    )
    c.choice(score, SCORES, "score")


def _check_router_aux_loss_args(c: _Checks, logits, ids, mask) -> None:
    _check_router_logits(c, logits)
    _check_router_ids(c, ids, logits)
    if mask is not None:
        T = logits.shape[0]
        c.same_device(logits, mask, "logits", "mask")
        c.check(
            mask.dim() == 1 and mask.shape[0] == T,
            lambda: f"mask must have shape [T] = [{T}], got {_shape(mask)}",
        )
        c.check(
            not mask.dtype.is_complex,
            lambda: f"mask must be a float, integer or bool tensor, got {_dtype_name(mask.dtype)}",
        )


def _check_router_scalar_grad(c: _Checks, grad, logits) -> None:
    c.float_(grad, "grad")
    c.same_device(logits, grad, "logits", "grad")
    c.check(grad.numel() == 1, lambda: f"grad must be a scalar, got shape {_shape(grad)}")


# permute / unpermute (csrc/permute/permute_checks.h) -------------------------------------------


def _check_permute_args(x, ids, num_experts) -> None:
    c = _Checks("permute")
    c.dim(x, 2, "x")
    c.float_(x, "x")
    c.dim(ids, 2, "ids")
    c.index(ids, "ids")
    c.same_device(x, ids, "x", "ids")
    c.check(
        ids.shape[0] == x.shape[0],
        lambda: f"ids must have one row per token of x ({x.shape[0]}), got shape {_shape(ids)}",
    )
    c.check(
        1 <= num_experts < _INT_MAX, lambda: f"num_experts must be >= 1 and < 2^31 - 1, got {num_experts}"
    )


def _check_unpermute_args(y_sorted, perm, weights, op: str = "unpermute") -> None:
    c = _Checks(op)
    c.dim(y_sorted, 2, "y_sorted")
    c.float_(y_sorted, "y_sorted")
    c.dim(perm, 2, "perm")
    c.index(perm, "perm")
    c.same_device(perm, y_sorted, "perm", "y_sorted")
    if weights is not None:
        c.float_(weights, "weights")
        c.same_device(weights, y_sorted, "weights", "y_sorted")
        c.check(
            weights.dim() == 2 and tuple(weights.shape) == tuple(perm.shape),
            lambda: f"weights must have perm's shape {_shape(perm)}, got {_shape(weights)}",
        )


def _check_unpermute_backward_args(grad_y, y_sorted, perm, weights) -> None:
    c = _Checks("unpermute_backward")
    c.dim(grad_y, 2, "grad_y")
    c.same_device(grad_y, y_sorted, "grad_y", "y_sorted")
    _check_unpermute_args(y_sorted, perm, weights, c.op)
    c.check(
        grad_y.dtype == y_sorted.dtype,
        lambda: (
            f"grad_y must have y_sorted's dtype {_dtype_name(y_sorted.dtype)}, got {_dtype_name(grad_y.dtype)}"
        ),
    )
    T, H = perm.shape[0], y_sorted.shape[1]
    c.check(
        tuple(grad_y.shape) == (T, H),
        lambda: f"grad_y must have shape [{T}, {H}] (perm's rows, y_sorted's columns), got {_shape(grad_y)}",
    )


# grouped matmul (csrc/grouped_mm/grouped_mm_checks.h) ------------------------------------------


def _check_a_and(c: _Checks, a, t, t_dim: int, t_name: str, offsets) -> None:
    c.dim(a, 2, "a")
    c.float_(a, "a")
    c.dim(t, t_dim, t_name)
    c.check(
        a.dtype == t.dtype,
        lambda: (
            f"a and {t_name} must have the same dtype, got a {_dtype_name(a.dtype)} and "
            f"{t_name} {_dtype_name(t.dtype)}"
        ),
    )
    c.same_device(a, t, "a", t_name)
    c.same_device(a, offsets, "a", "offsets")


def _check_offsets(c: _Checks, offsets, E: int) -> None:
    # check_offsets without read_values: the values need the data
    c.dim(offsets, 1, "offsets")
    c.index(offsets, "offsets")
    c.check(
        offsets.shape[0] == E,
        lambda: f"offsets must have one entry per group ({E}), got shape {_shape(offsets)}",
    )


def _check_grouped_mm_args(a, b, offsets, transpose_b, bias) -> None:
    c = _Checks("grouped_mm")
    _check_a_and(c, a, b, 3, "b", offsets)
    K, E = a.shape[1], b.shape[0]
    bK, N = (b.shape[2], b.shape[1]) if transpose_b else (b.shape[1], b.shape[2])
    c.check(
        bK == K,
        lambda: (
            f"inner dimensions differ: a is {_shape(a)} and b is {_shape(b)}"
            + (" ([E, N, K] with transpose_b)" if transpose_b else " ([E, K, N])")
            + f", so K = {K} vs {bK}"
        ),
    )
    if bias is not None:
        c.float_(bias, "bias")
        c.same_device(a, bias, "a", "bias")
        c.check(
            bias.dim() == 2 and tuple(bias.shape) == (E, N),
            lambda: f"bias must have shape [{E}, {N}] (E, N), got {_shape(bias)}",
        )
    _check_offsets(c, offsets, E)


def _check_grouped_mm_weight_grad_args(a, grad_out, offsets) -> None:
    c = _Checks("grouped_mm_weight_grad")
    _check_a_and(c, a, grad_out, 2, "grad_out", offsets)
    M = a.shape[0]
    c.check(grad_out.shape[0] == M, lambda: f"grad_out must have a's {M} rows, got shape {_shape(grad_out)}")
    c.dim(offsets, 1, "offsets")
    _check_offsets(c, offsets, offsets.shape[0])


def _check_grouped_bias_grad_args(grad_out, offsets) -> None:
    c = _Checks("grouped_bias_grad")
    c.dim(grad_out, 2, "grad_out")
    c.float_(grad_out, "grad_out")
    c.same_device(grad_out, offsets, "grad_out", "offsets")
    c.dim(offsets, 1, "offsets")
    _check_offsets(c, offsets, offsets.shape[0])


# gated activation (csrc/activation/activation_checks.h) ----------------------------------------


def _check_gated_activation_args(x, kind, layout, op: str = "gated_activation") -> None:
    c = _Checks(op)
    c.float_(x, "x")
    c.check(x.dim() >= 1, "x must have at least 1 dimension [..., 2I], got a scalar")
    c.check(
        x.shape[-1] % 2 == 0,
        lambda: f"x's last dimension must be even ([gate, up] of size 2I), got shape {_shape(x)}",
    )
    c.choice(kind, KINDS, "kind")
    c.choice(layout, LAYOUTS, "layout")


def _check_gated_activation_backward_args(grad, x, kind, layout) -> None:
    c = _Checks("gated_activation_backward")
    _check_gated_activation_args(x, kind, layout, c.op)
    c.float_(grad, "grad")
    c.same_device(grad, x, "grad", "x")
    want = (*x.shape[:-1], x.shape[-1] // 2)
    c.check(
        tuple(grad.shape) == tuple(want),
        lambda: (
            "grad must have x's shape with the last dimension halved "
            f"[{', '.join(map(str, want))}], got shape {_shape(grad)} (x has shape {_shape(x)})"
        ),
    )


# compressed matmuls (csrc/quant/quant_cpu.cpp) -------------------------------------------------

#: How the CPU compressed matmuls treat their activations: "float" as they are (weight-only),
#: "int8" quantized per call and group (the AVX-512 VNNI kernels), "auto" int8 for bfloat16 and
#: float16 activations, float for float32.
ACTIVATIONS = ("auto", "int8", "float")


def _check_activations(op: str, activations: str) -> None:
    _Checks(op).check(
        activations in ACTIVATIONS,
        lambda: f"activations must be 'auto', 'int8' or 'float', got '{activations}'",
    )
