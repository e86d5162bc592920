"""Compressed weights (moestream.quant): the packed format's round trip, the qgrouped_mm / qlinear
kernels against dequantize-then-matmul, the quantized modules, quantize_model, and compressed
layered checkpoints / offloading."""

from __future__ import annotations

import copy
import json
import warnings

import moestream as ms
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import quant as Q
from moestream import reference as R
from moestream import testing

ops = torch.ops.moestream

SCHEMES = [("int8", True), ("int8", False), ("int4", True), ("int4", False)]
SCHEME_IDS = ["int8sym", "int8asym", "int4sym", "int4asym"]


def make_offsets(counts, dtype=torch.int64):
    return torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(dtype)


def packed(shape, scheme, symmetric, group_size, dtype=torch.float32):
    w = torch.randn(shape, dtype=dtype)
    q, s, z = Q.quantize(w, scheme, group_size, symmetric)
    return w, q, s, z


# ----------------------------------------------------------------------------------------------
# the format


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
def test_round_trip_within_half_a_step(scheme, symmetric, group_size):
    K = 2 * group_size if group_size < 128 else 128
    w = torch.randn(3, 7, K) * torch.rand(3, 7, 1) * 4  # rows of different magnitudes
    w[0, 0, :group_size] = 0.0  # an all-zero group
    w[0, 1, :group_size] = -0.75  # a constant group
    q, s, z = Q.quantize(w, scheme, group_size, symmetric)
    bits = Q.SCHEMES[scheme]
    assert q.dtype == torch.uint8 and q.shape == (3, 7, K // 2 if bits == 4 else K)
    assert s.dtype == torch.float32 and s.shape == (3, 7, K // group_size)
    assert (z is None) == symmetric
    back = Q.dequantize(q, s, z, bits, group_size)
    step = s.repeat_interleave(group_size, dim=-1)
    err = (back - w).abs()
    assert bool((err <= step * 0.5 * (1 + 1e-5) + 1e-7).all()), float((err / step).max())
    assert bool((back[0, 0, :group_size] == 0).all())
    assert torch.allclose(back[0, 1, :group_size], torch.full((group_size,), -0.75))
    # codes span the range the scheme promises
    codes = Q.unpack_int4(q) if bits == 4 else q
    assert int(codes.max()) <= (1 << bits) - 1
    if symmetric:
        assert int(codes.min()) >= 1


def test_int4_packing_order():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    p = Q.pack_int4(codes)
    assert p.shape == (5, 32)
    # byte j of each 16-byte run: element j (low nibble) and element j + 16 (high nibble)
    assert bool((p[:, 3] & 0xF == codes[:, 3]).all()) and bool((p[:, 3] >> 4 == codes[:, 19]).all())
    assert bool((p[:, 16 + 5] & 0xF == codes[:, 32 + 5]).all()) and bool(
        (p[:, 21] >> 4 == codes[:, 53]).all()
    )
    assert torch.equal(Q.unpack_int4(p), codes)


def test_quantize_bad_input_names_the_tensor():
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        Q.quantize(torch.randn(4, 64), "int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        Q.quantize(torch.randn(4, 64), "int4", group_size=48)
    with pytest.raises(
        ValueError, match=r"group_size 64 does not divide the input dimension K = 96 of layers.0.w"
    ):
        Q.quantize(torch.randn(4, 96), "int4", group_size=64, name="layers.0.w")
    with pytest.raises(TypeError, match="must be a floating tensor"):
        Q.quantize(torch.ones(4, 64, dtype=torch.int32), "int8")


# ----------------------------------------------------------------------------------------------
# the kernels against dequantize-then-matmul

# (counts per group, M, K, N): decode (1-2 rows per expert), 16 rows (the small-row kernel's
# limit), many rows (dequantised panels + SGEMM), empty groups, offsets[-1] < M, odd N, one
# group, no rows at all, the smallest K
CASES = [
    ([1, 0, 1, 2, 1, 0, 1, 1], 8, 128, 48),
    ([16, 3, 0, 16], 40, 64, 37),
    ([40, 0, 21, 17], 90, 96, 70),
    ([0, 5, 0], 9, 32, 1),
    ([3], 3, 256, 300),
    ([0, 0], 4, 64, 8),
    ([0, 0, 33], 33, 128, 5),
]


def dequant_ref(a, q, s, z, bits, gs, offsets, bias):
    w = Q.dequantize(q, s, z, bits, gs, torch.float64)  # [E, N, K]: grouped_mm with transpose_b
    b64 = None if bias is None else bias.double()
    return R.grouped_mm(a.double(), w, offsets, True, b64), w


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[1]}_K{c[2]}_N{c[3]}_E{len(c[0])}")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qgrouped_mm_matches_dequantize_then_matmul(dtype, scheme, symmetric, with_bias, case):
    counts, M, K, N = case
    E, bits = len(counts), Q.SCHEMES[scheme]
    gs = 32 if K % 64 else 64
    a = torch.randn(M, K).to(dtype)
    _, q, s, z = packed((E, N, K), scheme, symmetric, gs)
    offsets = make_offsets(counts)
    bias = torch.randn(E, N).to(dtype) if with_bias else None
    out = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, bias, "float")
    ref64, w64 = dequant_ref(a, q, s, z, bits, gs, offsets, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    ref_lowp = None
    if dtype != torch.float32:
        ref_lowp = R.grouped_mm(a, w64.to(dtype), offsets, True, bias)
    assert_accurate(out, ref64, ref_lowp, "qgrouped_mm")
    used = int(offsets[-1])
    assert bool((out[used:] == 0).all())
    # int32 offsets and a second call give the same bits (deterministic)
    again = ms.ops.qgrouped_mm(a, q, s, z, offsets.int(), bits, gs, bias, "float")
    assert torch.equal(out, again)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlinear_matches_dequantize_then_linear(dtype, scheme, symmetric, rows):
    K, N, gs, bits = 192, 45, 64, Q.SCHEMES[scheme]
    x = torch.randn(rows, 1, K).to(dtype)  # a 3-D input, as in a decoder
    _, q, s, z = packed((N, K), scheme, symmetric, gs)
    bias = torch.randn(N).to(dtype)
    out = ms.ops.qlinear(x, q, s, z, bits, gs, bias, "float")
    w64 = Q.dequantize(q, s, z, bits, gs, torch.float64)
    ref64 = torch.nn.functional.linear(x.double(), w64, bias.double())
    assert out.shape == (rows, 1, N) and out.dtype == dtype
    ref_lowp = None if dtype == torch.float32 else torch.nn.functional.linear(x, w64.to(dtype), bias)
    assert_accurate(out, ref64, ref_lowp, "qlinear")


def test_qlinear_no_rows_and_non_contiguous():
    K, N, gs = 64, 16, 32
    _, q, s, z = packed((N, K), "int4", True, gs)
    assert ms.ops.qlinear(torch.randn(0, K), q, s, z, 4, gs).shape == (0, N)
    x = torch.randn(K, 6).t()  # non-contiguous rows
    w = Q.dequantize(q, s, z, 4, gs)
    assert_accurate(ms.ops.qlinear(x, q, s, z, 4, gs, activations="float"), x.double() @ w.double().t())


def test_opcheck():
    E, N, K, gs = 3, 20, 64, 32
    for scheme, sym in SCHEMES:
        bits = Q.SCHEMES[scheme]
        _, q, s, z = packed((E, N, K), scheme, sym, gs)
        a = torch.randn(7, K)
        offsets = make_offsets([2, 0, 5])
        torch.library.opcheck(ops.qgrouped_mm.default, (a, q, s, z, offsets, bits, gs, torch.randn(E, N)))
        torch.library.opcheck(
            ops.qgrouped_mm.default, (a.bfloat16(), q, s, z, offsets.int(), bits, gs, None, "float")
        )
        torch.library.opcheck(
            ops.qlinear.default, (a, q[0], s[0], None if z is None else z[0], bits, gs, None, "float")
        )


def test_inference_only():
    _, q, s, z = packed((16, 64), "int8", True, 32)
    x = torch.randn(3, 64, requires_grad=True)
    y = ms.ops.qlinear(x, q, s, z, 8, 32)
    with pytest.raises(RuntimeError, match="qlinear is inference only"):
        y.sum().backward()


def test_bad_input_names_the_argument():
    E, N, K, gs = 2, 8, 64, 32
    _, q, s, z = packed((E, N, K), "int4", False, gs)
    a, off = torch.randn(4, K), make_offsets([1, 3])
    f = ops.qgrouped_mm

    def bad(match, *args):
        with pytest.raises(RuntimeError, match=match):
            f(*args)

    bad("bits must be 4 or 8, got 3", a, q, s, z, off, 3, gs, None)
    bad("group_size must be a positive multiple of 32", a, q, s, z, off, 4, 48, None)
    bad("group_size 128 does not divide K = 64", a, q, s, z, off, 4, 128, None)
    bad(r"qweight must have shape \[E, N, K/2\] with K = 64", a, q[..., :16], s, z, off, 4, gs, None)
    bad(
        r"qweight must have shape \[E, N, K\] with K = 64 \(a's columns\) at 8 bits",
        a,
        q,
        s,
        z,
        off,
        8,
        gs,
        None,
    )
    bad("qweight must be uint8", a, q.to(torch.int8), s, z, off, 4, gs, None)
    bad("scale must be float32", a, q, s.half(), z, off, 4, gs, None)
    bad(r"zero must have shape \[E, N, K/group_size\] = \[2, 8, 2\]", a, q, s, z[:, :, :1], off, 4, gs, None)
    bad(r"bias must have shape \[E, N\] = \[2, 8\]", a, q, s, z, off, 4, gs, torch.randn(8))
    bad("a must be float32, bfloat16 or float16", a.double(), q, s, z, off, 4, gs, None)
    bad("offsets do not add up", a, q, s, z, make_offsets([3, 3]), 4, gs, None)
    bad("offsets must have one entry per group", a, q, s, z, make_offsets([4]), 4, gs, None)
    with pytest.raises(RuntimeError, match=r"moestream.qlinear: qweight must have 2 dimensions"):
        ops.qlinear(a, q, s[0], None, 4, gs, None)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "native"])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
