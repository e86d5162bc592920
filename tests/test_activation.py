"""gated_activation and gated_activation_backward against the reference, every dtype, kind and layout."""

from __future__ import annotations

import moestream
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import reference

KINDS = ["swiglu", "geglu", "gptoss"]
LAYOUTS = ["concat", "interleaved"]
ALPHA, LIMIT = 1.702, 2.5  # a small limit so that the clamps of "gptoss" are exercised


def _x(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def _ref_grad(x, grad, kind, layout):
    """Autograd of the reference at x's dtype (the reference computes in float32 / float64)."""
    xr = x.detach().clone().requires_grad_(True)
    out = reference.gated_activation(xr, kind, layout, ALPHA, LIMIT)
    (g,) = torch.autograd.grad(out, xr, grad.to(out.dtype))
    return g


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_reference(device, dtype, kind, layout):
    # odd intermediate size (37) leaves vector tails; 3-D input checks the leading dims
    x = _x((3, 11, 2 * 37), dtype, device)
    out = moestream.gated_activation(x, kind, layout, ALPHA, LIMIT)
    assert out.shape == (3, 11, 37) and out.dtype == dtype and out.device == x.device
    ref64 = reference.gated_activation(x.double(), kind, layout, ALPHA, LIMIT)
    ref_lowp = reference.gated_activation(x, kind, layout, ALPHA, LIMIT)
    assert_accurate(out, ref64, ref_lowp, what=f"{kind}/{layout}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_reference(device, dtype, kind, layout):
    x = _x((29, 2 * 45), dtype, device)
    grad = torch.randn(29, 45, dtype=dtype, device=device)
    gx = torch.ops.moestream.gated_activation_backward(grad, x, kind, layout, ALPHA, LIMIT)
    assert gx.shape == x.shape and gx.dtype == dtype
    ref64 = _ref_grad(x.double(), grad.double(), kind, layout)
    ref_lowp = _ref_grad(x, grad, kind, layout)
    assert_accurate(gx, ref64, ref_lowp, what=f"grad {kind}/{layout}/{dtype}")


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_matches_reference(device, kind):
    x = _x((7, 2 * 20), torch.float32, device).requires_grad_(True)
    out = moestream.gated_activation(x, kind, "interleaved", ALPHA, LIMIT)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    ref64 = _ref_grad(x.detach().double(), grad.double(), kind, "interleaved")
    assert_accurate(gx, ref64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gptoss_clamp_gradient_passes_at_the_bounds(device, layout):
    # torch.clamp's backward passes the gradient where min <= x <= max, bounds included
    g = torch.tensor([LIMIT, LIMIT + 0.5, LIMIT - 0.5, -LIMIT, 0.3, 0.3], dtype=torch.float64)
    u = torch.tensor([0.2, 0.2, 0.2, 0.2, LIMIT, -LIMIT - 0.5], dtype=torch.float64)
    x = torch.cat([g, u]) if layout == "concat" else torch.stack([g, u], 1).reshape(-1)
    x = x.to(device)
    grad = torch.ones(6, dtype=torch.float64, device=device)
    gx = torch.ops.moestream.gated_activation_backward(grad, x, "gptoss", layout, ALPHA, LIMIT)
    ref = _ref_grad(x, grad, "gptoss", layout)
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)
    dg = gx[:6] if layout == "concat" else gx[0::2]
    du = gx[6:] if layout == "concat" else gx[1::2]
    assert dg[0] != 0 and dg[1] == 0 and dg[2] != 0  # g == limit passes, g > limit is cut
    assert du[4] != 0 and du[5] == 0  # u == limit passes, u < -limit is cut


def test_non_contiguous_inputs(device):
    base = _x((2 * 24, 9), torch.float32, device)
    x = base.t()  # [9, 48], strides (1, 9)
    assert not x.is_contiguous()
    for kind in KINDS:
        out = moestream.gated_activation(x, kind, "concat", ALPHA, LIMIT)
        assert_accurate(out, reference.gated_activation(x.double(), kind, "concat", ALPHA, LIMIT))
        grad = torch.randn(24, 9, device=device).t()
        gx = torch.ops.moestream.gated_activation_backward(grad, x, kind, "interleaved", ALPHA, LIMIT)
        assert_accurate(gx, _ref_grad(x.double(), grad.double(), kind, "interleaved"))


def test_large_rows_parallel(device):
    # enough rows for several parallel chunks; values large enough to saturate exp
    x = _x((300, 2 * 130), torch.float32, device, scale=30.0)
    for kind in KINDS:
        out = moestream.gated_activation(x, kind, "interleaved", ALPHA, LIMIT)
        assert_accurate(out, reference.gated_activation(x.double(), kind, "interleaved", ALPHA, LIMIT))


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 6)])
def test_empty(device, shape):
    x = torch.randn(shape, device=device)
    out = moestream.gated_activation(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    gx = torch.ops.moestream.gated_activation_backward(
        torch.randn(out.shape, device=device), x, "swiglu", "concat", ALPHA, LIMIT
    )
    assert gx.shape == x.shape


def test_deterministic(device):
    x = _x((64, 2 * 96), torch.bfloat16, device)
    a = moestream.gated_activation(x, "gptoss", "interleaved", ALPHA, LIMIT)
    b = moestream.gated_activation(x, "gptoss", "interleaved", ALPHA, LIMIT)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(device, kind, layout):
    x = torch.randn(3, 2 * 6, dtype=torch.float64, device=device) * 2
    if kind == "gptoss":
        # values near the clamp bounds (but not within gradcheck's eps of them)
        near = torch.tensor([LIMIT - 1e-3, LIMIT + 1e-3, -LIMIT - 1e-3, -LIMIT + 1e-3], dtype=torch.float64)
        x[0, :4] = near.to(device)
        x[1, -4:] = near.to(device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: moestream.gated_activation(t, kind, layout, ALPHA, LIMIT), (x,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(device, dtype, kind):
    x = _x((5, 2 * 12), dtype, device).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.moestream.gated_activation.default, (x, kind, "interleaved", ALPHA, LIMIT)
    )
    grad = torch.randn(5, 12, dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.moestream.gated_activation_backward.default,
        (grad, x.detach(), kind, "concat", ALPHA, LIMIT),
    )


def test_compile(device):
    x = _x((6, 2 * 16), torch.float32, device).requires_grad_(True)
    f = torch.compile(
        lambda t: moestream.gated_activation(t, "swiglu", "concat"), fullgraph=True, backend="aot_eager"
    )
    out = f(x)
    out.sum().backward()
    xr = x.detach().double().requires_grad_(True)
    ref = reference.gated_activation(xr, "swiglu", "concat")
    ref.sum().backward()
    assert_accurate(out, ref)
    assert_accurate(x.grad, xr.grad)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input(device):
    ga = torch.ops.moestream.gated_activation
    gab = torch.ops.moestream.gated_activation_backward
    x = torch.randn(4, 10, device=device)
    with pytest.raises(RuntimeError, match=r"gated_activation: x's last dimension must be even.*\[4, 9\]"):
        ga(torch.randn(4, 9, device=device), "swiglu", "concat", ALPHA, LIMIT)
    with pytest.raises(
        RuntimeError, match=r"kind must be one of \"swiglu\", \"geglu\", \"gptoss\", got \"relu\""
    ):
        ga(x, "relu", "concat", ALPHA, LIMIT)
    with pytest.raises(
        RuntimeError, match=r"layout must be one of \"concat\", \"interleaved\", got \"split\""
    ):
        ga(x, "swiglu", "split", ALPHA, LIMIT)
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16, float16 or float64"):
        ga(torch.ones(4, 10, dtype=torch.int32, device=device), "swiglu", "concat", ALPHA, LIMIT)
    with pytest.raises(RuntimeError, match=r"x must have at least 1 dimension"):
        ga(torch.tensor(1.0, device=device), "swiglu", "concat", ALPHA, LIMIT)
    with pytest.raises(
        RuntimeError, match=r"gated_activation_backward: grad must have x's shape.*\[4, 5\].*\[4, 4\]"
    ):
        gab(torch.randn(4, 4, device=device), x, "swiglu", "concat", ALPHA, LIMIT)
    with pytest.raises(RuntimeError, match=r"gated_activation_backward: x's last dimension must be even"):
        gab(
            torch.randn(4, 4, device=device),
            torch.randn(4, 9, device=device),
            "swiglu",
            "concat",
            ALPHA,
            LIMIT,
        )
    with pytest.raises(RuntimeError, match=r"gated_activation_backward: kind must be one of"):
        gab(torch.randn(4, 5, device=device), x, "silu", "concat", ALPHA, LIMIT)
