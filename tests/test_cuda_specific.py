"""CUDA-only checks the per-area tests do not cover: large inputs against the CPU, bitwise
determinism, no host synchronisation (sync debug mode and CUDA graph capture), the scalar fallbacks
of the vectorised kernels (odd and misaligned hidden sizes), the router's register / streaming paths
and the lazy handling of out-of-range ids. Skipped without a CUDA device and a CUDA build."""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from conftest import assert_accurate, cuda
from moestream import reference as ref
from moestream._tuning import tuning

pytestmark = [cuda, pytest.mark.cuda]

ops = torch.ops.moestream
DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_input_checks():
    # the default: CUDA ops validate values lazily and never synchronise
    with tuning(check_inputs=False):
        yield


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------------------------------
# permute / unpermute


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_permute_large_matches_cpu(ids_dtype):
    T, k, E, H = 65536, 8, 128, 64
    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, k), dtype=ids_dtype)
    ids[ids == 7] = 8  # expert 7 gets no tokens
    xs, perm, offsets = ms.permute(x.to(DEV), ids.to(DEV), E)
    rxs, rperm, roffsets = ref.permute(x, ids, E)
    assert torch.equal(perm.cpu(), rperm)
    assert torch.equal(offsets.cpu(), roffsets)
    assert torch.equal(xs.cpu(), rxs)
    assert offsets[-1].item() == T * k
    # the CPU kernel agrees exactly too
    cxs, cperm, coffsets = ms.permute(x, ids, E)
    assert torch.equal(cperm, perm.cpu()) and torch.equal(coffsets, offsets.cpu())
    assert torch.equal(cxs, xs.cpu())


# k = 8: 64 tokens (512 entries) take the single-block path, 65 tokens (520) the radix sort
@pytest.mark.parametrize("n_tokens", [64, 65, 1, 3000])
def test_permute_small_and_sorted_paths(n_tokens):
    k, E, H = 8, 16, 24
    x = torch.randn(n_tokens, H)
    ids = torch.randint(0, E, (n_tokens, k))
    xs, perm, offsets = ms.permute(x.to(DEV), ids.to(DEV), E)
    rxs, rperm, roffsets = ref.permute(x, ids, E)
    assert torch.equal(perm.cpu(), rperm) and torch.equal(offsets.cpu(), roffsets)
    assert torch.equal(xs.cpu(), rxs)


