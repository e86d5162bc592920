"""moestream.nn: Router, GroupedExperts, SharedExpert, MoE against plain-PyTorch formulations."""

from __future__ import annotations

import moestream as ms
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_accurate, rel_err
from moestream import reference as R
from moestream.nn import ROUTING_PRESETS, GroupedExperts, MoE, Router, Routing, SharedExpert

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


PRESETS = list(ROUTING_PRESETS)


def _routing(name: str, E: int) -> Routing:
    if name == "deepseek_v3":
        return Routing.preset(
            name, num_groups=4 if E % 4 == 0 else 1, topk_groups=2 if E % 4 == 0 else 1, scale=2.5
        )
    return Routing.preset(name)


def _randomize(module: torch.nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.1)


# ------------------------------------------------------------------------------------------------
# oracle: the block written out with the reference ops and ordinary torch


def _ref_router(router: Router, x: torch.Tensor):
    r = router.routing
    x = x.reshape(-1, router.hidden_size)
    if r.logits_fp32 or x.dtype == torch.float64:
        logits = F.linear(
            x.double(), router.weight.double(), None if router.bias is None else router.bias.double()
        )
    else:
        logits = F.linear(x, router.weight, router.bias)
    w, ids = R.router_topk(
        logits.double(),
        router.top_k,
        r.score,
        r.topk_first,
        router.e_score_correction_bias,
        r.num_groups,
        r.topk_groups,
        r.normalize,
        r.scale,
    )
    return logits, w, ids


def _ref_moe(moe: MoE, x: torch.Tensor, ids=None) -> torch.Tensor:
    """The MoE in float64 with the reference expert loop; ``ids`` forces the selection (so that a
    low-precision run is compared with the same experts)."""
    router, experts = moe.submodule("router"), moe.submodule("experts")
    x64 = x.reshape(-1, moe.hidden_size).double()
    _, w, ref_ids = _ref_router(router, x.reshape(-1, moe.hidden_size))
    if ids is not None:
        # recompute the weights for the given ids in float64
        logits64 = F.linear(
            x64, router.weight.double(), None if router.bias is None else router.bias.double()
        )
        w = _weights_for_ids(router.routing, logits64, ids)
    ids = ref_ids if ids is None else ids
    w = w.double()
    ex = {k: (None if v is None else v.double()) for k, v in _expert_tensors(experts).items()}
    y = _experts_loop(experts, x64, ids, w, ex, router.routing.weight_on_input)
    if moe.has_shared_expert:
        shared = moe.submodule("shared_expert")
        s = F.linear(
            F.silu(F.linear(x64, shared.gate_proj.weight.double()))
            * F.linear(x64, shared.up_proj.weight.double()),
            shared.down_proj.weight.double(),
        )
        if moe.has_shared_expert_gate:
            s = torch.sigmoid(F.linear(x64, moe.submodule("shared_expert_gate").weight.double())) * s
        y = y + s
    return y.view(x.shape)


