"""Compressed matmuls with int8 activations (``activations="int8"``, the AVX-512 VNNI kernels of
csrc/quant/quant_a8_cpu.cpp): against ``reference.int8_activations`` then dequantize-then-matmul, at
every dtype and shape class; ``"auto"``; the fall-backs; bad input."""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import quant as Q
from moestream import reference as R

ops = torch.ops.moestream

SCHEMES = [("int8", True), ("int8", False), ("int4", True), ("int4", False)]
SCHEME_IDS = ["int8sym", "int8asym", "int4sym", "int4asym"]

# groups of rows up to this many take the int8 kernels; larger ones the float ones (kA8Rows)
A8_ROWS = 16

# every row count of a group from 1 to 17 (row blocks of 1-8, a second block, and 17: a group the
# float kernels take), output columns that leave a remainder after the tiles of 8, 4, 3 and 2
# weight rows, K with a partial last block (K % 128: 32, 64, 96; int8: K % 64 = 32), group sizes
# 32 / 64 / 96 / 128, empty groups, rows past offsets[-1]
CASES = [
    (list(range(1, 18)) + [0], 160, 32, 19, 32),
    ([1, 0, 2, 3, 0, 4], 12, 128, 13, 64),
    ([5, 6, 7, 8], 30, 224, 7, 32),
    ([9, 0, 16], 26, 96, 21, 96),
    ([1], 1, 384, 11, 128),
    ([2, 1], 5, 256, 1, 64),
    ([3, 4], 9, 1088, 66, 64),
]
CASE_IDS = [f"M{c[1]}_K{c[2]}_N{c[3]}_E{len(c[0])}_g{c[4]}" for c in CASES]


def make_offsets(counts):
    return torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)


def packed(shape, scheme, symmetric, group_size):
    q, s, z = Q.quantize(torch.randn(shape), scheme, group_size, symmetric)
    return q, s, z


def expected(a, q, s, z, bits, gs, counts, bias):
    """float64 result and its reference at a's dtype: groups up to A8_ROWS rows on the int8
    activations, larger ones on a itself."""
    w64 = Q.dequantize(q, s, z, bits, gs, torch.float64)
    a8 = R.int8_activations(a, gs)
    a_used = a.double().clone()
    start = 0
    for c in counts:
        if 0 < c <= A8_ROWS:
            a_used[start : start + c] = a8[start : start + c]
        start += c
    offsets = make_offsets(counts)
    b64 = None if bias is None else bias.double()
    ref64 = R.grouped_mm(a_used, w64, offsets, True, b64)
    ref_lowp = None
    if a.dtype != torch.float32:
        b = None if bias is None else bias.to(a.dtype)
        ref_lowp = R.grouped_mm(a_used.to(a.dtype), w64.to(a.dtype), offsets, True, b)
    return ref64, ref_lowp


pytestmark = pytest.mark.skipif(
    not ms._C.quant_int8_activations(), reason="the CPU has no AVX-512 VNNI: int8 runs the float kernels"
)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_activations_match_the_reference(dtype, scheme, symmetric, with_bias, case):
    counts, M, K, N, gs = case
    E, bits = len(counts), Q.SCHEMES[scheme]
    a = torch.randn(M, K).to(dtype)
    q, s, z = packed((E, N, K), scheme, symmetric, gs)
    bias = torch.randn(E, N).to(dtype) if with_bias else None
    offsets = make_offsets(counts)
    out = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, bias, "int8")
    assert out.dtype == dtype and out.shape == (M, N)
    ref64, ref_lowp = expected(a, q, s, z, bits, gs, counts, bias)
    assert_accurate(out, ref64, ref_lowp, "qgrouped_mm int8")
    assert bool((out[int(offsets[-1]) :] == 0).all())
    # deterministic, int32 offsets alike
    assert torch.equal(out, ms.ops.qgrouped_mm(a, q, s, z, offsets.int(), bits, gs, bias, "int8"))


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlinear_int8_activations(dtype, scheme, symmetric, rows):
    K, N, gs, bits = 320, 37, 64, Q.SCHEMES[scheme]
    x = torch.randn(rows, K).to(dtype)
    q, s, z = packed((N, K), scheme, symmetric, gs)
    bias = torch.randn(N).to(dtype)
    out = ms.ops.qlinear(x, q, s, z, bits, gs, bias, "int8")
    ref64, ref_lowp = expected(
        x, q[None], s[None], None if z is None else z[None], bits, gs, [rows], bias[None]
    )
    assert_accurate(out, ref64, ref_lowp, "qlinear int8")