def test_every_isa_matches(monkeypatch, isa, scheme, symmetric):
    # MOESTREAM_QUANT_ISA caps the kernels' ISA, so the AVX2 and portable versions run here too
    if isa != "native":
        monkeypatch.setenv("MOESTREAM_QUANT_ISA", isa)
    bits = Q.SCHEMES[scheme]
    for counts, M, K, N in CASES[:3]:
        gs = 32 if K % 64 else 64
        a = torch.randn(M, K).bfloat16()
        _, q, s, z = packed((len(counts), N, K), scheme, symmetric, gs)
        offsets = make_offsets(counts)
        bias = torch.randn(len(counts), N)
        out = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, bias, "float")
        ref64, w64 = dequant_ref(a, q, s, z, bits, gs, offsets, bias)
        assert_accurate(out, ref64, R.grouped_mm(a, w64.bfloat16(), offsets, True, bias.bfloat16()), isa)
        out32 = ms.ops.qgrouped_mm(a.float(), q, s, z, offsets, bits, gs, bias, "float")
        assert_accurate(out32, ref64, None, isa)


# The shape classes of the bfloat16 kernels (VDPBF16PS with native ISA, the float32 AVX-512 one
# with "avx512"): every row count of a group from 1 to 17 (row blocks of 1-8 and a second block),
# output columns that leave a remainder after the blocks of 8, 4 and 2 weight rows, group sizes
# 32 / 64 / 96 / 128 with one or several groups per row, empty groups, rows past offsets[-1].
BF16_CASES = [
    (list(range(1, 18)) + [0], 160, 32, 19),
    ([1, 0, 2, 3, 0, 4], 12, 128, 13),
    ([5, 6, 7, 8], 30, 192, 7),
    ([9, 0, 16], 26, 96, 21),
    ([1], 1, 384, 11),
    ([2, 1], 5, 256, 1),
]


