"""grouped_mm, grouped_mm_weight_grad and grouped_bias_grad against moestream.reference."""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import reference as R

ops = torch.ops.moestream


def make_offsets(counts, device, dtype=torch.int64):
    return torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(device=device, dtype=dtype)


def make_b(E, K, N, transpose_b, device, dtype, layout="contiguous"):
    """b [E, K, N] ([E, N, K] with transpose_b). layout "flipped" stores it with the other dimension
    contiguous (a .transpose view), "strided" with no unit stride at all."""
    shape = (E, N, K) if transpose_b else (E, K, N)
    if layout == "contiguous":
        return torch.randn(shape, device=device, dtype=dtype)
    if layout == "flipped":
        return torch.randn(shape[0], shape[2], shape[1], device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape[0], 2 * shape[1], 2 * shape[2], device=device, dtype=dtype)[:, ::2, ::2]


def check_forward(a, b, offsets, transpose_b, bias):
    out = ms.grouped_mm(a, b, offsets, transpose_b, bias)
    ref64 = R.grouped_mm(
        a.double(), b.double(), offsets, transpose_b, None if bias is None else bias.double()
    )
    ref_lowp = R.grouped_mm(a, b, offsets, transpose_b, bias)
    assert out.dtype == a.dtype and out.shape == ref64.shape
    assert_accurate(out, ref64, ref_lowp, "grouped_mm")
    used = offsets[-1].item() if offsets.numel() else 0
    assert (out[used:] == 0).all()
    return out


# (counts per group, M, K, N): decode-like small groups (the small-row kernels), large groups
# (conversion + SGEMM for bf16/fp16), an empty group, offsets[-1] < M, odd sizes, one group,
# no rows at all
CASES = [
    ([2, 1, 0, 3, 2, 5, 8, 4], 25, 64, 48),
    ([40, 0, 37, 19], 96, 33, 70),
    ([3, 9, 0, 12], 30, 7, 33),
    ([13], 13, 1, 7),
    ([0, 0, 5], 5, 9, 1),
    ([0, 0], 4, 8, 8),
    ([3], 3, 40, 300),  # one expert at decode: the small-row kernels split the columns
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[1]}_K{c[2]}_N{c[3]}_E{len(c[0])}")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_matches_reference(device, dtype, transpose_b, with_bias, case):
    counts, M, K, N = case
    E = len(counts)
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = make_b(E, K, N, transpose_b, device, dtype)
    bias = torch.randn(E, N, device=device, dtype=dtype) if with_bias else None
    for odt in (torch.int64, torch.int32):
        check_forward(a, b, make_offsets(counts, device, odt), transpose_b, bias)


@pytest.mark.parametrize("layout", ["flipped", "strided"])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_non_contiguous(device, dtype, transpose_b, layout):
    counts, K, N = [1, 6, 0, 30, 2], 24, 40
    E, M = len(counts), sum(counts) + 3
    a = torch.randn(K, M, device=device, dtype=dtype).t()  # column-major a
    b = make_b(E, K, N, transpose_b, device, dtype, layout)
    bias = torch.randn(N, E, device=device, dtype=dtype).t()
    assert not a.is_contiguous() and not b.is_contiguous() and not bias.is_contiguous()
    check_forward(a, b, make_offsets(counts, device), transpose_b, bias)
    check_forward(a, b, make_offsets(counts, device), transpose_b, None)


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_thread_counts_agree(device, dtype, transpose_b):
    # enough work for the split schedule (one row range per thread, cutting groups) with two
    # threads; one thread runs the groups one by one
    counts, K, N = [5, 150, 0, 90, 2, 1], 64, 72
    a = torch.randn(sum(counts), K, device=device, dtype=dtype)
    b = make_b(len(counts), K, N, transpose_b, device, dtype)
    bias = torch.randn(len(counts), N, device=device, dtype=dtype)
    offsets = make_offsets(counts, device)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = check_forward(a, b, offsets, transpose_b, bias)
        torch.set_num_threads(max(2, n))
        many = check_forward(a, b, offsets, transpose_b, bias)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, many)


def test_grouped_mm_zero_rows(device):
    a = torch.randn(0, 8, device=device)
    b = torch.randn(3, 8, 5, device=device)
    out = ms.grouped_mm(a, b, torch.zeros(3, dtype=torch.int64, device=device))
    assert out.shape == (0, 5)