def _weights_for_ids(r: Routing, logits64: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if r.topk_first:
        top = logits64.gather(1, ids)
        w = torch.softmax(top, -1) if r.score == "softmax" else torch.sigmoid(top)
    else:
        s = torch.softmax(logits64, -1) if r.score == "softmax" else torch.sigmoid(logits64)
        w = s.gather(1, ids)
    if r.normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * r.scale


def _expert_tensors(experts: GroupedExperts) -> dict:
    return dict(
        w1=experts.gate_up_proj, w2=experts.down_proj, b1=experts.gate_up_proj_bias, b2=experts.down_proj_bias
    )


def _expert_args(e: GroupedExperts) -> dict:
    return dict(kind=e.activation, layout=e.layout, transpose_b=e.transpose_b, alpha=e.alpha, limit=e.limit)


def _experts_loop(experts, x, ids, w, ex, weight_on_input: bool) -> torch.Tensor:
    """The reference expert loop with ``experts``' settings and the tensors ``ex``; with
    ``weight_on_input`` (Llama 4) the routing weight scales each slot's expert input."""
    args = _expert_args(experts)
    if not weight_on_input:
        return R.moe_experts_loop(x, ids, w, ex["w1"], ex["w2"], ex["b1"], ex["b2"], **args)
    T, k = ids.shape
    xs = (x.unsqueeze(1) * w.unsqueeze(-1)).reshape(T * k, -1)
    ones = torch.ones(T * k, 1, dtype=x.dtype, device=x.device)
    y = R.moe_experts_loop(xs, ids.reshape(-1, 1), ones, ex["w1"], ex["w2"], ex["b1"], ex["b2"], **args)
    return y.view(T, k, -1).sum(1)


def _family_moe(preset: str, H=24, I=20, E=8, k=2, device="cpu", dtype=torch.float32) -> MoE:
    kw: dict = {}
    if preset == "qwen2_moe":
        kw = dict(shared_expert=I + 4, shared_expert_gate=True)
    elif preset == "deepseek_v3":
        kw = dict(shared_expert=2 * I)
    elif preset == "gpt_oss":
        kw = dict(
            activation="gptoss",
            layout="interleaved",
            weight_layout="in_out",
            expert_bias=True,
            return_router="weights",
        )
    elif preset == "llama4":
        k = 1
        kw = dict(shared_expert=I, weight_layout="in_out", return_router="logits")
    moe = MoE(H, I, E, k, _routing(preset, E), device=device, dtype=dtype, **kw)
    _randomize(moe)
    return moe


# ------------------------------------------------------------------------------------------------
# Router


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_router_matches_reference(device, preset, dtype):
    E = 8
    router = Router(24, E, 1 if preset == "llama4" else 3, _routing(preset, E), device=device, dtype=dtype)
    _randomize(router, 0.5)
    x = torch.randn(2, 9, 24, device=device, dtype=dtype)
    logits, w, ids = router(x)
    ref_logits, ref_w, ref_ids = _ref_router(router, x)
    want_logits_dtype = torch.float32 if router.routing.logits_fp32 else dtype
    assert logits.dtype == want_logits_dtype and logits.shape == (18, E)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ref_ids.cpu())
    want_w_dtype = logits.dtype if router.routing.weights_dtype == "logits" else torch.float32
    assert w.dtype == want_w_dtype
    if not router.routing.logits_fp32:
        torch.testing.assert_close(logits, ref_logits.to(dtype), rtol=0, atol=0)  # the same F.linear
    # weights: from these very logits, against the float64 reference
    w64, _ = R.router_topk(logits.double(), router.top_k, **_topk_kwargs(router))
    assert_accurate(w.float() if w.dtype == torch.float32 else w, w64, w64.to(w.dtype), what="weights")


def _topk_kwargs(router: Router) -> dict:
    r = router.routing
    return dict(
        score=r.score,
        topk_first=r.topk_first,
        bias=router.e_score_correction_bias,
        num_groups=r.num_groups,
        topk_groups=r.topk_groups,
        normalize=r.normalize,
        scale=r.scale,
    )


def test_router_parameters_and_buffers():
    r = Router(16, 8, 2, "deepseek_v3")
    assert dict(r.named_parameters()).keys() == {"weight"}
    assert r.state_dict().keys() == {"weight", "e_score_correction_bias"}
    assert r.e_score_correction_bias.dtype == torch.float32
    r = Router(16, 8, 2, "gpt_oss", dtype=torch.bfloat16)
    assert r.state_dict().keys() == {"weight", "bias"} and r.bias.dtype == torch.bfloat16
    r = Router(16, 8, 2, "mixtral")
    assert r.bias is None and r.e_score_correction_bias is None


# ------------------------------------------------------------------------------------------------
# GroupedExperts


EXPERT_VARIANTS = [
    dict(activation="swiglu", layout="concat", weight_layout="out_in", bias=False),
    dict(activation="geglu", layout="concat", weight_layout="in_out", bias=False),
    dict(activation="gptoss", layout="interleaved", weight_layout="in_out", bias=True),
    dict(activation="swiglu", layout="interleaved", weight_layout="out_in", bias=True),
]


@pytest.mark.parametrize("variant", EXPERT_VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_experts_match_reference_loop(device, variant, dtype):
    E, H, I, T, k = 5, 19, 13, 23, 2
    experts = GroupedExperts(E, H, I, device=device, dtype=dtype, **variant)
    _randomize(experts, 0.5)
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]).to(device)  # expert E-1 gets no token
    w = torch.rand(T, k, device=device)
    out = experts(x, ids, w)
    assert out.dtype == dtype and out.shape == (T, H)
    ex = _expert_tensors(experts)
    args = _expert_args(experts)
    d = {kk: (None if v is None else v.double()) for kk, v in ex.items()}
    ref64 = R.moe_experts_loop(x.double(), ids, w.double(), d["w1"], d["w2"], d["b1"], d["b2"], **args)
    ref_lowp = R.moe_experts_loop(x, ids, w, ex["w1"], ex["w2"], ex["b1"], ex["b2"], **args)
    assert_accurate(out, ref64, ref_lowp, what="experts")