def bf16_bound(out, ref64):
    # our float32 sums lose far less than a bfloat16 step: every element within one bfloat16
    # rounding of the exact result (+ float32 noise relative to the largest), a much tighter bound
    # than the 2x-the-reference rule, so a wrong zero-point or scale term cannot hide in it
    diff = (out.double() - ref64).abs()
    bound = ref64.abs() * 2.0**-8 + ref64.abs().max() * 1e-5 + 1e-30
    return float((diff / bound).max())


@pytest.mark.parametrize("isa", ["avx512", "native"])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: f"M{c[1]}_K{c[2]}_N{c[3]}_E{len(c[0])}")
def test_bf16_rows_every_shape_class(monkeypatch, isa, scheme, symmetric, case):
    if isa != "native":
        monkeypatch.setenv("MOESTREAM_QUANT_ISA", isa)
    counts, M, K, N = case
    E, bits = len(counts), Q.SCHEMES[scheme]
    gs = next(g for g in (128, 96, 64, 32) if K % g == 0 and (K // g > 1 or K == 32))
    # activations with a common offset: the zero points' term (sum of a over each group) is large
    a = (torch.randn(M, K) + 2.0).bfloat16()
    _, q, s, z = packed((E, N, K), scheme, symmetric, gs)
    offsets = make_offsets(counts)
    bias = torch.randn(E, N).bfloat16()
    out = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, bias, "float")
    ref64, _ = dequant_ref(a, q, s, z, bits, gs, offsets, bias)
    used = int(offsets[-1])
    assert out.dtype == torch.bfloat16 and bool((out[used:] == 0).all())
    ref_lowp = R.grouped_mm(a, Q.dequantize(q, s, z, bits, gs, torch.bfloat16), offsets, True, bias)
    assert_accurate(out, ref64, ref_lowp, "qgrouped_mm")
    # the rows of groups of up to 16 rows (the register kernels; larger ones take bf16 panels)
    small = torch.repeat_interleave(torch.tensor([c <= 16 for c in counts]), torch.tensor(counts))
    assert bf16_bound(out[:used][small], ref64[:used][small]) <= 1.0
    # qlinear on the rows of the first group: the same kernels through the other entry point
    rows = a[: max(counts[0], 1)]
    w64 = Q.dequantize(q[0], s[0], None if z is None else z[0], bits, gs, torch.float64)
    out_l = ms.ops.qlinear(rows, q[0], s[0], None if z is None else z[0], bits, gs, None, "float")
    assert bf16_bound(out_l, rows.double() @ w64.t()) <= 1.0


def test_bf16_kernel_matches_float32_kernel(monkeypatch):
    # decode: the VDPBF16PS kernel and the float32 AVX-512 kernel compute the same function; both
    # return bfloat16, so they may differ by the rounding of nearly-tied values only
    E, N, K, gs = 4, 70, 512, 64
    a = torch.randn(6, K).bfloat16()
    for scheme, sym in SCHEMES:
        bits = Q.SCHEMES[scheme]
        _, q, s, z = packed((E, N, K), scheme, sym, gs)
        offsets = make_offsets([1, 2, 0, 3])
        native = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, None, "float")
        monkeypatch.setenv("MOESTREAM_QUANT_ISA", "avx512")
        fp32 = ms.ops.qgrouped_mm(a, q, s, z, offsets, bits, gs, None, "float")
        monkeypatch.delenv("MOESTREAM_QUANT_ISA")
        diff = (native.float() - fp32.float()).abs()
        assert float((diff / (fp32.float().abs() * 2.0**-7 + 1e-3)).max()) <= 1.0, scheme


