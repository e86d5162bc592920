"""CUDA kernels of grouped_mm, grouped_mm_weight_grad, grouped_bias_grad and moe_experts.

Every kernel family is forced in turn through the tuning key gmm_impl (auto, simt, mma, gemv, and
wgmma where it is compiled in; a family that does not apply to a call falls back to the SIMT
kernel) and compared with moestream.reference on fresh random data: float32 / bfloat16 / float16,
both weight layouts, bias, group sizes 0, 1, 7, 129 and 1000, rows past offsets[-1], decode shapes
(a few rows per expert), large K / N, M up to 16384, 64-bit row offsets, misaligned inputs. Also:
bitwise determinism, no host synchronisation (sync debug mode "error"), malformed offsets stay in
bounds, and the check_inputs validation. The whole file is skipped without a CUDA device.
"""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from conftest import assert_accurate, cuda
from moestream import _C
from moestream import reference as R
from moestream._tuning import set_tuning, tuning

pytestmark = [cuda, pytest.mark.cuda]

ops = torch.ops.moestream
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["auto", "simt", "mma", "gemv", "wgmma"]


@pytest.fixture
def impl(request):
    if request.param == "wgmma" and not _C.with_gmm_wgmma:
        pytest.skip("the wgmma kernels are compiled out (MOESTREAM_GMM_WGMMA=OFF)")
    with tuning(gmm_impl=request.param, check_inputs=False):
        yield request.param


@pytest.fixture(autouse=True)
def _plain_env():
    with tuning(check_inputs=False):
        yield


def offsets_of(counts, dtype=torch.int64):
    return torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(device=DEV, dtype=dtype)


def rand_b(E, K, N, transpose_b, dtype):
    return torch.randn((E, N, K) if transpose_b else (E, K, N), device=DEV, dtype=dtype) / K**0.5


def check_forward(a, b, offsets, transpose_b, bias=None, what="grouped_mm"):
    out = ms.grouped_mm(a, b, offsets, transpose_b, bias)
    ref64 = R.grouped_mm(
        a.double(), b.double(), offsets, transpose_b, None if bias is None else bias.double()
    )
    ref_lowp = R.grouped_mm(a, b, offsets, transpose_b, bias)
    assert out.dtype == a.dtype and out.shape == ref64.shape and out.device == a.device
    assert_accurate(out, ref64, ref_lowp, what)
    used = int(offsets[-1]) if offsets.numel() else 0
    assert (out[used:] == 0).all(), "rows past offsets[-1] must be zero"
    return out


def ref_weight_grad(a, dy, offsets, transpose_b, acc):
    E, K, N = offsets.numel(), a.shape[1], dy.shape[1]
    out = torch.zeros((E, N, K) if transpose_b else (E, K, N), dtype=acc, device=a.device)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        ag, dg = a[start:end].to(acc), dy[start:end].to(acc)
        out[g] = dg.t() @ ag if transpose_b else ag.t() @ dg
        start = end
    return out


def ref_bias_grad(dy, offsets, acc):
    out = torch.zeros(offsets.numel(), dy.shape[1], dtype=acc, device=dy.device)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[g] = dy[start:end].to(acc).sum(0)
        start = end
    return out


# ----------------------------------------------------------------------------------------------
# forward


# (counts per group, tail rows past offsets[-1], K, N)
FWD_CASES = [
    ([0, 1, 7, 129, 1000, 0, 3], 5, 256, 384),  # aligned: tensor-core tiles with partial M tiles
    ([7, 0, 129, 1], 3, 200, 136),  # K % 64 != 0 and N % 128 != 0 (partial K and N tiles)
    ([3, 0, 40, 1, 1000], 0, 100, 90),  # K, N not multiples of 8: generic kernel for every impl
    ([1, 1, 1, 1, 0, 1, 1, 1], 2, 512, 768),  # decode-like: one row per expert
    ([2, 9, 0, 17, 4, 8, 1, 30], 1, 64, 1024),  # rows per group around the GEMV chunk sizes
    ([1000], 0, 8, 8),  # one group, tiny K and N
]


