"""Cross-cutting hardening of the ops: the fake (meta) kernels check what the CPU kernels check,
with the same messages, and return the kernels' shapes, dtypes and strides; tensors on different
devices (a meta tensor next to CPU ones) are an error; second-order gradients are computed or
refused, never silently zero; a CPU-only build names itself when given CUDA tensors."""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from moestream import ops as msops

pytestmark = pytest.mark.usefixtures("one_thread")

O = torch.ops.moestream
f32, f64, i64 = torch.float32, torch.float64, torch.int64


def r(*shape, dtype=f32):
    return torch.randn(*shape, dtype=dtype)


def ids_(T, k, E, dtype=i64):
    return torch.randint(0, E, (T, k), dtype=dtype)


def on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def outcome(fn):
    """(message, None) when fn raises, else (None, [(shape, dtype, stride)] of its tensor outputs)."""
    try:
        out = fn()
    except RuntimeError as e:
        return str(e).split("\n")[0], None
    outs = out if isinstance(out, tuple) else (out,)
    return None, [(tuple(t.shape), t.dtype, t.stride()) for t in outs]


def ok_args():
    """One valid call of every op (name, args), inputs non-contiguous where the op takes strided ones."""
    T, E, k, H, I = 5, 6, 2, 8, 3
    lg = r(E, T).t()  # non-contiguous logits
    ids = ids_(T, k, E)
    x = r(H, T).t()
    xs, perm, offsets = O.permute(x, ids, E)
    return [
        ("router_topk", [lg, k, "softmax", False, r(E), 2, 1, True, 1.5]),
        ("router_topk_backward", [r(T, k), lg, ids, "softmax", False, False, 1.0]),
        ("router_aux_loss", [lg, ids, torch.ones(T)]),
        ("router_aux_loss_backward", [torch.tensor(1.0), lg, ids, None]),
        ("router_z_loss", [lg]),
        ("router_z_loss_backward", [torch.tensor(2.0), lg]),
        ("permute", [x, ids, E]),
        ("unpermute", [xs, perm, r(T, k)]),
        ("unpermute_backward", [r(T, H), r(H, T * k).t(), perm, r(T, k), True]),
        ("grouped_mm", [xs, r(E, H, 2 * I), offsets, False, r(E, 2 * I)]),
        ("grouped_mm_weight_grad", [xs, r(T * k, 2 * I), offsets, True]),
        ("grouped_bias_grad", [r(T * k, 2 * I), offsets]),
        ("gated_activation", [r(2 * I, 4).t(), "swiglu", "concat", 1.702, 7.0]),
        ("gated_activation_backward", [r(4, I), r(2 * I, 4).t(), "geglu", "interleaved", 1.702, 7.0]),
        (
            "moe_experts",
            [x, ids, r(T, k), r(E, H, 2 * I), r(E, I, H), None, r(E, H), "swiglu", "concat", False, 1.7, 7.0],
        ),
    ]


def test_every_op_is_covered():
    assert {n for n, _ in ok_args()} == set(msops.OP_NAMES)