# ----------------------------------------------------------------------------------------------
# modules and models


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize(("scheme", "symmetric"), SCHEMES, ids=SCHEME_IDS)
def test_quantized_experts_match_the_loop(scheme, symmetric, weight_layout):
    E, H, I, T, k = 6, 64, 32, 9, 2
    ge = ms.nn.GroupedExperts(E, H, I, weight_layout=weight_layout, bias=True)
    with torch.no_grad():
        ge.gate_up_proj_bias.normal_()
        ge.down_proj_bias.normal_()
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"experts": ge}), torch.nn.ModuleDict()])
    assert Q.quantize_model(holder, scheme, 32, symmetric, blocks="layers") == 2
    qe = holder.layers[0]["experts"]
    assert isinstance(qe, Q.QuantizedGroupedExperts) and qe.gate_up_proj.transposed == (
        weight_layout == "in_out"
    )
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[0] = torch.tensor([0, 1])  # expert 5 may get no token; make sure two share a token
    rw = torch.rand(T, k)
    w1 = qe.gate_up_proj.dequantize(torch.float64)  # [E, 2I, H]
    w2 = qe.down_proj.dequantize(torch.float64)
    ref = R.moe_experts_loop(
        x.double(),
        ids,
        rw.double(),
        w1,
        w2,
        qe.gate_up_proj_bias.double(),
        qe.down_proj_bias.double(),
        "swiglu",
        "concat",
        True,
    )
    assert_accurate(qe(x, ids, rw), ref, None, "QuantizedGroupedExperts")