@pytest.mark.parametrize("variant", EXPERT_VARIANTS[1:3], ids=["geglu", "gptoss"])
def test_grouped_experts_gradients(device, variant):
    E, H, I, T, k = 4, 11, 7, 17, 2
    experts = GroupedExperts(E, H, I, device=device, dtype=torch.float32, **variant)
    _randomize(experts, 0.5)
    x = torch.randn(T, H, device=device, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device)
    w = torch.rand(T, k, device=device, requires_grad=True)
    gy = torch.randn(T, H, device=device)
    out = experts(x, ids, w)
    grads = torch.autograd.grad(out, [x, w, *experts.parameters()], gy)
    ex = _expert_tensors(experts)
    args = _expert_args(experts)
    ref = R.moe_experts_loop(x, ids, w, ex["w1"], ex["w2"], ex["b1"], ex["b2"], **args)
    ref_grads = torch.autograd.grad(ref, [x, w, *experts.parameters()], gy)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-5


# ------------------------------------------------------------------------------------------------
# MoE


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_matches_reference(device, preset, dtype):
    moe = _family_moe(preset, device=device, dtype=dtype)
    x = torch.randn(3, 7, 24, device=device, dtype=dtype)
    res = moe(x)
    y = res[0] if isinstance(res, tuple) else res
    assert y.shape == x.shape and y.dtype == dtype
    _, _, ids = moe.submodule("router")(x)
    # the oracle uses the same expert selection: at low precision a near-tie may legitimately flip
    ref64 = _ref_moe(moe, x, ids=ids)
    if dtype == torch.float32:
        assert_accurate(y, ref64, what=preset)
    else:
        # the reference loop run at this dtype bounds what the precision costs
        ref_lowp = _lowp_reference(moe, x, ids)
        assert_accurate(y, ref64, ref_lowp, what=preset)
    if preset == "gpt_oss":
        assert res[1].shape == (21, moe.top_k)
    if preset == "llama4":
        assert res[1].shape == (21, moe.num_experts)