@pytest.mark.parametrize("name,args", ok_args(), ids=[n for n, _ in ok_args()])
def test_fake_kernels_return_the_kernels_shapes_dtypes_and_strides(name, args):
    op = getattr(O, name)
    err, real = outcome(lambda: op(*args))
    assert err is None, err
    assert outcome(lambda: op(*on("meta", args))) == (None, real)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def bad_args():
    """Calls every op must refuse before reading any value (shape, dtype, device and option errors)."""
    T, E, k, H, I = 4, 6, 2, 8, 3
    lg, ids, x = r(T, E), ids_(T, k, E), r(T, H)
    xs, perm, off = O.permute(x, ids, E)
    w1, w2 = r(E, H, 2 * I), r(E, I, H)
    cases = {
        "router_topk": [
            [lg, 7, "softmax", False, None, 1, 1, False, 1.0],  # k > E
            [lg, 0, "softmax", False, None, 1, 1, False, 1.0],
            [lg, 2, "tanh", False, None, 1, 1, False, 1.0],
            [lg, 2, "softmax", False, None, 4, 1, False, 1.0],  # 4 does not divide 6
            [lg, 2, "softmax", False, None, 3, 4, False, 1.0],
            [lg, 2, "softmax", False, r(5), 1, 1, False, 1.0],
            [lg, 2, "softmax", False, torch.zeros(E, dtype=i64), 1, 1, False, 1.0],
            [lg.to(i64), 2, "softmax", False, None, 1, 1, False, 1.0],
            [r(T, E, 1), 2, "softmax", False, None, 1, 1, False, 1.0],
        ],
        "router_topk_backward": [
            [r(T, k + 1), lg, ids, "softmax", False, False, 1.0],
            [r(T, k), lg, ids[1:], "softmax", False, False, 1.0],
            [r(T, k), lg, ids.float(), "softmax", False, False, 1.0],
            [r(T, k), lg, ids, "relu", False, False, 1.0],
            [r(T, k).half().to(i64), lg, ids, "softmax", False, False, 1.0],
        ],
        "router_aux_loss": [
            [lg, ids, torch.ones(T + 1)],
            [lg, ids, torch.ones(T, dtype=torch.complex64)],
            [lg, ids_(T + 1, k, E), None],
            [lg, ids.view(-1), None],
        ],
        "router_aux_loss_backward": [
            [torch.ones(2), lg, ids, None],
            [torch.tensor(1), lg, ids, None],
            [torch.tensor(1.0), lg, ids, torch.ones(1)],
        ],
        "router_z_loss": [[r(E)], [lg.to(torch.int32)]],
        "router_z_loss_backward": [[torch.ones(3), lg], [torch.tensor(1.0), r(T)]],
        "permute": [
            [x, ids, 0],
            [x, ids, 2**31],
            [x, ids[1:], E],
            [x, ids.float(), E],
            [x.to(i64), ids, E],
            [x.view(-1), ids, E],
        ],
        "unpermute": [
            [xs, perm, r(T, k + 1)],
            [xs, perm.float(), None],
            [xs.to(i64), perm, None],
            [xs, perm, r(T, k).to(i64)],
        ],
        "unpermute_backward": [
            [r(T, H + 1), xs, perm, None, False],
            [r(T, H).double(), xs, perm, None, False],
            [r(T), xs, perm, None, False],
            [r(T, H), xs, perm, r(T + 1, k), True],
        ],
        "grouped_mm": [
            [xs, r(E, H + 1, 2), off, False, None],
            [xs, w1, off, True, None],
            [xs, w1.double(), off, False, None],
            [xs, w1, off[1:], False, None],
            [xs, w1, off.float(), False, None],
            [xs, w1, off, False, r(E, 2 * I + 1)],
            [xs, w1, off, False, r(E, 2 * I).to(i64)],
            [xs, r(E, H), off, False, None],
        ],
        "grouped_mm_weight_grad": [
            [xs, r(T * k + 1, 3), off, False],
            [xs, r(T * k, 3).double(), off, False],
            [xs, r(T * k, 3), off.view(2, 3), False],
        ],
        "grouped_bias_grad": [[r(T * k), off], [r(T * k, 3).to(i64), off], [r(T * k, 3), off.view(3, 2)]],
        "gated_activation": [
            [r(3, 5), "swiglu", "concat", 1.702, 7.0],
            [r(3, 4), "relu", "concat", 1.702, 7.0],
            [r(3, 4), "swiglu", "stacked", 1.702, 7.0],
            [r(3, 4).to(i64), "swiglu", "concat", 1.702, 7.0],
            [torch.tensor(1.0), "swiglu", "concat", 1.702, 7.0],
        ],
        "gated_activation_backward": [
            [r(3, 3), r(3, 4), "swiglu", "concat", 1.702, 7.0],
            [r(3, 2).to(i64), r(3, 4), "swiglu", "concat", 1.702, 7.0],
            [r(3, 2), r(3, 5), "swiglu", "concat", 1.702, 7.0],
        ],
        "moe_experts": [
            [x, ids, r(T, k), w1, r(E, I + 1, H), None, None, "swiglu", "concat", False, 1.7, 7.0],
            [x, ids, r(T, k), w1.double(), w2, None, None, "swiglu", "concat", False, 1.7, 7.0],
            [x, ids, r(T, k + 1), w1, w2, None, None, "swiglu", "concat", False, 1.7, 7.0],
            [x, ids, r(T, k), w1, w2, r(E, 2), None, "swiglu", "concat", False, 1.7, 7.0],
            [x, ids, r(T, k), w1, w2, None, None, "relu", "concat", False, 1.7, 7.0],
            [x, ids, r(T, k), w1, w2, None, None, "swiglu", "concat", True, 1.7, 7.0],
        ],
    }
    return [(name, i, args) for name, calls in cases.items() for i, args in enumerate(calls)]


@pytest.mark.parametrize("name,i,args", bad_args(), ids=[f"{n}-{i}" for n, i, _ in bad_args()])
def test_fake_kernels_refuse_what_the_kernels_refuse_with_the_same_message(name, i, args):
    op = getattr(O, name)
    err, _ = outcome(lambda: op(*args))
    assert err is not None and err.startswith(f"moestream.{name}: "), err
    assert outcome(lambda: op(*on("meta", args))) == (err, None)
    # FakeTensor (torch.compile's tracing) runs the same checks
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert outcome(lambda: op(*fake))[0] == err