def test_quantize_model_keeps_what_it_should():
    model = testing.build_model("qwen3_moe", testing.QUANT_SIZES["qwen3_moe"])
    before = {n: (p.dtype, p.shape) for n, p in model.named_parameters()}
    n = Q.quantize_model(model, "int8", 64)
    layers = model.model.layers
    # per layer: q, k, v, o + the experts' two weights
    assert n == len(layers) * 6
    for layer in layers:
        assert isinstance(layer.mlp.experts, Q.QuantizedGroupedExperts)
        assert isinstance(layer.self_attn.q_proj, Q.QuantizedLinear)
    after = dict(model.named_parameters())
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.mlp.gate.weight",
    ):
        assert name in after and (after[name].dtype, after[name].shape) == before[name]
    assert Q.quantize_model(model, "int8", 64) == 0  # already done
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_model(model, "int4", 64)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_accuracy_report(family, capsys):
    # Random-weight models: the errors of every layer add up through the residual stream, a
    # pessimistic stand-in for trained checkpoints (docs: published figures). One matmul loses
    # ~0.5% (int8) / ~10% (int4, group 64) relative on Gaussian weights; the bounds are a few times
    # the measured values and far below what a wrong expert or a wrong group gives (errors ~1).
    # With the activations in int8 too (group 64, scale max|a| / 127: ~0.5% per matmul) the int8
    # model's error grows by less than 2.5x (1.7-1.8x measured) and the int4 model's barely.
    rows = []
    for compress, bound, cos in (("int8", 0.05, 0.998), ("int4", 0.6, 0.8)):
        for act in ("float", "int8"):
            # one sequence of 16 tokens: every matmul has at most 16 rows, which the int8 kernels take
            r = testing.quant_accuracy(family, compress, 64, batch=1, activations=act)
            rows.append(r)
            assert r["logits_rel_err"] < bound, r
            assert r["logits_cosine"] > cos, r
            assert all(e < bound for e in r["layers"]), r
    assert rows[0]["logits_rel_err"] < rows[2]["logits_rel_err"] / 5
    assert rows[1]["logits_rel_err"] < 2.5 * rows[0]["logits_rel_err"]
    assert rows[3]["logits_rel_err"] < 1.2 * rows[2]["logits_rel_err"]
    with capsys.disabled():
        print(f"\n{family}: per-layer output rel err (end to end) | logits rel err | cosine | top-1 agree")
        for r in rows:
            layers = " ".join(f"{e:.4f}" for e in r["layers"])
            print(
                f"  {r['compress']} g{r['group_size']}, {r['activations']} activations: {layers} | "
                f"{r['logits_rel_err']:.4f} | {r['logits_cosine']:.5f} | {r['top1_agree']:.3f}"
            )