def _lowp_reference(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    router, experts = moe.submodule("router"), moe.submodule("experts")
    x2 = x.reshape(-1, moe.hidden_size)
    logits, w, _ = router(x2)
    on_input = router.routing.weight_on_input
    y = _experts_loop(experts, x2, ids, w.to(x.dtype) if on_input else w, _expert_tensors(experts), on_input)
    if moe.has_shared_expert:
        s = moe.submodule("shared_expert")(x2)
        if moe.has_shared_expert_gate:
            s = torch.sigmoid(moe.submodule("shared_expert_gate")(x2)) * s
        y = y + s
    return y.view(x.shape)


@pytest.mark.parametrize("preset", ["mixtral", "deepseek_v3", "llama4", "gpt_oss"])
def test_moe_gradcheck_float64(device, preset):
    moe = _family_moe(preset, H=6, I=4, E=4, k=2, device=device, dtype=torch.float64)
    x = torch.randn(5, 6, device=device, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        out = torch.func.functional_call(moe, dict(zip(names, params)), (x,))
        return out[0] if isinstance(out, tuple) else out

    names = [n for n, _ in moe.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in moe.named_parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_moe_gradients_match_reference(device):
    moe = _family_moe("qwen2_moe", H=16, I=12, E=6, k=2, device=device, dtype=torch.float64)
    x = torch.randn(2, 9, 16, device=device, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(x)
    params = [x, *moe.parameters()]
    grads = torch.autograd.grad(moe(x), params, gy)
    ref_grads = torch.autograd.grad(_ref_moe(moe, x), params, gy)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-10


def test_moe_edge_shapes(device):
    # zero tokens
    moe = _family_moe("qwen2_moe", device=device)
    x = torch.randn(0, 24, device=device, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    # k = E and a single expert
    for E, k in ((4, 4), (1, 1)):
        moe = MoE(24, 20, E, k, "mixtral", device=device)
        _randomize(moe)
        x = torch.randn(5, 24, device=device)
        assert_accurate(moe(x), _ref_moe(moe, x), what=f"E={E} k={k}")
    # odd sizes, non-contiguous input
    moe = MoE(33, 17, 5, 2, "qwen3_moe", device=device)
    _randomize(moe)
    x = torch.randn(33, 11, device=device).t()
    assert not x.is_contiguous()
    assert_accurate(moe(x), _ref_moe(moe, x), what="non-contiguous")


def test_moe_module_names_and_state_dict():
    moe = MoE(8, 6, 4, 2, "deepseek_v3", shared_expert=6, module_names={"shared_expert": "shared_experts"})
    keys = set(moe.state_dict())
    assert keys == {
        "gate.weight",
        "gate.e_score_correction_bias",
        "experts.gate_up_proj",
        "experts.down_proj",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
    }
    assert isinstance(moe.submodule("shared_expert"), SharedExpert)
    moe = MoE(
        8, 6, 4, 2, "gpt_oss", expert_bias=True, weight_layout="in_out", module_names={"router": "router"}
    )
    assert moe.router.weight.shape == (4, 8)
    assert moe.experts.gate_up_proj.shape == (4, 8, 12) and moe.experts.down_proj.shape == (4, 6, 8)
    assert moe.experts.gate_up_proj_bias.shape == (4, 12) and moe.experts.down_proj_bias.shape == (4, 8)


def test_moe_on_meta_device_allocates_nothing():
    moe = MoE(4096, 14336, 8, 2, "mixtral", device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in moe.parameters())
    assert moe.experts.gate_up_proj.shape == (8, 2 * 14336, 4096)


def test_moe_jitter_only_in_training(device):
    moe = MoE(16, 12, 4, 2, "mixtral", jitter_noise=0.2, device=device)
    _randomize(moe)
    x = torch.randn(10, 16, device=device)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    torch.manual_seed(0)
    a = moe(x)
    torch.manual_seed(0)
    b = moe(x)
    torch.manual_seed(1)
    c = moe(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_moe_torch_compile_fullgraph(device):
    moe = _family_moe("deepseek_v3", device=device)
    x = torch.randn(4, 5, 24, device=device, requires_grad=True)
    want = moe(x)
    gwant = torch.autograd.grad(want.sum(), [x, moe.experts.gate_up_proj])
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    ggot = torch.autograd.grad(got.sum(), [x, moe.experts.gate_up_proj])
    torch._dynamo.reset()
    assert rel_err(got, want) <= 1e-6
    for a, b in zip(ggot, gwant):
        assert rel_err(a, b) <= 1e-6


def test_functional_aux_losses_from_router_outputs(device):
    # the router's outputs feed ms.router_aux_loss / router_z_loss directly
    router = Router(16, 6, 2, "qwen3_moe", device=device)
    _randomize(router)
    logits, _, ids = router(torch.randn(12, 16, device=device))
    aux = ms.router_aux_loss(logits, ids)
    torch.testing.assert_close(aux, R.router_aux_loss(logits, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ms.router_z_loss(logits), R.router_z_loss(logits), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bad arguments


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown routing preset 'mixtrall'"):
        MoE(8, 8, 4, 2, "mixtrall")
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got k=5"):
        Router(8, 4, 5)
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=8"):
        Router(8, 8, 2, Routing.preset("deepseek_v3", num_groups=3, topk_groups=1))
    with pytest.raises(ValueError, match="topk_groups <= num_groups"):
        Routing(num_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="Routing.score must be one of"):
        Routing(score="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        GroupedExperts(4, 8, 8, activation="relu")
    with pytest.raises(ValueError, match="weight_layout must be one of"):
        GroupedExperts(4, 8, 8, weight_layout="transposed")
    with pytest.raises(ValueError, match="layout must be one of"):
        GroupedExperts(4, 8, 8, layout="split")
    with pytest.raises(ValueError, match="shared_expert_gate=True needs a shared_expert"):
        MoE(8, 8, 4, 2, shared_expert_gate=True)
    with pytest.raises(ValueError, match="return_router must be"):
        MoE(8, 8, 4, 2, return_router="ids")
    with pytest.raises(ValueError, match="unknown module_names keys"):
        MoE(8, 8, 4, 2, module_names={"gate": "router"})
    moe = MoE(8, 8, 4, 2)
    with pytest.raises(RuntimeError):  # wrong hidden size reaches the ops' / linear's checks
        moe(torch.randn(3, 7))


def test_experts_too_large_to_allocate_are_named():
    # 2^20 experts of 8 x 2^30: 2^57 bytes of weights
    with pytest.raises(MemoryError, match=r"num_experts=1048576 .* could not be allocated"):
        ms.nn.MoE(8, 2**30, 2**20, 2)
