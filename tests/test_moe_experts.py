"""moe_experts: the fused inference op against the reference compositions, and the differentiable
path (composite of the individual ops, and the op's own autograd)."""

from __future__ import annotations

import moestream
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import reference
from moestream._tuning import tuning

# (kind, layout, biases): the plain SwiGLU MoE (Mixtral / Qwen), GPT-OSS, and GeGLU with biases
CONFIGS = [("swiglu", "concat", False), ("gptoss", "interleaved", True), ("geglu", "concat", True)]
ALPHA, LIMIT = 1.702, 3.0


def make(T, H, I, E, k, dtype=torch.float32, device="cpu", transpose_b=False, bias=False, ids=None):
    """Random expert inputs; ids: distinct experts per token unless given."""
    if ids is None:
        ids = torch.rand(T, E).argsort(dim=1)[:, :k] if T > 0 else torch.empty(0, k, dtype=torch.long)
    weights = torch.rand(T, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(T, H, dtype=torch.float64)
    w1 = torch.randn(E, 2 * I, H, dtype=torch.float64) / H**0.5
    w2 = torch.randn(E, H, I, dtype=torch.float64) / I**0.5
    if not transpose_b:  # [E, H, 2I] and [E, I, H]
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    b1 = torch.randn(E, 2 * I, dtype=torch.float64) if bias else None
    b2 = torch.randn(E, H, dtype=torch.float64) if bias else None

    def cvt(t, dt=dtype):
        return None if t is None else t.to(dt).to(device)

    return {
        "x": cvt(x),
        "ids": ids.to(device),
        "weights": weights.to(device),
        "w_gate_up": cvt(w1),
        "w_down": cvt(w2),
        "b_gate_up": cvt(b1),
        "b_down": cvt(b2),
    }


def call_fused(a, kind="swiglu", layout="concat", transpose_b=False):
    return torch.ops.moestream.moe_experts(
        a["x"], a["ids"], a["weights"], a["w_gate_up"], a["w_down"], a["b_gate_up"], a["b_down"],
        kind, layout, transpose_b, ALPHA, LIMIT,
    )  # fmt: skip


def call_ref(fn, a, kind="swiglu", layout="concat", transpose_b=False, dtype=None):
    def cvt(t):
        return None if t is None or dtype is None else t.to(dtype)

    b = {
        n: (cvt(t) if dtype is not None and t is not None and t.is_floating_point() else t)
        for n, t in a.items()
    }
    return fn(
        b["x"], b["ids"], b["weights"], b["w_gate_up"], b["w_down"], b["b_gate_up"], b["b_down"],
        kind, layout, transpose_b, ALPHA, LIMIT,
    )  # fmt: skip


def check_fused(a, kind, layout, transpose_b, what=""):
    out = call_fused(a, kind, layout, transpose_b)
    x = a["x"]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    ref64 = call_ref(reference.moe_experts, a, kind, layout, transpose_b, dtype=torch.float64)
    ref_lowp = call_ref(reference.moe_experts, a, kind, layout, transpose_b)
    assert_accurate(out, ref64, ref_lowp, what=what)
    return out, ref64


# ---- the fused op against the references ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("tokens", [12, 160], ids=["decode", "prefill"])
def test_fused_matches_reference(device, dtype, transpose_b, config, tokens):
    # 12 tokens: a few rows per expert (the streaming kernel); 160 tokens: ~40-80 rows per expert
    # (the BLAS path). H and I are not multiples of the vector width, so the tails run too.
    kind, layout, bias = config
    a = make(tokens, 52, 44, 6, 2, dtype, device, transpose_b, bias)
    _, ref64 = check_fused(a, kind, layout, transpose_b, what=f"{kind}/{dtype}/tb={transpose_b}/T={tokens}")
    # independent check of the oracle itself: the loop formulation agrees in float64
    loop64 = call_ref(reference.moe_experts_loop, a, kind, layout, transpose_b, dtype=torch.float64)
    torch.testing.assert_close(loop64, ref64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_loop(device, dtype):
    a = make(40, 64, 32, 8, 2, dtype, device, transpose_b=True)
    out = call_fused(a, transpose_b=True)
    loop64 = call_ref(reference.moe_experts_loop, a, transpose_b=True, dtype=torch.float64)
    loop_lowp = call_ref(reference.moe_experts_loop, a, transpose_b=True)
    assert_accurate(out, loop64, loop_lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        {"T": 0, "H": 16, "I": 8, "E": 4, "k": 2},
        {"T": 9, "H": 24, "I": 16, "E": 5, "k": 5},  # k == E
        {"T": 21, "H": 40, "I": 24, "E": 1, "k": 1},  # one expert
        {"T": 17, "H": 33, "I": 17, "E": 4, "k": 3},  # odd sizes
        {"T": 3, "H": 7, "I": 3, "E": 3, "k": 2},  # smaller than one vector
        {"T": 150, "H": 80, "I": 72, "E": 2, "k": 2},  # few experts, many rows: columns split over threads
        {"T": 5, "H": 16, "I": 8, "E": 4, "k": 0},  # no slots at all
    ],
    ids=["T0", "k=E", "E1", "odd", "tiny", "E2-many-rows", "k0"],
)
def test_edge_shapes(device, dtype, case):
    for transpose_b in (False, True):
        a = make(case["T"], case["H"], case["I"], case["E"], case["k"], dtype, device, transpose_b, bias=True)
        out, _ = check_fused(a, "gptoss", "interleaved", transpose_b, what=str(case))
        if case["T"] == 0 or case["k"] == 0:
            assert out.shape == (case["T"], case["H"]) and (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_every_row_count_kernel(device, dtype, transpose_b):
    # experts with 1, 2, 3, 4, 7, 9, 17 and 40 rows reach each CPU matmul path (streaming kernels
    # for a few rows, BLAS for many); H = 70 and I = 45 leave tails after every vector block
    counts = [1, 2, 3, 4, 7, 9, 17, 40]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(sum(counts))][:, None]
    a = make(sum(counts), 70, 45, len(counts), 1, dtype, device, transpose_b, bias=True, ids=ids)
    check_fused(a, "swiglu", "concat", transpose_b, what=f"{dtype} tb={transpose_b}")
    check_fused(a, "gptoss", "interleaved", transpose_b, what=f"{dtype} tb={transpose_b}")


@pytest.mark.parametrize("route", ["native", "float"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gemm_routes(dtype, route):
    # bfloat16 / float16 experts with many rows run either ATen's native GEMM (where it is fast:
    # AVX-512) or a float32 detour; the CPU picks one, so force each to test both on any machine
    counts = [0, 3, 20, 33, 64]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(sum(counts))][:, None]
    with tuning(cpu_lowp_gemm=route):
        for transpose_b in (False, True):
            a = make(sum(counts), 48, 40, len(counts), 1, dtype, "cpu", transpose_b, bias=True, ids=ids)
            check_fused(a, "swiglu", "concat", transpose_b, what=f"{route} {dtype} tb={transpose_b}")
            check_fused(a, "gptoss", "interleaved", transpose_b, what=f"{route} {dtype} tb={transpose_b}")


def test_expert_without_tokens(device):
    T, E, k = 30, 6, 2
    ids = torch.stack([torch.randperm(E - 2)[:k] for _ in range(T)])  # experts 4 and 5 get nothing
    ids = torch.where(ids >= 2, ids + 1, ids)  # and expert 2 neither: 0, 1, 3, 4 remain
    assert not (ids == 2).any() and not (ids == 5).any()
    a = make(T, 48, 32, E, k, torch.float32, device, bias=True, ids=ids)
    check_fused(a, "swiglu", "concat", False)


def test_duplicate_ids(device):
    # the same expert twice for one token: both slots count, like the reference
    ids = torch.tensor([[1, 1], [0, 2], [2, 2], [0, 1]])
    a = make(4, 16, 8, 3, 2, torch.float32, device, ids=ids)
    check_fused(a, "swiglu", "concat", False)


def test_int32_ids_and_low_precision_weights(device):
    a = make(25, 32, 24, 4, 2, torch.bfloat16, device, transpose_b=True)
    out = call_fused(a, transpose_b=True)
    b = dict(a, ids=a["ids"].to(torch.int32), weights=a["weights"].to(torch.bfloat16))
    out2 = call_fused(b, transpose_b=True)
    ref64 = call_ref(reference.moe_experts, b, transpose_b=True, dtype=torch.float64)
    assert_accurate(out2, ref64, call_ref(reference.moe_experts, b, transpose_b=True))
    assert torch.allclose(out.float(), out2.float(), rtol=2e-2, atol=2e-2)


def test_non_contiguous_inputs(device):
    a = make(20, 40, 24, 4, 2, torch.float32, device, transpose_b=True, bias=True)
    b = dict(a)
    b["x"] = a["x"].t().contiguous().t()  # column-major [T, H]
    b["ids"] = a["ids"].t().contiguous().t()
    b["weights"] = a["weights"].t().contiguous().t()
    b["w_gate_up"] = a["w_gate_up"].transpose(1, 2).contiguous().transpose(1, 2)
    b["w_down"] = a["w_down"].transpose(0, 1).contiguous().transpose(0, 1)
    b["b_gate_up"] = a["b_gate_up"].t().contiguous().t()
    assert not b["x"].is_contiguous() and not b["w_gate_up"].is_contiguous()
    out = call_fused(b, "gptoss", "interleaved", True)
    assert out.stride() == b["x"].stride()  # like the fake kernel, empty_like(x)
    torch.testing.assert_close(out, call_fused(a, "gptoss", "interleaved", True), rtol=0, atol=0)
    check_fused(b, "gptoss", "interleaved", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_strided_apart(device, dtype):
    """Each expert contiguous, the experts not (an expert cache's slots: one strided view of a
    larger buffer with gaps between experts): the same result, read in place."""
    a = make(9, 40, 24, 5, 2, dtype, device, transpose_b=True, bias=True)
    a["b_gate_up"], a["b_down"] = a["b_gate_up"].float(), a["b_down"].float()
    b = dict(a)
    for key in ("w_gate_up", "w_down", "b_gate_up", "b_down"):
        t = a[key]
        per = t[0].numel()
        buf = torch.full((t.shape[0], per + 37), float("nan"), dtype=t.dtype, device=device)
        buf[:, :per] = t.reshape(t.shape[0], per)
        b[key] = buf.view(-1).as_strided(t.shape, (per + 37, *t[0].stride()), 0)
        assert not b[key].is_contiguous() and torch.equal(b[key], t)
    out = call_fused(b, "gptoss", "interleaved", True)
    torch.testing.assert_close(out, call_fused(a, "gptoss", "interleaved", True), rtol=0, atol=0)


def test_deterministic(device):
    a = make(200, 64, 48, 8, 4, torch.bfloat16, device, transpose_b=True)
    first = call_fused(a, transpose_b=True)
    for _ in range(2):
        assert torch.equal(call_fused(a, transpose_b=True), first)


def test_public_function_without_grad_uses_fused_op(device):
    a = make(10, 32, 16, 4, 2, torch.float32, device)
    out = moestream.moe_experts(**a)
    torch.testing.assert_close(out, call_fused(a), rtol=0, atol=0)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input(device):
    a = make(6, 16, 8, 4, 2, torch.float32, device, bias=True)

    def call(**kw):
        return call_fused(dict(a, **kw))

    with pytest.raises(RuntimeError, match=r"moe_experts: ids must be in \[0, 4\).*got 4 at \[1, 0\]"):
        call(ids=torch.tensor([[0, 1], [4, 0], [1, 2], [0, 3], [1, 3], [2, 3]], device=device))
    with pytest.raises(RuntimeError, match=r"ids must be in \[0, 4\).*got -1"):
        call(ids=torch.full((6, 2), -1, device=device))
    with pytest.raises(RuntimeError, match=r"ids must be int32 or int64"):
        call(ids=a["ids"].float())
    with pytest.raises(RuntimeError, match=r"ids must have shape \[T, k\] with T = 6.*\[5, 2\]"):
        call(ids=a["ids"][:5], weights=a["weights"][:5])
    with pytest.raises(RuntimeError, match=r"weights must have ids' shape \[6, 2\], got shape \[6, 3\]"):
        call(weights=torch.rand(6, 3, device=device))
    with pytest.raises(RuntimeError, match=r"x must have 2 dimensions"):
        call(x=a["x"][None])
    with pytest.raises(RuntimeError, match=r"w_gate_up must have x's dtype"):
        call(w_gate_up=a["w_gate_up"].double())
    with pytest.raises(RuntimeError, match=r"w_gate_up must have shape \[E, H, 2I\] with H = 16"):
        call(w_gate_up=torch.randn(4, 15, 16, device=device))
    with pytest.raises(RuntimeError, match=r"w_gate_up must have shape .*even 2I"):
        call(w_gate_up=torch.randn(4, 16, 15, device=device))
    with pytest.raises(RuntimeError, match=r"w_down must have shape \[4, 8, 16\]"):
        call(w_down=torch.randn(4, 16, 8, device=device))
    with pytest.raises(RuntimeError, match=r"w_down must have 3 dimensions"):
        call(w_down=torch.randn(8, 16, device=device))
    with pytest.raises(RuntimeError, match=r"b_gate_up must have shape \[E, 2I\] = \[4, 16\]"):
        call(b_gate_up=torch.randn(4, 8, device=device))
    with pytest.raises(RuntimeError, match=r"b_down must have shape \[E, H\] = \[4, 16\]"):
        call(b_down=torch.randn(3, 16, device=device))
    with pytest.raises(RuntimeError, match=r"kind must be one of"):
        call_fused(a, kind="relu")
    with pytest.raises(RuntimeError, match=r"layout must be one of"):
        call_fused(a, layout="halves")
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16, float16 or float64"):
        call(x=a["x"].to(torch.int64))


# ---- differentiable path (composite of permute / grouped_mm / gated_activation / unpermute) ---

DIFF = ["x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"]


def _grads(fn, a, g, **kw):
    """fn's output and the gradients of <out, g> with respect to every float input."""
    leaves = {n: a[n].detach().clone().requires_grad_(True) for n in DIFF if a[n] is not None}
    out = fn(**dict(a, **leaves), **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), g.to(out.dtype))
    return out, dict(zip(leaves, grads))


def _to64(a):
    return {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in a.items()}


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_composite_gradients_match_loop(device, transpose_b, config):
    kind, layout, bias = config
    a = make(14, 24, 16, 5, 2, torch.float64, device, transpose_b, bias)
    kw = {"kind": kind, "layout": layout, "transpose_b": transpose_b, "alpha": ALPHA, "limit": LIMIT}
    g = torch.randn(14, 24, dtype=torch.float64, device=device)
    out, grads = _grads(moestream.moe_experts, a, g, **kw)
    ref, ref_grads = _grads(reference.moe_experts_loop, a, g, **kw)
    assert_accurate(out, ref, what="output")
    for n in grads:
        assert_accurate(grads[n], ref_grads[n], what=f"grad {n}")


def test_composite_gradients_float32(device):
    a = make(20, 32, 24, 4, 2, torch.float32, device, transpose_b=True)
    kw = {"transpose_b": True}
    g = torch.randn(20, 32, device=device)
    _, grads = _grads(moestream.moe_experts, a, g, **kw)
    _, ref_grads = _grads(reference.moe_experts_loop, _to64(a), g, **kw)
    for n in grads:
        assert grads[n].dtype == a[n].dtype
        assert_accurate(grads[n], ref_grads[n], what=f"grad {n}")


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_gradcheck_composite(device, transpose_b, config):
    kind, layout, bias = config
    a = make(5, 6, 4, 3, 2, torch.float64, device, transpose_b, bias)
    names = [n for n in DIFF if a[n] is not None]

    def f(*ts):
        b = dict(a, **dict(zip(names, ts)))
        return moestream.moe_experts(
            **b, kind=kind, layout=layout, transpose_b=transpose_b, alpha=ALPHA, limit=LIMIT
        )

    inputs = tuple(a[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_gradcheck_op_autograd(device, transpose_b):
    # torch.ops.moestream.moe_experts itself is differentiable (its backward recomputes the forward)
    a = make(5, 6, 4, 3, 2, torch.float64, device, transpose_b, bias=True)
    names = [n for n in DIFF if a[n] is not None]

    def f(*ts):
        b = dict(a, **dict(zip(names, ts)))
        return call_fused(b, "gptoss", "interleaved", transpose_b)

    inputs = tuple(a[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def _op_args(a, kind="swiglu", layout="concat", transpose_b=False):
    return (
        a["x"], a["ids"], a["weights"], a["w_gate_up"], a["w_down"], a["b_gate_up"], a["b_down"],
        kind, layout, transpose_b, ALPHA, LIMIT,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_inference(device, dtype):
    a = make(9, 16, 8, 4, 2, dtype, device, transpose_b=True, bias=True)
    torch.library.opcheck(torch.ops.moestream.moe_experts.default, _op_args(a, "gptoss", "interleaved", True))


def test_opcheck_with_grad(device):
    a = make(7, 12, 8, 3, 2, torch.float64, device, bias=True)
    for n in DIFF:
        a[n].requires_grad_(True)
    torch.library.opcheck(torch.ops.moestream.moe_experts.default, _op_args(a))


def test_compile_forward_backward(device):
    a = make(12, 16, 8, 4, 2, torch.float32, device, transpose_b=True)
    kw = {"kind": "swiglu", "layout": "concat", "transpose_b": True}
    f = torch.compile(moestream.moe_experts, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = f(**a, **kw)
    assert_accurate(out, call_ref(reference.moe_experts, a, transpose_b=True, dtype=torch.float64))
    g = torch.randn(12, 16, device=device)
    out, grads = _grads(f, a, g, **kw)
    ref, ref_grads = _grads(reference.moe_experts_loop, _to64(a), g, **kw)
    assert_accurate(out, ref)
    for n in grads:
        assert_accurate(grads[n], ref_grads[n], what=f"grad {n}")


def test_compile_inductor_forward(device):
    a = make(12, 16, 8, 4, 2, torch.float32, device, transpose_b=True, bias=True)
    kw = {"kind": "gptoss", "layout": "interleaved", "transpose_b": True, "alpha": ALPHA, "limit": LIMIT}
    f = torch.compile(moestream.moe_experts, fullgraph=True, backend="inductor")
    with torch.no_grad():
        out = f(**a, **kw)
    assert_accurate(
        out, call_ref(reference.moe_experts, a, "gptoss", "interleaved", True, dtype=torch.float64)
    )


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _ids(T, k, E):
    return torch.randint(0, E, (T, k))


def test_moe_experts_kernel_with_no_intermediate_returns_the_bias_path():
    T, k, E, H = 7, 2, 3, 5
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = _r(T, H, dtype=dtype)
        ids, w = _ids(T, k, E), torch.rand(T, k)
        w1, w2, b2 = _r(E, H, 0, dtype=dtype), _r(E, 0, H, dtype=dtype), _r(E, H)
        for bias in (b2, None):
            out = torch.ops.moestream.moe_experts(
                x, ids, w, w1, w2, None, bias, "swiglu", "concat", False, 1.7, 7.0
            )
            want = (
                (w.double().unsqueeze(-1) * bias.to(dtype).double()[ids]).sum(1)
                if bias is not None
                else torch.zeros(T, H, dtype=torch.float64)
            )
            torch.testing.assert_close(
                out.double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6
            )
            composed = moestream.moe_experts(x, ids, w, w1, w2, None, bias)
            torch.testing.assert_close(out, composed)
        # transformers' layout and a non-contiguous x keep x's strides
        xt = _r(H, T, dtype=dtype).t()
        out = torch.ops.moestream.moe_experts(
            xt, ids, w, w1.transpose(1, 2), w2.transpose(1, 2), None, b2, "swiglu", "concat", True, 1.7, 7.0
        )
        assert out.stride() == torch.empty_like(xt).stride()
        torch.testing.assert_close(out, moestream.moe_experts(xt.contiguous(), ids, w, w1, w2, None, b2))