def test_auto_is_int8_for_half_precision_and_float_for_float32():
    E, N, K, gs = 3, 24, 128, 64
    q, s, z = packed((E, N, K), "int4", True, gs)
    offsets = make_offsets([1, 4, 2])
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(7, K).to(dtype)
        auto = ms.ops.qgrouped_mm(a, q, s, z, offsets, 4, gs)
        assert torch.equal(auto, ms.ops.qgrouped_mm(a, q, s, z, offsets, 4, gs, None, "int8"))
        assert not torch.equal(auto, ms.ops.qgrouped_mm(a, q, s, z, offsets, 4, gs, None, "float"))
    a = torch.randn(7, K)
    auto = ms.ops.qgrouped_mm(a, q, s, z, offsets, 4, gs)
    assert torch.equal(auto, ms.ops.qgrouped_mm(a, q, s, z, offsets, 4, gs, None, "float"))
    # the modules pass their PackedWeight's setting
    lin = Q.QuantizedLinear(
        Q.PackedWeight.from_weight(torch.randn(N, K).bfloat16(), Q.QuantScheme("int4", gs))
    )
    x = torch.randn(2, K).bfloat16()
    w = lin.weight
    assert torch.equal(lin(x), ms.ops.qlinear(x, w.qweight, w.scale, w.zero, 4, gs, None, "int8"))
    Q.set_activations(lin, "float")
    assert lin.weight.activations == "float"
    assert torch.equal(lin(x), ms.ops.qlinear(x, w.qweight, w.scale, w.zero, 4, gs, None, "float"))


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_capped_isa_runs_the_float_kernels(monkeypatch, isa):
    E, N, K, gs = 2, 16, 128, 64
    q, s, z = packed((E, N, K), "int8", True, gs)
    a, offsets = torch.randn(5, K).bfloat16(), make_offsets([2, 3])
    monkeypatch.setenv("MOESTREAM_QUANT_ISA", isa)
    assert torch.equal(
        ms.ops.qgrouped_mm(a, q, s, z, offsets, 8, gs, None, "int8"),
        ms.ops.qgrouped_mm(a, q, s, z, offsets, 8, gs, None, "float"),
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_non_finite_activations_give_non_finite_rows(scheme, bad):
    N, K, gs, bits = 12, 128, 64, Q.SCHEMES[scheme]
    q, s, z = packed((N, K), scheme, True, gs)
    x = torch.randn(3, K).bfloat16()
    x[1, 70] = bad
    out = ms.ops.qlinear(x, q, s, z, bits, gs, None, "int8")
    assert not torch.isfinite(out[1]).any()
    assert torch.isfinite(out[[0, 2]]).all()


def test_opcheck():
    E, N, K, gs = 3, 20, 96, 32
    for scheme, sym in SCHEMES:
        bits = Q.SCHEMES[scheme]
        q, s, z = packed((E, N, K), scheme, sym, gs)
        a = torch.randn(7, K).bfloat16()
        offsets = make_offsets([2, 0, 5])
        torch.library.opcheck(
            ops.qgrouped_mm.default, (a, q, s, z, offsets, bits, gs, torch.randn(E, N), "int8")
        )
        torch.library.opcheck(ops.qgrouped_mm.default, (a, q, s, z, offsets.int(), bits, gs, None, "auto"))
        zl = None if z is None else z[0]
        torch.library.opcheck(ops.qlinear.default, (a.float(), q[0], s[0], zl, bits, gs, None, "int8"))


def test_bad_activations_names_the_argument():
    N, K, gs = 8, 64, 32
    q, s, z = packed((1, N, K), "int4", True, gs)
    a, off = torch.randn(4, K), make_offsets([4])
    msg = "activations must be 'auto', 'int8' or 'float', got 'int4'"
    with pytest.raises(RuntimeError, match=f"moestream.qgrouped_mm: {msg}"):
        ops.qgrouped_mm(a, q, s, z, off, 4, gs, None, "int4")
    with pytest.raises(RuntimeError, match=f"moestream.qlinear: {msg}"):
        ops.qlinear(a, q[0], s[0], None, 4, gs, None, "int4")
    # the fake kernel says the same (meta tensors, FakeTensor, torch.compile)
    with pytest.raises(RuntimeError, match=f"moestream.qlinear: {msg}"):
        ops.qlinear(a.to("meta"), q[0].to("meta"), s[0].to("meta"), None, 4, gs, None, "int4")
    with pytest.raises(ValueError, match="activations must be 'auto', 'int8' or 'float'"):
        Q.set_activations(torch.nn.Linear(2, 2), "fp8")


def test_experts_module_keeps_autograd_where_a_gradient_is_asked_for():
    # without a gradient the expert path runs below autograd (no Python layer per op); with one,
    # the compressed matmuls' node still says there is no backward
    E, H, I, k = 4, 64, 32, 2
    w1 = Q.PackedWeight.from_weight(torch.randn(E, 2 * I, H), Q.QuantScheme("int4", 32))
    w2 = Q.PackedWeight.from_weight(torch.randn(E, H, I), Q.QuantScheme("int4", 32))
    m = Q.QuantizedGroupedExperts(w1, w2)
    x = torch.randn(3, H)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    rw = torch.rand(3, k)
    with torch.no_grad():
        ref = m(x, ids, rw)
    assert ref.grad_fn is None
    xg = x.clone().requires_grad_()
    out = m(xg, ids, rw)
    assert torch.equal(out.detach(), ref) and out.grad_fn is not None
    with pytest.raises(RuntimeError, match="qgrouped_mm is inference only"):
        out.sum().backward()
