"""permute / unpermute / unpermute_backward against moestream.reference."""

from __future__ import annotations

import os

import moestream as ms
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import reference as R

ops = torch.ops.moestream


def make_ids(
    T: int, k: int, E: int, device, dtype=torch.int64, skip: int | None = None, distinct: bool = True
):
    """Random expert ids [T, k]; distinct per token like a top-k; expert `skip` never chosen."""
    pool = [e for e in range(E) if e != skip]
    if distinct:
        rows = [torch.tensor(pool)[torch.randperm(len(pool))[:k]] for _ in range(T)]
        ids = torch.stack(rows) if T else torch.empty(0, k, dtype=torch.int64)
    else:
        ids = torch.tensor(pool)[torch.randint(len(pool), (T, k))]
    return ids.to(device=device, dtype=dtype)


# (T, H, E, k, skip): plain, zero tokens, an expert with no tokens, k = E, one expert, odd H
SHAPES = [
    (37, 64, 8, 2, None),
    (0, 16, 4, 2, None),
    (29, 33, 6, 2, 3),
    (11, 7, 4, 4, None),
    (9, 1, 1, 1, None),
    (50, 65, 16, 3, 0),
]


# ----------------------------------------------------------------------------------------------
# permute


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_E{}_k{}_skip{}".format(*s))
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_matches_reference(device, dtype, ids_dtype, shape):
    T, H, E, k, skip = shape
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = make_ids(T, k, E, device, ids_dtype, skip)
    xs, perm, offsets = ms.permute(x, ids, E)
    rxs, rperm, roffsets = R.permute(x, ids, E)
    assert xs.dtype == dtype and perm.dtype == torch.int64 and offsets.dtype == torch.int64
    assert torch.equal(perm, rperm)
    assert torch.equal(offsets, roffsets)
    assert torch.equal(xs, rxs)  # a pure copy: exact
    assert offsets.shape == (E,) and (offsets[-1].item() if E else 0) == T * k
    if skip is not None and T:
        start = offsets[skip - 1].item() if skip > 0 else 0
        assert offsets[skip].item() == start  # the expert nobody chose has an empty range


def test_permute_order_is_expert_token_slot(device):
    # duplicate ids within a token keep slot order; (expert, token, slot) is the documented order
    ids = torch.tensor([[2, 0, 2], [0, 0, 1], [2, 1, 0]], device=device)
    x = torch.arange(3, dtype=torch.float32, device=device)[:, None].expand(3, 4).contiguous()
    xs, perm, offsets = ms.permute(x, ids, 3)
    expected_pairs = sorted((ids[t, s].item(), t, s) for t in range(3) for s in range(3))
    for row, (e, t, s) in enumerate(expected_pairs):
        assert perm[t, s].item() == row
        assert xs[row, 0].item() == t
    assert offsets.tolist() == [4, 6, 9]


def test_permute_non_contiguous(device):
    T, H, E, k = 23, 17, 5, 2
    base = torch.randn(H, T, device=device)
    x = base.t()  # [T, H], transposed view
    ids_full = make_ids(T, 2 * k, E, device)
    ids = ids_full[:, ::2]  # strided view
    assert not x.is_contiguous() and not ids.is_contiguous()
    out = ms.permute(x, ids, E)
    ref = R.permute(x.contiguous(), ids.contiguous(), E)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


def test_permute_large_ids_chunks(device):
    # more (token, slot) pairs than one histogram chunk: the chunked counting sort stays stable
    T, H, E, k = 9000, 3, 7, 3
    x = torch.randn(T, H, device=device)
    ids = make_ids(T, k, E, device, distinct=False)
    for o, r in zip(ms.permute(x, ids, E), R.permute(x, ids, E)):
        assert torch.equal(o, r)