@pytest.mark.parametrize("H", [1, 7, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("misaligned", [False, True])
def test_permute_unpermute_odd_hidden(H, dtype, misaligned):
    T, k, E = 300, 3, 10
    x = torch.randn(T, H, dtype=dtype)
    ids = torch.randint(0, E, (T, k))
    xd = x.to(DEV)
    if misaligned:
        xd = _misaligned(xd)
    xs, perm, offsets = ms.permute(xd, ids.to(DEV), E)
    rxs, rperm, _ = ref.permute(x, ids, E)
    assert torch.equal(xs.cpu(), rxs) and torch.equal(perm.cpu(), rperm)

    y_sorted = torch.randn(T * k, H, dtype=dtype)
    w = torch.rand(T, k)
    yd = _misaligned(y_sorted.to(DEV)) if misaligned else y_sorted.to(DEV)
    y = ms.unpermute(yd, perm, w.to(DEV))
    ref64 = ref.unpermute(y_sorted.double(), rperm, w.double())
    ref_lp = ref.unpermute(y_sorted, rperm, w)
    assert_accurate(y, ref64, ref_lp, "unpermute")

    gy = torch.randn(T, H, dtype=dtype)
    gyd = _misaligned(gy.to(DEV)) if misaligned else gy.to(DEV)
    gys, gw = ops.unpermute_backward(gyd, yd, perm, w.to(DEV), True)
    # reference gradients through autograd of the reference, in float64
    ys64 = y_sorted.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    out = ref.unpermute(ys64, rperm, w64)
    g_ys, g_w = torch.autograd.grad(out, (ys64, w64), gy.double())
    assert_accurate(gys, g_ys, (g_ys.to(dtype)), "grad_y_sorted")
    assert gw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    assert (gw.cpu().double() - g_w).norm() <= tol * g_w.norm()


def test_unpermute_backward_zeroes_unreferenced_rows():
    T, k, H = 50, 2, 40
    N = T * k + 17  # padded y_sorted: the last rows are named by no perm entry
    perm = torch.randperm(T * k, device=DEV).view(T, k)
    y_sorted = torch.randn(N, H, device=DEV)
    gys, _ = ops.unpermute_backward(torch.randn(T, H, device=DEV), y_sorted, perm, None, False)
    assert torch.count_nonzero(gys[T * k :]) == 0
    assert torch.count_nonzero(gys[: T * k]) > 0


def test_unpermute_large_matches_cpu():
    T, k, E, H = 65536, 4, 64, 32
    ids = torch.randint(0, E, (T, k))
    _, perm, _ = ref.permute(torch.empty(T, 0), ids, E)
    y_sorted = torch.randn(T * k, H, dtype=torch.bfloat16)
    w = torch.rand(T, k)
    y = ms.unpermute(y_sorted.to(DEV), perm.to(DEV), w.to(DEV))
    assert_accurate(
        y, ref.unpermute(y_sorted.double(), perm, w.double()), ref.unpermute(y_sorted, perm, w), "unpermute"
    )


def test_permute_out_of_range_ids_are_dropped_safely():
    T, k, E, H = 700, 2, 8, 16
    x = torch.randn(T, H, device=DEV)
    ids = torch.randint(0, E, (T, k), device=DEV)
    ids[3, 1] = E + 5
    ids[10, 0] = -1
    xs, perm, offsets = ms.permute(x, ids, E)  # no exception, no illegal access
    valid = (ids >= 0) & (ids < E)
    assert offsets[-1].item() == int(valid.sum())
    # valid entries are placed exactly as the reference places them after removing the bad ones
    assert torch.equal(xs[perm[valid]], x[valid.nonzero()[:, 0]])
    for e in range(E):
        lo = 0 if e == 0 else offsets[e - 1].item()
        rows = perm[ids == e]
        assert rows.numel() == offsets[e].item() - lo
        assert bool(((rows >= lo) & (rows < offsets[e])).all())
    torch.cuda.synchronize()
    with tuning(check_inputs=True), pytest.raises(RuntimeError, match="ids"):
        ms.permute(x, ids, E)


# ---------------------------------------------------------------------------------------------------
# router


ROUTER_CASES = [
    # E, k, score, topk_first, bias, groups, topk_groups, normalize, scale
    (256, 8, "sigmoid", False, True, 8, 4, True, 2.5),  # DeepSeek-V3 shape
    (512, 16, "softmax", False, False, 1, 1, True, 1.0),  # largest register path
    (64, 40, "softmax", False, False, 1, 1, False, 1.0),  # k > 32
    (1024, 8, "sigmoid", False, True, 16, 4, True, 2.5),  # streaming path with groups
    (600, 36, "softmax", True, False, 1, 1, False, 1.0),  # streaming path, k > 32, softmax over the k
    (128, 4, "softmax", True, True, 1, 1, False, 1.0),  # GPT-OSS with a router bias
    (16, 1, "sigmoid", True, False, 1, 1, False, 1.0),  # Llama 4
    (7, 7, "softmax", False, False, 1, 1, True, 1.0),  # k = E, E not a multiple of 32
    (1, 1, "softmax", False, False, 1, 1, False, 1.0),
]


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_router_topk_paths_match_reference(case):
    E, k, score, topk_first, use_bias, groups, tg, normalize, scale = case
    T = 513
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    bias = torch.randn(E, dtype=torch.float64) * 0.1 if use_bias else None
    args = (k, score, topk_first, bias, groups, tg, normalize, scale)
    rw, rids = ref.router_topk(logits, *args)
    w, ids = ms.router_topk(
        logits.to(DEV),
        k,
        score,
        topk_first,
        None if bias is None else bias.to(DEV),
        groups,
        tg,
        normalize,
        scale,
    )
    assert torch.equal(ids.cpu(), rids)
    assert w.dtype == torch.float64
    assert_accurate(w, rw, what="weights float64")

    # float32 logits: scores may differ from the CPU's in the last bit, which can swap two experts
    # whose scores are within an ulp at the top-k boundary; allow a row or two of that, check
    # float32 accuracy on the rest
    l32 = logits.float()
    b32 = None if bias is None else bias.float()
    _, rids32 = ref.router_topk(l32, k, score, topk_first, b32, groups, tg, normalize, scale)
    w32, ids32 = ms.router_topk(
        l32.to(DEV), k, score, topk_first, None if b32 is None else b32.to(DEV), groups, tg, normalize, scale
    )
    assert w32.dtype == torch.float32
    same = (ids32.cpu() == rids32).all(dim=1)
    assert int((~same).sum()) <= 2
    rw64 = ref.router_topk(
        l32.double(),
        k,
        score,
        topk_first,
        None if b32 is None else b32.double(),
        groups,
        tg,
        normalize,
        scale,
    )[0]
    assert_accurate(w32.cpu()[same], rw64[same], what="weights float32")


@pytest.mark.parametrize(
    "score,topk_first,groups",
    [("softmax", False, 1), ("sigmoid", False, 4), ("softmax", True, 1), ("sigmoid", True, 2)],
)
def test_router_ties_go_to_lower_id(score, topk_first, groups):
    # small non-negative integer logits: many exact ties; equal inputs give equal scores on any
    # device, and different ones are far apart (no sigmoid(x) + sigmoid(-x) == 1 style coincidences
    # between group sums), so the ids must match the reference's stable sort exactly
    T, E, k = 1000, 32, 6
    logits = torch.randint(0, 4, (T, E)).float()
    logits[0] = 0.0  # a fully tied row: ids 0..k-1
    tg = 2 if groups > 1 else 1
    rw, rids = ref.router_topk(logits, k, score, topk_first, None, groups, tg, True, 1.0)
    w, ids = ms.router_topk(logits.to(DEV), k, score, topk_first, None, groups, tg, True, 1.0)
    assert torch.equal(ids.cpu(), rids)
    assert torch.equal(ids[0].cpu(), torch.arange(k))
    assert_accurate(w, rw.double(), what="tied weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_low_precision_large_T(dtype):
    T, E, k = 16384, 256, 8
    logits = torch.randn(T, E).to(dtype)
    bias = torch.randn(E) * 0.1
    w, ids = ms.router_topk(logits.to(DEV), k, "sigmoid", False, bias.to(DEV), 8, 4, True, 2.5)
    rw, rids = ref.router_topk(logits, k, "sigmoid", False, bias, 8, 4, True, 2.5)
    # scores are computed in float32 from the same low-precision inputs: ids agree except at
    # float32 near-ties, which random data essentially never produces
    mismatched_rows = (ids.cpu() != rids).any(dim=1).sum().item()
    assert mismatched_rows <= 2
    same = (ids.cpu() == rids).all(dim=1)
    assert_accurate(w.cpu()[same], rw[same].double(), what="weights")


@pytest.mark.parametrize(
    "E,k,score,topk_first,normalize",
    [
        (600, 40, "softmax", False, True),  # two expert chunks, two pick chunks in the backward
        (600, 3, "sigmoid", False, True),
        (40, 35, "softmax", True, True),
        (40, 5, "sigmoid", True, False),
    ],
)
def test_router_backward_gradcheck_large_shapes(E, k, score, topk_first, normalize):
    logits = torch.randn(2, E, dtype=torch.float64, device=DEV, requires_grad=True)

    def f(lg):
        return ms.router_topk(lg, k, score, topk_first, None, 1, 1, normalize, 1.5)[0]

    assert torch.autograd.gradcheck(f, (logits,))


def test_router_losses_large_T_accuracy():
    T, E, k = 65536, 64, 6
    logits = torch.randn(T, E)
    ids = torch.randint(0, E, (T, k))
    mask = (torch.rand(T) > 0.1).float()
    aux = ms.router_aux_loss(logits.to(DEV), ids.to(DEV), mask.to(DEV))
    assert_accurate(aux, ref.router_aux_loss(logits.double(), ids, mask.double()), what="aux loss")
    z = ms.router_z_loss(logits.to(DEV))
    assert_accurate(z, ref.router_z_loss(logits.double()), what="z loss")


# ---------------------------------------------------------------------------------------------------
# gated activation


@pytest.mark.parametrize("inter", [1, 7, 4097, 64])
@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("misaligned", [False, True])
def test_gated_activation_odd_and_misaligned(inter, layout, misaligned):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(37, 2 * inter, dtype=dtype) * 4
        xd = _misaligned(x.to(DEV)) if misaligned else x.to(DEV)
        for kind in ("swiglu", "geglu", "gptoss"):
            out = ms.gated_activation(xd, kind, layout, 1.702, 7.0)
            assert_accurate(
                out,
                ref.gated_activation(x.double(), kind, layout, 1.702, 7.0),
                ref.gated_activation(x, kind, layout, 1.702, 7.0),
                f"{kind} {layout} {dtype}",
            )
            g = torch.randn(37, inter, dtype=dtype)
            gd = _misaligned(g.to(DEV)) if misaligned else g.to(DEV)
            gx = ops.gated_activation_backward(gd, xd, kind, layout, 1.702, 7.0)
            x64 = x.double().requires_grad_(True)
            (rg,) = torch.autograd.grad(ref.gated_activation(x64, kind, layout, 1.702, 7.0), x64, g.double())
            x_lp = x.clone().requires_grad_(True)
            (rg_lp,) = torch.autograd.grad(ref.gated_activation(x_lp, kind, layout, 1.702, 7.0), x_lp, g)
            assert_accurate(gx, rg, rg_lp, f"grad {kind} {layout} {dtype}")


# ---------------------------------------------------------------------------------------------------
# determinism and no host synchronisation


def _all_ops(seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, E, k, H = 4096, 64, 4, 96
    x = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16)
    logits = torch.randn(T, E, generator=g).to(DEV)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEV)
    gw_in = torch.randn(T, k, generator=g).to(DEV)
    h = torch.randn(T, 2 * H, generator=g).to(DEV, torch.bfloat16)
    gy = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16)

    def run():
        w, ids = ops.router_topk(logits, k, "sigmoid", False, bias, 8, 4, True, 2.5)
        gl = ops.router_topk_backward(gw_in, logits, ids, "sigmoid", False, True, 2.5)
        aux = ops.router_aux_loss(logits, ids, None)
        gaux = ops.router_aux_loss_backward(torch.ones((), device=DEV), logits, ids, None)
        z = ops.router_z_loss(logits)
        gz = ops.router_z_loss_backward(torch.ones((), device=DEV), logits)
        xs, perm, offsets = ops.permute(x, ids, E)
        y = ops.unpermute(xs, perm, w)
        gys, gwt = ops.unpermute_backward(gy, xs, perm, w, True)
        a = ops.gated_activation(h, "swiglu", "interleaved", 1.702, 7.0)
        ga = ops.gated_activation_backward(gy, h, "swiglu", "interleaved", 1.702, 7.0)
        return [w, ids, gl, aux, gaux, z, gz, xs, perm, offsets, y, gys, gwt, a, ga]

    return run


def test_bitwise_deterministic():
    run = _all_ops()
    first = run()
    second = run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_host_sync():
    run = _all_ops()
    run()  # warm-up outside the check (first-call initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture_and_replay():
    run = _all_ops()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = run()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