@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: f"E{len(c[0])}_M{sum(c[0]) + c[1]}_K{c[2]}_N{c[3]}")
@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_forward_matches_reference(impl, dtype, transpose_b, case):
    counts, tail, K, N = case
    E, M = len(counts), sum(counts) + tail
    a = torch.randn(M, K, device=DEV, dtype=dtype)
    b = rand_b(E, K, N, transpose_b, dtype)
    bias = torch.randn(E, N, device=DEV, dtype=dtype)
    for odt in (torch.int64, torch.int32):
        check_forward(a, b, offsets_of(counts, odt), transpose_b, None, f"grouped_mm[{impl}]")
    check_forward(a, b, offsets_of(counts), transpose_b, bias, f"grouped_mm+bias[{impl}]")


@pytest.mark.slow
@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("impl", ["auto", "mma", "wgmma"], indirect=True)
def test_forward_large_bf16(impl, transpose_b):
    # Mixtral-sized expert slices (H = 4096, 2I = 14336) with uneven groups, M = 16384
    counts = [6000, 0, 129, 1, 7, 5247, 5000]
    K, N = 4096, 14336
    E, M = len(counts), 16384
    a = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    b = rand_b(E, K, N, transpose_b, torch.bfloat16)
    bias = torch.randn(E, N, device=DEV, dtype=torch.float32)
    check_forward(a, b, offsets_of(counts), transpose_b, bias, f"large[{impl}]")


@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_moe_shapes(dtype, transpose_b):
    # Qwen3-MoE-like: E = 128 experts, top-8, T = 2048 tokens, random routing
    E, k, T, K, N = 128, 8, 2048, 2048, 1536
    ids = torch.rand(T, E, device=DEV).topk(k).indices
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    a = torch.randn(T * k, K, device=DEV, dtype=dtype)
    b = rand_b(E, K, N, transpose_b, dtype)
    check_forward(a, b, offsets_of(counts), transpose_b, None, "moe shapes")


# (E, rows per active expert, active experts, K, N): T = 1 decode of Qwen3-MoE / DeepSeek-V3-like
# and Mixtral-like layers, and a few tokens per expert (GEMV chunks of 2, 4 and 8 rows)
DECODE_CASES = [
    (128, [1] * 8, 2048, 1536),
    (128, [1] * 8, 768, 2048),
    (256, [1] * 8, 7168, 512),
    (8, [1, 1], 4096, 14336),
    (8, [2, 3, 1, 2, 0, 1, 5, 2], 1024, 1024),
    (32, [4, 9, 1, 3] * 4, 512, 640),
    (16, [8, 17, 6, 8, 2, 1, 0, 30], 256, 512),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"E{c[0]}_M{sum(c[1])}_K{c[2]}_N{c[3]}")
@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["auto", "gemv", "mma"], indirect=True)
def test_decode_shapes(impl, dtype, transpose_b, case):
    E, rows, K, N = case
    counts = [0] * E
    experts = torch.randperm(E)[: len(rows)].sort().values.tolist()
    for e, r in zip(experts, rows):
        counts[e] = r
    M = sum(counts)
    a = torch.randn(M, K, device=DEV, dtype=dtype)
    b = rand_b(E, K, N, transpose_b, dtype)
    bias = torch.randn(E, N, device=DEV, dtype=dtype)
    check_forward(a, b, offsets_of(counts), transpose_b, bias, f"decode[{impl}]")