# ----------------------------------------------------------------------------------------------
# backward: weight and bias gradients, and the gradient of a


def ref_grads(a, b, offsets, transpose_b, bias, g):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    R.grouped_mm(a, b, offsets, transpose_b, bias).backward(g)
    return a.grad, b.grad, (None if bias is None else bias.grad)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"M{c[1]}_K{c[2]}_N{c[3]}_E{len(c[0])}")
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_backward_matches_reference(device, dtype, transpose_b, case):
    counts, M, K, N = case
    E = len(counts)
    offsets = make_offsets(counts, device)
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = make_b(E, K, N, transpose_b, device, dtype)
    bias = torch.randn(E, N, device=device, dtype=dtype)
    g = torch.randn(M, N, device=device, dtype=dtype)
    r64 = ref_grads(a.double(), b.double(), offsets, transpose_b, bias.double(), g.double())
    rlp = ref_grads(a, b, offsets, transpose_b, bias, g)
    a_, b_, bias_ = (t.clone().requires_grad_() for t in (a, b, bias))
    ms.grouped_mm(a_, b_, offsets, transpose_b, bias_).backward(g)
    for got, want64, want_lp, name in zip((a_.grad, b_.grad, bias_.grad), r64, rlp, ("a", "b", "bias")):
        assert got.dtype == dtype and got.shape == want64.shape
        assert_accurate(got, want64, want_lp, f"grad {name}")
    # groups without rows get zero weight and bias gradients
    for e, c in enumerate(counts):
        if c == 0:
            assert (b_.grad[e] == 0).all() and (bias_.grad[e] == 0).all()


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_op_direct(device, dtype, transpose_b):
    counts, K, N = [4, 0, 50, 3], 9, 17
    offsets = make_offsets(counts, device, torch.int32)
    M = sum(counts) + 2
    a = torch.randn(K, M, device=device, dtype=dtype).t()  # non-contiguous
    dy = torch.randn(M, N, device=device, dtype=dtype)
    gb = ops.grouped_mm_weight_grad(a, dy, offsets, transpose_b)
    assert gb.shape == ((len(counts), N, K) if transpose_b else (len(counts), K, N)) and gb.dtype == dtype

    def ref(a, dy):
        blocks, start = [], 0
        for end in offsets.tolist():
            w = a[start:end].double().t() @ dy[start:end].double()
            blocks.append(w.t() if transpose_b else w)
            start = end
        return torch.stack(blocks)

    ref_lowp = torch.stack(
        [
            (
                (a[s:e].float().t() @ dy[s:e].float()).t()
                if transpose_b
                else a[s:e].float().t() @ dy[s:e].float()
            ).to(dtype)
            for s, e in zip([0] + offsets.tolist()[:-1], offsets.tolist())
        ]
    )
    assert_accurate(gb, ref(a, dy), ref_lowp, "weight grad")
    gbias = ops.grouped_bias_grad(dy, offsets)
    ref_bias = torch.stack(
        [dy[s:e].double().sum(0) for s, e in zip([0] + offsets.tolist()[:-1], offsets.tolist())]
    )
    ref_bias_lp = torch.stack(
        [dy[s:e].float().sum(0).to(dtype) for s, e in zip([0] + offsets.tolist()[:-1], offsets.tolist())]
    )
    assert gbias.dtype == dtype
    assert_accurate(gbias, ref_bias, ref_bias_lp, "bias grad")


def test_gradcheck_grouped_mm(device):
    counts, K, N = [2, 0, 3, 1], 3, 4
    E, M = len(counts), sum(counts) + 1
    offsets = make_offsets(counts, device)
    for transpose_b in (False, True):
        a = torch.randn(M, K, device=device, dtype=torch.float64, requires_grad=True)
        b = make_b(E, K, N, transpose_b, device, torch.float64).requires_grad_()
        bias = torch.randn(E, N, device=device, dtype=torch.float64, requires_grad=True)

        def f(a, b, bias):
            return ms.grouped_mm(a, b, offsets, transpose_b, bias)

        assert torch.autograd.gradcheck(f, (a, b, bias))
        assert torch.autograd.gradgradcheck(f, (a, b, bias))
        assert torch.autograd.gradcheck(lambda a, b: ms.grouped_mm(a, b, offsets, transpose_b), (a, b))