@pytest.mark.parametrize("name,args", ok_args(), ids=[n for n, _ in ok_args()])
def test_a_meta_tensor_next_to_cpu_ones_is_an_error(name, args):
    op = getattr(O, name)
    tensors = [j for j, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for j in tensors[1:] if len(tensors) > 1 else []:
        mixed = list(args)
        mixed[j] = args[j].to("meta")
        err, _ = outcome(lambda m=mixed: op(*m))
        assert err is not None and "must be on the same device, got" in err and "meta" in err, (j, err)


@pytest.mark.parametrize(
    "name,call",
    [
        ("router_topk", lambda lg: ms.router_topk(lg, 2, normalize=True)[0].pow(2).sum()),
        ("router_aux_loss", lambda lg: ms.router_aux_loss(lg, torch.tensor([[0, 1], [2, 3], [1, 0]]))),
        ("router_z_loss", lambda lg: ms.router_z_loss(lg)),
        ("gated_activation", lambda lg: ms.gated_activation(lg, "gptoss").pow(2).sum()),
    ],
)
def test_double_backward_without_a_formula_raises(name, call):
    lg = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(call(lg), lg, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match=rf"moestream\.{name}: double backward .* is not supported"):
        g.sum().backward()
    # first order alone is unaffected by create_graph
    (g1,) = torch.autograd.grad(call(lg), lg)
    torch.testing.assert_close(g1, g.detach())


def test_unpermute_double_backward():
    T, k, E, H = 5, 2, 3, 4
    ids = ids_(T, k, E)
    x = r(T, H, dtype=f64)
    _, perm, _ = O.permute(x, ids, E)
    ys = r(T * k, H, dtype=f64).requires_grad_()
    w = torch.rand(T, k, dtype=f64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ms.unpermute(a, perm, b), (ys, w))
    assert torch.autograd.gradgradcheck(lambda a: ms.unpermute(a, perm, None), (ys,))
    # permute's backward is an unpermute: second order through it too
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: ms.permute(a, ids, E)[0], (xg,))


def test_moe_experts_op_double_backward_is_connected_or_refused():
    T, k, E, H, I = 4, 2, 3, 4, 2
    x = r(T, H, dtype=f64).requires_grad_()
    ids, w = ids_(T, k, E), torch.rand(T, k, dtype=f64)
    w1, w2 = r(E, H, 2 * I, dtype=f64), r(E, I, H, dtype=f64)
    out = O.moe_experts(x, ids, w, w1, w2, None, None, "swiglu", "concat", False, 1.7, 7.0)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    assert g.requires_grad  # the gradient stays on the graph (it was silently detached)
    with pytest.raises(RuntimeError, match=r"moestream\.gated_activation: double backward"):
        g.sum().backward()


@pytest.mark.skipif(ms.with_cuda, reason="a CPU-only build of moestream")
def test_cpu_only_build_names_itself_for_cuda_tensors():
    for name in msops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moestream::{name}", "CUDA"), name
    with pytest.raises(
        RuntimeError, match=r"moestream\.permute: got CUDA tensors, but this build of moestream has no CUDA"
    ):
        msops._no_cuda_kernel("permute")(None)


@pytest.mark.slow  # inductor compiles a forward and a backward (~20 s on 2 cores)
def test_compiled_training_with_non_contiguous_inputs():
    # the fake kernels' strides are what AOTAutograd plans the backward with: they must be the
    # kernels' (contiguous gradients), or fullgraph training with strided logits / y failed
    # (inductor asserts them: "expected ... stride ... Error in op: unpermute_backward")
    T, E, k, H = 6, 5, 2, 4
    ids0 = ids_(T, k, E)
    _, perm, _ = O.permute(r(T, 1), ids0, E)

    def step(lg, ys, x):
        w, ids = ms.router_topk(lg, k, normalize=True)
        y = ms.unpermute(ys, perm, w)
        return y.pow(2).sum() + x.sum() + ms.router_z_loss(lg) + ms.router_aux_loss(lg, ids)

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (step, compiled):
        lg = r(E, T).t().requires_grad_()
        ys = r(H, T * k).t().requires_grad_()
        x = r(1).requires_grad_()
        torch.manual_seed(0)
        for t in (lg, ys, x):
            with torch.no_grad():
                t.copy_(torch.randn(t.shape))
        fn(lg, ys, x).backward()
        grads.append([lg.grad, ys.grad, x.grad])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)