@pytest.mark.parametrize("impl", ["auto", "simt", "mma", "gemv"], indirect=True)
def test_forward_misaligned_inputs(impl):
    # 16-byte alignment or a leading dimension that is not a multiple of 8 sends the call to the
    # generic kernel; the result must not change
    counts, K, N = [5, 0, 70, 2], 64, 64
    E, M = len(counts), sum(counts)
    for dtype in (torch.bfloat16, torch.float32):
        b = rand_b(E, K, N, False, dtype)
        flat = torch.randn(M * K + 1, device=DEV, dtype=dtype)
        a_shift = flat[1:].view(M, K)  # base pointer off by one element
        a_ld = torch.randn(M, K + 3, device=DEV, dtype=dtype)[:, :K]  # lda = K + 3
        b_shift = torch.randn(b.numel() + 1, device=DEV, dtype=dtype)[1:].view(b.shape)
        offsets = offsets_of(counts)
        check_forward(a_shift, b, offsets, False, None, f"a misaligned[{impl}]")
        check_forward(a_ld, b, offsets, False, None, f"a strided[{impl}]")
        check_forward(a_shift, b_shift, offsets, False, None, f"b misaligned[{impl}]")
        bias = torch.randn(E * N + 1, device=DEV, dtype=torch.float32)[1:].view(E, N)
        check_forward(a_ld, b, offsets, False, bias, f"bias misaligned[{impl}]")


@pytest.mark.slow
def test_forward_64bit_rows():
    # rows * K > 2^31 elements: addresses must be computed in 64 bits
    K, N = 4096, 16
    M = (1 << 31) // K + 1000
    counts = [M - 1500, 0, 1500]
    a = torch.empty(M, K, device=DEV, dtype=torch.bfloat16).normal_()
    b = rand_b(3, K, N, True, torch.bfloat16)
    out = ms.grouped_mm(a, b, offsets_of(counts), True)
    tail = a[M - 1500 :].double() @ b[2].double().t()
    head = a[:64].double() @ b[0].double().t()
    ref_lp_tail = (a[M - 1500 :].float() @ b[2].float().t()).to(torch.bfloat16)
    assert_accurate(out[M - 1500 :], tail, ref_lp_tail, "rows above 2^31 / K")
    assert_accurate(out[:64], head, (a[:64].float() @ b[0].float().t()).to(torch.bfloat16), "first rows")


def test_forward_float64():
    counts, K, N = [3, 0, 33, 1], 20, 13
    a = torch.randn(sum(counts) + 2, K, device=DEV, dtype=torch.float64)
    b = rand_b(len(counts), K, N, True, torch.float64)
    bias = torch.randn(len(counts), N, device=DEV, dtype=torch.float64)
    out = ms.grouped_mm(a, b, offsets_of(counts), True, bias)
    torch.testing.assert_close(
        out, R.grouped_mm(a, b, offsets_of(counts), True, bias), rtol=1e-12, atol=1e-12
    )


def test_forward_empty_and_degenerate():
    b = torch.randn(3, 8, 16, device=DEV, dtype=torch.bfloat16)
    # no rows at all
    empty = torch.randn(0, 8, device=DEV, dtype=torch.bfloat16)
    assert ms.grouped_mm(empty, b, offsets_of([0, 0, 0])).shape == (0, 16)
    # every row past offsets[-1]
    a = torch.randn(9, 8, device=DEV, dtype=torch.bfloat16)
    assert (ms.grouped_mm(a, b, offsets_of([0, 0, 0])) == 0).all()
    # K = 0: the bias alone
    bias = torch.randn(3, 16, device=DEV)
    a0, b0 = torch.randn(4, 0, device=DEV), torch.randn(3, 0, 16, device=DEV)
    out = ms.grouped_mm(a0, b0, offsets_of([1, 1, 2]), False, bias)
    torch.testing.assert_close(out, torch.cat([bias[0:1], bias[2:3], torch.zeros(2, 16, device=DEV)]))
    # no groups: all zeros
    out = ms.grouped_mm(a, torch.randn(0, 8, 16, device=DEV, dtype=torch.bfloat16), offsets_of([]))
    assert out.shape == (9, 16) and (out == 0).all()