def test_opcheck(device):
    counts, K, N = [2, 0, 5], 6, 7
    E, M = len(counts), sum(counts) + 1
    offsets = make_offsets(counts, device)
    for transpose_b in (False, True):
        a = torch.randn(M, K, device=device, requires_grad=True)
        b = make_b(E, K, N, transpose_b, device, torch.float32).requires_grad_()
        bias = torch.randn(E, N, device=device, requires_grad=True)
        torch.library.opcheck(ops.grouped_mm.default, (a, b, offsets, transpose_b, bias))
        torch.library.opcheck(ops.grouped_mm.default, (a, b, offsets.int(), transpose_b, None))
        dy = torch.randn(M, N, device=device, requires_grad=True)
        torch.library.opcheck(ops.grouped_mm_weight_grad.default, (a, dy, offsets, transpose_b))
    torch.library.opcheck(ops.grouped_bias_grad.default, (torch.randn(M, N, device=device), offsets))


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_grouped_mm_bad_inputs(device):
    a = torch.randn(6, 4, device=device)
    b = torch.randn(2, 4, 3, device=device)
    offs = torch.tensor([2, 6], device=device)
    with pytest.raises(RuntimeError, match="a must have 2 dimensions"):
        ms.grouped_mm(a[0], b, offs)
    with pytest.raises(RuntimeError, match="b must have 3 dimensions"):
        ms.grouped_mm(a, b[0], offs)
    with pytest.raises(RuntimeError, match=r"a and b must have the same dtype, got a Float and b BFloat16"):
        ms.grouped_mm(a, b.bfloat16(), offs)
    with pytest.raises(RuntimeError, match=r"inner dimensions differ.*K = 4 vs 3"):
        ms.grouped_mm(a, b, offs, transpose_b=True)
    with pytest.raises(RuntimeError, match="offsets must have 1 dimensions"):
        ms.grouped_mm(a, b, offs[None])
    with pytest.raises(RuntimeError, match=r"offsets must have one entry per group \(2\)"):
        ms.grouped_mm(a, b, torch.tensor([2, 4, 6], device=device))
    with pytest.raises(RuntimeError, match="offsets must be int32 or int64"):
        ms.grouped_mm(a, b, offs.float())
    with pytest.raises(RuntimeError, match=r"offsets do not add up.*offsets\[1\] = 1 after offsets\[0\] = 2"):
        ms.grouped_mm(a, b, torch.tensor([2, 1], device=device))
    with pytest.raises(RuntimeError, match=r"offsets do not add up.*offsets\[0\] = -1"):
        ms.grouped_mm(a, b, torch.tensor([-1, 3], device=device))
    with pytest.raises(
        RuntimeError, match=r"offsets do not add up: offsets\[-1\] = 7 exceeds the 6 rows of a"
    ):
        ms.grouped_mm(a, b, torch.tensor([2, 7], device=device, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[2, 3\]"):
        ms.grouped_mm(a, b, offs, False, torch.randn(2, 4, device=device))
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ms.grouped_mm(a, b, offs, False, torch.ones(2, 3, device=device, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="a must be float32"):
        ms.grouped_mm(a.long(), b.long(), offs)


def test_grad_ops_bad_inputs(device):
    a = torch.randn(6, 4, device=device)
    dy = torch.randn(6, 3, device=device)
    offs = torch.tensor([2, 6], device=device)
    with pytest.raises(RuntimeError, match="grad_out must have a's 6 rows"):
        ops.grouped_mm_weight_grad(a, dy[:5], offs, False)
    with pytest.raises(RuntimeError, match="a and grad_out must have the same dtype"):
        ops.grouped_mm_weight_grad(a, dy.double(), offs, False)
    with pytest.raises(RuntimeError, match="offsets do not add up"):
        ops.grouped_mm_weight_grad(a, dy, torch.tensor([4, 2], device=device), False)
    with pytest.raises(RuntimeError, match="offsets do not add up.*rows of grad_out"):
        ops.grouped_bias_grad(dy, torch.tensor([2, 9], device=device))
    with pytest.raises(RuntimeError, match="grad_out must have 2 dimensions"):
        ops.grouped_bias_grad(dy[0], offs)