def test_permute_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]], device=device)
    with pytest.raises(RuntimeError, match=r"ids.*\[0, 4\).*got 7"):
        ms.permute(x, torch.tensor([[0, 1], [2, 7], [1, 0], [3, 2]], device=device), 4)
    with pytest.raises(RuntimeError, match=r"ids.*got -1"):
        ms.permute(x, torch.tensor([[0, 1], [2, 3], [-1, 0], [3, 2]], device=device, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match=r"ids.*\[0, 3\).*got 3"):
        ms.permute(x, ids, 3)
    with pytest.raises(RuntimeError, match="ids must be int32 or int64"):
        ms.permute(x, ids.float(), 4)
    with pytest.raises(RuntimeError, match="x must have 2 dimensions"):
        ms.permute(x[0], ids, 4)
    with pytest.raises(RuntimeError, match="ids must have 2 dimensions"):
        ms.permute(x, ids[0], 4)
    with pytest.raises(RuntimeError, match="ids must have one row per token"):
        ms.permute(x, ids[:3], 4)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1"):
        ms.permute(x, ids, 0)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ms.permute(x.long(), ids, 4)


# ----------------------------------------------------------------------------------------------
# unpermute


def _sorted_and_perm(T, k, E, H, device, dtype, skip=None):
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = make_ids(T, k, E, device, skip=skip)
    xs, perm, offsets = ms.permute(x, ids, E)
    # y_sorted: fresh values (an expert's output), not x's copies
    return torch.randn_like(xs), perm


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_E{}_k{}_skip{}".format(*s))
@pytest.mark.parametrize("wdtype", [None, torch.float32, "same"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_matches_reference(device, dtype, wdtype, shape):
    T, H, E, k, skip = shape
    ys, perm = _sorted_and_perm(T, k, E, H, device, dtype, skip)
    w = None
    if wdtype is not None:
        w = torch.rand(T, k, device=device, dtype=dtype if wdtype == "same" else wdtype)
    out = ms.unpermute(ys, perm, w)
    assert out.dtype == dtype and out.shape == (T, H)
    ref64 = R.unpermute(ys.double(), perm, None if w is None else w.double())
    ref_lowp = R.unpermute(ys, perm, w)
    assert_accurate(out, ref64, ref_lowp, "unpermute")


def test_unpermute_non_contiguous(device):
    T, H, E, k = 19, 33, 4, 2
    ys, perm = _sorted_and_perm(T, k, E, H, device, torch.float32)
    ys_t = ys.t().contiguous().t()  # same values, column-major
    perm_nc = torch.stack([perm, perm], dim=2)[:, :, 0]
    w = torch.rand(k, T, device=device).t()
    assert not ys_t.is_contiguous() and not perm_nc.is_contiguous() and not w.is_contiguous()
    out = ms.unpermute(ys_t, perm_nc, w)
    assert_accurate(out, R.unpermute(ys.double(), perm, w.double()))


def test_unpermute_accumulates_in_slot_order(device):
    # bf16 inputs whose float32 sum is exact but whose bf16 running sum would not be
    ys = torch.tensor([[1.0], [2.0**-8], [2.0**-8]], device=device, dtype=torch.bfloat16)
    perm = torch.tensor([[0, 1, 2]], device=device)
    out = ms.unpermute(ys, perm, None)
    assert out.item() == 1.0 + 2.0**-7  # a bf16 running sum would round back to 1.0 twice


def test_permute_num_experts_beyond_memory_is_an_error():
    # offsets [E] and the expert counts would be allocated (overcommit lets that pass) and then
    # touched: the process was killed by the OOM killer instead of raising
    E = 2**31 - 2
    if os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >= 2 * 8 * E:
        pytest.skip("this machine has memory for the offsets of 2^31 - 2 experts")
    x, ids = torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(
        RuntimeError, match=r"moestream.permute: num_experts = 2147483646 needs \d+ MiB .* memory"
    ):
        ms.permute(x, ids, E)


def test_unpermute_bad_inputs(device):
    ys = torch.randn(6, 4, device=device)
    perm = torch.arange(6, device=device).view(3, 2)
    with pytest.raises(RuntimeError, match=r"perm must lie in \[0, N\) = \[0, 6\).*got 6"):
        ms.unpermute(ys, perm + 1)
    with pytest.raises(RuntimeError, match="perm.*got -1"):
        ms.unpermute(ys, perm - 1)
    with pytest.raises(RuntimeError, match="weights must have perm's shape"):
        ms.unpermute(ys, perm, torch.rand(3, 3, device=device))
    with pytest.raises(RuntimeError, match="weights must be float32"):
        ms.unpermute(ys, perm, torch.ones(3, 2, device=device, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="perm must be int32 or int64"):
        ms.unpermute(ys, perm.float())
    with pytest.raises(RuntimeError, match="y_sorted must have 2 dimensions"):
        ms.unpermute(ys[0], perm)
    with pytest.raises(RuntimeError, match="perm must have 2 dimensions"):
        ms.unpermute(ys, perm.view(-1))


# ----------------------------------------------------------------------------------------------
# unpermute backward


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_backward_matches_reference(device, dtype, with_weights):
    T, H, E, k = 21, 33, 6, 3
    ys, perm = _sorted_and_perm(T, k, E, H, device, dtype, skip=2)
    w = torch.rand(T, k, device=device) if with_weights else None
    gy = torch.randn(T, H, device=device, dtype=dtype)

    def ref_grads(ys_, w_, gy_):
        ys_ = ys_.detach().requires_grad_()
        w_ = None if w_ is None else w_.detach().requires_grad_()
        R.unpermute(ys_, perm, w_).backward(gy_)
        return ys_.grad, (None if w_ is None else w_.grad)

    r64 = ref_grads(ys.double(), None if w is None else w.double(), gy.double())
    rlp = ref_grads(ys, w, gy)

    ys_ = ys.clone().requires_grad_()
    w_ = None if w is None else w.clone().requires_grad_()
    ms.unpermute(ys_, perm, w_).backward(gy)
    assert ys_.grad.dtype == dtype
    assert_accurate(ys_.grad, r64[0], rlp[0], "grad y_sorted")
    if with_weights:
        assert w_.grad.dtype == w.dtype
        assert_accurate(w_.grad, r64[1], rlp[1].float(), "grad weights")


def test_unpermute_backward_op_direct(device):
    # rows that no perm entry references get zero; a row referenced twice gets the sum
    ys = torch.randn(7, 5, device=device)
    perm = torch.tensor([[4, 1], [1, 6]], device=device)
    w = torch.rand(2, 2, device=device)
    gy = torch.randn(2, 5, device=device)
    gys, gw = ops.unpermute_backward(gy, ys, perm, w, True)
    expect = torch.zeros(7, 5, device=device)
    expect[4] = w[0, 0] * gy[0]
    expect[1] = w[0, 1] * gy[0] + w[1, 0] * gy[1]
    expect[6] = w[1, 1] * gy[1]
    torch.testing.assert_close(gys, expect)
    torch.testing.assert_close(gw, (gy[:, None, :] * ys[perm]).sum(-1))
    assert gw.dtype == torch.float32
    _, gw_none = ops.unpermute_backward(gy, ys, perm, w, False)
    assert gw_none.shape == (0,)
    _, gw_none = ops.unpermute_backward(gy, ys, perm, None, True)
    assert gw_none.shape == (0,)
    gys64, gw64 = ops.unpermute_backward(gy.double(), ys.double(), perm, w, True)
    assert gys64.dtype == torch.float64 and gw64.dtype == torch.float64


def test_unpermute_backward_bad_inputs(device):
    ys = torch.randn(6, 4, device=device)
    perm = torch.arange(6, device=device).view(3, 2)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[3, 4\]"):
        ops.unpermute_backward(torch.randn(2, 4, device=device), ys, perm, None, False)
    with pytest.raises(RuntimeError, match="grad_y must have y_sorted's dtype"):
        ops.unpermute_backward(torch.randn(3, 4, device=device, dtype=torch.float64), ys, perm, None, False)
    with pytest.raises(RuntimeError, match=r"perm must lie in \[0, N\)"):
        ops.unpermute_backward(torch.randn(3, 4, device=device), ys, perm * 2, None, False)


# ----------------------------------------------------------------------------------------------
# autograd through the public functions, and the op contracts


def test_gradcheck_permute_unpermute(device):
    T, H, E, k = 6, 5, 4, 2
    ids = make_ids(T, k, E, device, skip=1)
    x = torch.randn(T, H, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, device=device, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(T * k, H, device=device, dtype=torch.float64)

    def f(x, w):
        xs, perm, _ = ms.permute(x, ids, E)
        return ms.unpermute(xs * scale, perm, w)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradcheck(
        lambda x: ms.unpermute(ms.permute(x, ids, E)[0], ms.permute(x, ids, E)[1]), (x,)
    )


def test_gradcheck_unpermute(device):
    T, H, E, k = 5, 4, 3, 3
    ys, perm = _sorted_and_perm(T, k, E, H, device, torch.float64)
    ys.requires_grad_()
    w = torch.rand(T, k, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: ms.unpermute(y, perm, w), (ys, w))
    assert torch.autograd.gradcheck(lambda y: ms.unpermute(y, perm, None), (ys,))


def test_opcheck(device):
    T, H, E, k = 7, 6, 4, 2
    x = torch.randn(T, H, device=device, requires_grad=True)
    ids = make_ids(T, k, E, device, dtype=torch.int32)
    torch.library.opcheck(ops.permute.default, (x, ids, E))
    xs, perm, _ = ms.permute(x.detach(), ids, E)
    ys = torch.randn_like(xs).requires_grad_()
    w = torch.rand(T, k, device=device, requires_grad=True)
    torch.library.opcheck(ops.unpermute.default, (ys, perm, w))
    torch.library.opcheck(ops.unpermute.default, (ys, perm, None))
    gy = torch.randn(T, H, device=device)
    torch.library.opcheck(ops.unpermute_backward.default, (gy, ys.detach(), perm, w.detach(), True))
    torch.library.opcheck(ops.unpermute_backward.default, (gy, ys.detach(), perm, None, False))