# ----------------------------------------------------------------------------------------------
# gradients


WG_CASES = [
    ([0, 1, 7, 129, 1000, 0], 3, 136, 264),  # aligned: tensor cores, partial tiles in K and N
    ([5, 0, 40, 2], 1, 33, 70),  # unaligned: generic kernel
    ([300], 0, 128, 128),
]


@pytest.mark.parametrize("case", WG_CASES, ids=lambda c: f"E{len(c[0])}_K{c[2]}_N{c[3]}")
@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["auto", "simt"], indirect=True)
def test_weight_grad_matches_reference(impl, dtype, transpose_b, case):
    counts, tail, K, N = case
    M = sum(counts) + tail
    offsets = offsets_of(counts, torch.int32)
    a = torch.randn(M, K, device=DEV, dtype=dtype)
    dy = torch.randn(M, N, device=DEV, dtype=dtype)
    gb = ops.grouped_mm_weight_grad(a, dy, offsets, transpose_b)
    acc = torch.float32
    ref64 = ref_weight_grad(a, dy, offsets, transpose_b, torch.float64)
    ref_lp = ref_weight_grad(a, dy, offsets, transpose_b, acc).to(dtype)
    assert gb.dtype == dtype and gb.shape == ref64.shape
    assert_accurate(gb, ref64, ref_lp, f"weight grad[{impl}]")
    for e, c in enumerate(counts):
        if c == 0:
            assert (gb[e] == 0).all()