def test_generate_runs_and_is_deterministic():
    model = testing.build_model("qwen3_moe", testing.QUANT_SIZES["qwen3_moe"])
    Q.quantize_model(model, "int4", 64)
    ids = testing.input_ids(1, 5)
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert a.shape == (1, 11) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# compressed checkpoints and offloading


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def quantized_copy(model, scheme):
    q = copy.deepcopy(model)
    Q.quantize_model(q, scheme)
    return q


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offload_compress_streams_the_packed_weights(storage, tmp_path):
    model = testing.build_model("llama", testing.QUANT_SIZES["llama"])
    ids = testing.input_ids(1, 5)
    scheme = Q.QuantScheme("int4", 32)
    ref = greedy(quantized_copy(model, scheme), ids)
    plain, spare = copy.deepcopy(model), copy.deepcopy(model)
    ms.offload(plain, device="cpu", storage="cpu", prefetch=1)
    ms.offload(model, device="cpu", storage=storage, offload_dir=str(tmp_path), prefetch=1, compress=scheme)
    assert isinstance(model.model.layers[0].mlp.down_proj, Q.QuantizedLinear)
    assert torch.equal(greedy(model, ids), ref)
    st, st0 = ms.offload_stats(model), ms.offload_stats(plain)
    # float32 weights -> int4 group 32 (4.5 bits per weight) in the linears; norms stay float32
    assert st["streamed_bytes"] < st0["streamed_bytes"] / 5
    with pytest.raises(ValueError, match="unknown scheme 'int2'"):
        ms.offload(spare, device="cpu", compress="int2")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_save_layered_compressed_roundtrip(family, tmp_path):
    model = testing.build_model(family, testing.QUANT_SIZES[family])
    ids = testing.input_ids(1, 5)
    ref = greedy(quantized_copy(model, "int8"), ids)
    ms.save_layered(model, tmp_path, compress="int8", progress=False)
    assert not any(isinstance(m, Q.PackedWeight) for m in model.modules())  # the model is unchanged
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    quant = index["metadata"]["quant"]
    assert "model.layers.0.self_attn.q_proj.weight" in quant
    assert quant["model.layers.0.self_attn.q_proj.weight"]["scheme"] == "int8"
    assert "model.embed_tokens.weight" in index["weight_map"] and "lm_head.weight" in index["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight.qweight" in index["weight_map"]
    from moestream.offload import safetensors_io as sio

    _, meta = sio.read_header(str(tmp_path / "model-layer-00000.safetensors"))
    assert json.loads(meta["moestream.quant"]).keys() == {n for n in quant if n.startswith("model.layers.0.")}
    for storage in ("disk", "cpu"):
        streamed = ms.load_layered(tmp_path, device="cpu", storage=storage, prefetch=1)
        assert isinstance(streamed.model.layers[1].self_attn.o_proj, Q.QuantizedLinear)
        assert torch.equal(greedy(streamed, ids), ref)
    with pytest.raises(ValueError, match="compressed with"):
        ms.load_layered(tmp_path, device="cpu", compress="int4")


@pytest.mark.usefixtures("one_thread")
def test_load_offloaded_compresses_an_uncompressed_checkpoint(tmp_path):
    model = testing.build_model("qwen3_moe", testing.QUANT_SIZES["qwen3_moe"])
    ids = testing.input_ids(1, 5)
    ref = greedy(quantized_copy(model, "int4"), ids)
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # experts stored per expert, fused at load
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every checkpoint tensor is used
        streamed = ms.load_offloaded(tmp_path, device="cpu", storage="disk", prefetch=1, compress="int4")
    assert isinstance(streamed.model.layers[0].mlp.experts, Q.QuantizedGroupedExperts)
    assert torch.equal(greedy(streamed, ids), ref)


@pytest.mark.usefixtures("one_thread")
def test_compressed_checkpoint_metadata_must_match(tmp_path):
    model = testing.build_model("llama", testing.QUANT_SIZES["llama"])
    ms.save_layered(model, tmp_path, compress="int4", progress=False)
    path = tmp_path / "model.safetensors.index.json"
    good = json.loads(path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"

    def with_entry(**change):
        index = copy.deepcopy(good)
        index["metadata"]["quant"][name].update(change)
        path.write_text(json.dumps(index))

    with_entry(group_size=32)
    with pytest.raises(
        ValueError, match=rf"'{name}.scale'.*is torch.float32 \[256, 2\].*needs torch.float32 \[256, 4\]"
    ):
        ms.load_layered(tmp_path, device="cpu")
    with_entry(scheme="int8", bits=8)
    with pytest.raises(ValueError, match=rf"'{name}.qweight'.*needs torch.uint8 \[256, 128\]"):
        ms.load_layered(tmp_path, device="cpu")
    with_entry(scheme="int3")
    with pytest.raises(ValueError, match=rf"'{name}'.*unknown scheme 'int3'"):
        ms.load_layered(tmp_path, device="cpu")
    with_entry(bits=8)
    with pytest.raises(ValueError, match=rf"'{name}'.*bits 8 disagree with int4"):
        ms.load_layered(tmp_path, device="cpu")
    with_entry(symmetric=False)
    with pytest.raises(ValueError, match=rf"'{name}.zero'.*is missing"):
        ms.load_layered(tmp_path, device="cpu")
    path.write_text(json.dumps(good))
    assert isinstance(ms.load_layered(tmp_path, device="cpu"), torch.nn.Module)


def test_quant_bench_suite_tiny_real_run(tmp_path):
    from moestream.bench.__main__ import main

    path = tmp_path / "quant.json"
    args = ["--quick", "--threads", "1", "--no-progress", "--device", "cpu", "--shape", "tiny"]
    rc = main([*args, "--suite", "quant", "--dtype", "bfloat16", "--tokens", "1,16", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"experts_int8", "experts_int4"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["error"] <= 5e-2
    for op, ratio in (("experts_int8", 1.6), ("experts_int4", 3.0)):
        for T in (1, 16):
            grp = {r["impl"]: r for r in rows if r["op"] == op and r["tokens"] == T}
            # each row counts its own weight bytes: packed codes + scales against bfloat16
            assert grp["dense"]["weight_bytes"] / grp["moestream"]["weight_bytes"] > ratio
            assert "dense" in grp["moestream"]["speedup"]