@pytest.mark.slow
def test_weight_grad_large_bf16():
    counts = [4000, 0, 1, 3000, 1191]
    K, N = 2048, 1536
    M = sum(counts)
    offsets = offsets_of(counts)
    a = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)
    for tb in (False, True):
        gb = ops.grouped_mm_weight_grad(a, dy, offsets, tb)
        ref64 = ref_weight_grad(a, dy, offsets, tb, torch.float64)
        ref_lp = ref_weight_grad(a, dy, offsets, tb, torch.float32).to(torch.bfloat16)
        assert_accurate(gb, ref64, ref_lp, "large weight grad")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_bias_grad_matches_reference(dtype):
    counts, N = [0, 1, 7, 129, 1000, 0, 3], 300
    M = sum(counts) + 4
    offsets = offsets_of(counts)
    dy = torch.randn(M, N, device=DEV, dtype=dtype)
    gbias = ops.grouped_bias_grad(dy, offsets)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert gbias.dtype == dtype and gbias.shape == (len(counts), N)
    ref64, ref_lp = ref_bias_grad(dy, offsets, torch.float64), ref_bias_grad(dy, offsets, acc).to(dtype)
    assert_accurate(gbias, ref64, ref_lp, "bias grad")
    assert (gbias[0] == 0).all() and (gbias[5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_through_autograd(dtype):
    counts, K, N = [3, 0, 129, 7], 64, 96
    E, M = len(counts), sum(counts) + 2
    offsets = offsets_of(counts)
    a = torch.randn(M, K, device=DEV, dtype=dtype, requires_grad=True)
    b = rand_b(E, K, N, True, dtype).requires_grad_()
    bias = torch.randn(E, N, device=DEV, dtype=dtype, requires_grad=True)
    g = torch.randn(M, N, device=DEV, dtype=dtype)
    ms.grouped_mm(a, b, offsets, True, bias).backward(g)
    a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (a, b, bias))
    R.grouped_mm(a64, b64, offsets, True, bias64).backward(g.double())
    alp, blp, biaslp = (t.detach().clone().requires_grad_() for t in (a, b, bias))
    R.grouped_mm(alp, blp, offsets, True, biaslp).backward(g)
    for got, r64, rlp, name in (
        (a.grad, a64.grad, alp.grad, "a"),
        (b.grad, b64.grad, blp.grad, "b"),
        (bias.grad, bias64.grad, biaslp.grad, "bias"),
    ):
        assert_accurate(got, r64, rlp, f"grad {name}")


def test_gradcheck_float64_cuda():
    counts, K, N = [2, 0, 3, 1], 3, 4
    E, M = len(counts), sum(counts) + 1
    offsets = offsets_of(counts)
    for transpose_b in (False, True):
        a = torch.randn(M, K, device=DEV, dtype=torch.float64, requires_grad=True)
        b = rand_b(E, K, N, transpose_b, torch.float64).requires_grad_()
        bias = torch.randn(E, N, device=DEV, dtype=torch.float64, requires_grad=True)

        def f(a, b, bias, transpose_b=transpose_b):
            return ms.grouped_mm(a, b, offsets, transpose_b, bias)

        assert torch.autograd.gradcheck(f, (a, b, bias))
        assert torch.autograd.gradgradcheck(f, (a, b, bias))


def test_opcheck_cuda():
    counts, K, N = [2, 0, 5], 16, 24
    E, M = len(counts), sum(counts) + 1
    offsets = offsets_of(counts)
    for dtype in (torch.float32, torch.bfloat16):
        for transpose_b in (False, True):
            a = torch.randn(M, K, device=DEV, dtype=dtype, requires_grad=True)
            b = rand_b(E, K, N, transpose_b, dtype).requires_grad_()
            bias = torch.randn(E, N, device=DEV, dtype=dtype, requires_grad=True)
            torch.library.opcheck(ops.grouped_mm.default, (a, b, offsets, transpose_b, bias))
            dy = torch.randn(M, N, device=DEV, dtype=dtype, requires_grad=True)
            torch.library.opcheck(ops.grouped_mm_weight_grad.default, (a, dy, offsets.int(), transpose_b))
        torch.library.opcheck(
            ops.grouped_bias_grad.default, (torch.randn(M, N, device=DEV, dtype=dtype), offsets)
        )


# ----------------------------------------------------------------------------------------------
# determinism, synchronisation, the implementation switch, malformed offsets


@pytest.mark.parametrize("impl", ["auto", "simt", "mma", "gemv", "wgmma"], indirect=True)
def test_bitwise_deterministic(impl):
    counts, K, N = [0, 1, 7, 129, 1000, 3], 256, 384
    E, M = len(counts), sum(counts) + 2
    offsets = offsets_of(counts)
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(M, K, device=DEV, dtype=dtype)
        b = rand_b(E, K, N, False, dtype)
        bias = torch.randn(E, N, device=DEV, dtype=dtype)
        dy = torch.randn(M, N, device=DEV, dtype=dtype)
        runs = [
            (
                ms.grouped_mm(a, b, offsets, False, bias),
                ops.grouped_mm_weight_grad(a, dy, offsets, True),
                ops.grouped_bias_grad(dy, offsets),
            )
            for _ in range(3)
        ]
        for r in runs[1:]:
            for x, y in zip(runs[0], r):
                assert torch.equal(x, y)


@pytest.mark.parametrize("impl", ["auto", "simt", "mma", "gemv", "wgmma"], indirect=True)
def test_no_host_sync(impl):
    counts, K, N = [0, 3, 70, 1], 128, 256
    E, M = len(counts), sum(counts) + 1
    offsets = offsets_of(counts)
    a = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    b = rand_b(E, K, N, True, torch.bfloat16)
    bias = torch.randn(E, N, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)
    af = a.float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms.grouped_mm(a, b, offsets, True, bias)
        out32 = ms.grouped_mm(af, b.float(), offsets.int(), True)
        gb = ops.grouped_mm_weight_grad(a, dy, offsets, False)
        gbias = ops.grouped_bias_grad(dy, offsets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (M, N) and out32.shape == (M, N) and gb.shape == (E, K, N) and gbias.shape == (E, N)
    check_forward(a, b, offsets, True, bias)


def test_impl_switch_rejects_unknown():
    with pytest.raises(ValueError, match="gmm_impl must be one of auto, simt, mma, wgmma, gemv"):
        set_tuning(gmm_impl="cublas")


def test_impls_agree_bf16():
    # the same call under every family: each within the reference's own rounding of the others
    counts, K, N = [1, 2, 0, 4, 1, 3, 2, 1], 512, 256
    E, M = len(counts), sum(counts)
    offsets = offsets_of(counts)
    a = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    b = rand_b(E, K, N, True, torch.bfloat16)
    outs = {}
    for name in ("simt", "mma", "gemv", "wgmma", "auto"):
        if name == "wgmma" and not _C.with_gmm_wgmma:
            continue
        with tuning(gmm_impl=name):
            outs[name] = check_forward(a, b, offsets, True, None, name)
    # fp32 accumulation in different orders, one rounding to bf16: at most one bf16 ulp apart
    for name, o in outs.items():
        torch.testing.assert_close(o.float(), outs["simt"].float(), rtol=2**-7, atol=1e-6, msg=name)


def test_malformed_offsets_stay_in_bounds():
    # without check_inputs the values are not validated (no sync): wrong groups are fine,
    # out-of-bounds accesses are not. The kernels clamp offsets into [0, M], non-decreasing.
    K, N = 64, 128
    a = torch.randn(50, K, device=DEV, dtype=torch.bfloat16)
    b = rand_b(3, K, N, False, torch.bfloat16)
    for bad in ([10, 5, 40], [-7, 20, 30], [10, 20, 10_000], [2**40, 3, 4]):
        offs = torch.tensor(bad, device=DEV)
        out = ms.grouped_mm(a, b, offs, False)
        gb = ops.grouped_mm_weight_grad(a, torch.randn(50, N, device=DEV, dtype=torch.bfloat16), offs, False)
        gbias = ops.grouped_bias_grad(torch.randn(50, N, device=DEV), offs)
        torch.cuda.synchronize()
        assert (
            torch.isfinite(out.float()).all()
            and torch.isfinite(gb.float()).all()
            and torch.isfinite(gbias).all()
        )
    # clamping is exactly "running max, then into [0, M]"
    offs = torch.tensor([10, 5, 40], device=DEV)
    torch.testing.assert_close(
        ms.grouped_mm(a, b, offs, False), ms.grouped_mm(a, b, offsets_of([10, 0, 30]), False)
    )


@pytest.fixture
def _check_inputs():
    with tuning(check_inputs=True):
        yield


def test_check_inputs(_check_inputs):
    a = torch.randn(6, 4, device=DEV)
    b = torch.randn(2, 4, 3, device=DEV)
    with pytest.raises(RuntimeError, match=r"offsets do not add up.*offsets\[1\] = 1 after offsets\[0\] = 2"):
        ms.grouped_mm(a, b, torch.tensor([2, 1], device=DEV))
    with pytest.raises(
        RuntimeError, match=r"offsets do not add up: offsets\[-1\] = 7 exceeds the 6 rows of a"
    ):
        ms.grouped_mm(a, b, torch.tensor([2, 7], device=DEV, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"offsets do not add up.*rows of grad_out"):
        ops.grouped_bias_grad(torch.randn(6, 3, device=DEV), torch.tensor([2, 9], device=DEV))
    with pytest.raises(RuntimeError, match=r"offsets do not add up"):
        ops.grouped_mm_weight_grad(a, torch.randn(6, 3, device=DEV), torch.tensor([4, 2], device=DEV), False)
    check_forward(a, b, torch.tensor([2, 6], device=DEV), False)


def test_bad_inputs_cuda():
    a = torch.randn(6, 4, device=DEV)
    b = torch.randn(2, 4, 3, device=DEV)
    offs = torch.tensor([2, 6], device=DEV)
    with pytest.raises(RuntimeError, match="a and b must have the same dtype, got a Float and b BFloat16"):
        ms.grouped_mm(a, b.bfloat16(), offs)
    with pytest.raises(RuntimeError, match=r"inner dimensions differ.*K = 4 vs 3"):
        ms.grouped_mm(a, b, offs, transpose_b=True)
    with pytest.raises(RuntimeError, match=r"offsets must have one entry per group \(2\)"):
        ms.grouped_mm(a, b, torch.tensor([2, 4, 6], device=DEV))
    with pytest.raises(RuntimeError, match="offsets must be int32 or int64"):
        ms.grouped_mm(a, b, offs.float())
    with pytest.raises(RuntimeError, match="a and offsets must be on the same device"):
        ms.grouped_mm(a, b, offs.cpu())
    with pytest.raises(RuntimeError, match="a and b must be on the same device"):
        ms.grouped_mm(a, b.cpu(), offs)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[2, 3\]"):
        ms.grouped_mm(a, b, offs, False, torch.randn(2, 4, device=DEV))
    with pytest.raises(RuntimeError, match="grad_out must have a's 6 rows"):
        ops.grouped_mm_weight_grad(a, torch.randn(5, 3, device=DEV), offs, False)
    with pytest.raises(RuntimeError, match="grad_out must have 2 dimensions"):
        ops.grouped_bias_grad(torch.randn(3, device=DEV), offs)


# ----------------------------------------------------------------------------------------------
# the composed expert path


@pytest.mark.parametrize("transpose_b", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,layout,biases", [("swiglu", "concat", False), ("gptoss", "interleaved", True)])
def test_moe_experts_cuda(dtype, transpose_b, kind, layout, biases):
    T, H, I, E, k = 37, 64, 48, 8, 2
    x = torch.randn(T, H, device=DEV, dtype=dtype)
    ids = torch.rand(T, E - 1, device=DEV).topk(k).indices
    ids = ids + (ids >= 5).long()  # expert 5 gets no tokens
    weights = torch.softmax(torch.randn(T, k, device=DEV), -1)
    w1 = rand_b(E, H, 2 * I, transpose_b, dtype)
    w2 = rand_b(E, I, H, transpose_b, dtype)
    b1 = torch.randn(E, 2 * I, device=DEV, dtype=dtype) if biases else None
    b2 = torch.randn(E, H, device=DEV, dtype=dtype) if biases else None
    args = (kind, layout, transpose_b, 1.702, 7.0)
    with torch.no_grad():
        out = ms.moe_experts(x, ids, weights, w1, w2, b1, b2, *args)

    def d(t):
        return None if t is None else t.double()

    ref64 = R.moe_experts(x.double(), ids, weights.double(), w1.double(), w2.double(), d(b1), d(b2), *args)
    ref_lp = R.moe_experts(x, ids, weights, w1, w2, b1, b2, *args)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_accurate(out, ref64, ref_lp, "moe_experts")


def test_moe_experts_cuda_bad_inputs():
    x = torch.randn(4, 8, device=DEV)
    ids = torch.zeros(4, 2, dtype=torch.int64, device=DEV)
    w = torch.ones(4, 2, device=DEV)
    w1 = torch.randn(3, 8, 10, device=DEV)
    w2 = torch.randn(3, 5, 8, device=DEV)
    with pytest.raises(RuntimeError, match="moe_experts: w_down must have shape"):
        ops.moe_experts(x, ids, w, w1, w2[:, :4], None, None, "swiglu", "concat", False, 1.702, 7.0)
    with pytest.raises(RuntimeError, match="moe_experts: kind must be one of"):
        ops.moe_experts(x, ids, w, w1, w2, None, None, "relu", "concat", False, 1.702, 7.0)
    with pytest.raises(RuntimeError, match="moe_experts: weights must have ids' shape"):
        ops.moe_experts(x, ids, w[:, :1], w1, w2, None, None, "swiglu", "concat", False, 1.702, 7.0)
