"""Router ops: router_topk (+ backward), router_aux_loss and router_z_loss (+ backwards).

Compared with python/moestream/reference.py on fresh random logits for every routing variant and
dtype (ids exactly, weights within the float32 rule), cross-checked against transformers' own router
modules, gradchecked in float64 and run through torch.library.opcheck.
"""

from __future__ import annotations

import moestream as ms
import pytest
import torch
from conftest import HAS_CUDA, assert_accurate, cuda, rel_err
from moestream import reference as R

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# name -> (E, router_topk keyword arguments); bias=True means "a random correction bias [E]"
VARIANTS = {
    "mixtral": (8, {"k": 2, "normalize": True}),
    "qwen2_moe": (60, {"k": 4}),
    "olmoe": (64, {"k": 8}),
    "deepseek_v3": (
        64,
        {
            "k": 8,
            "score": "sigmoid",
            "bias": True,
            "num_groups": 8,
            "topk_groups": 4,
            "normalize": True,
            "scale": 2.5,
        },
    ),
    "deepseek_groups_of_one": (
        12,
        {"k": 3, "score": "sigmoid", "bias": True, "num_groups": 12, "topk_groups": 5, "normalize": True},
    ),
    "gpt_oss": (32, {"k": 4, "topk_first": True}),
    "llama4": (16, {"k": 1, "topk_first": True, "score": "sigmoid"}),
    "softmax_bias_groups": (48, {"k": 6, "bias": True, "num_groups": 4, "topk_groups": 2, "scale": 0.7}),
    "topk_first_groups": (
        40,
        {"k": 5, "topk_first": True, "bias": True, "num_groups": 5, "topk_groups": 3, "normalize": True},
    ),
    "sigmoid_plain": (24, {"k": 3, "score": "sigmoid", "scale": 1.5}),
    "large_k": (96, {"k": 40, "normalize": True}),
    "large_k_sigmoid_groups": (
        128,
        {"k": 33, "score": "sigmoid", "bias": True, "num_groups": 4, "topk_groups": 3},
    ),
    "k_equals_e": (16, {"k": 16, "normalize": True}),
    # k beyond the experts of the kept groups (transformers accepts it): the remaining picks come
    # from the dropped groups, lowest ids first, with their real weights
    "groups_k_beyond_kept": (
        16,
        {
            "k": 7,
            "score": "sigmoid",
            "bias": True,
            "num_groups": 4,
            "topk_groups": 1,
            "normalize": True,
            "scale": 2.5,
        },
    ),
    # transformers' DeepSeek-V3 test config: 8 experts, 2 groups, 1 kept, k = 8
    "groups_k_equals_e": (
        8,
        {"k": 8, "score": "sigmoid", "bias": True, "num_groups": 2, "topk_groups": 1, "normalize": True},
    ),
    "topk_first_groups_k_beyond_kept": (12, {"k": 5, "topk_first": True, "num_groups": 3, "topk_groups": 1}),
}


def _args(name, device, dtype=torch.float32, T=37):
    E, kw = VARIANTS[name]
    kw = dict(kw)
    if kw.get("bias"):
        kw["bias"] = (0.1 * torch.randn(E)).to(device)
    logits = torch.randn(T, E).to(device=device, dtype=dtype)
    return logits, kw


def _ref(logits, **kw):
    kw = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    return R.router_topk(logits.detach().cpu(), **kw)


# ------------------------------------------------------------------------------------------------
# forward vs reference


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_topk_matches_reference(device, variant, dtype):
    logits, kw = _args(variant, device, dtype)
    w, ids = ms.router_topk(logits, **kw)
    rw, rids = _ref(logits, **kw)
    assert ids.dtype == torch.int64 and ids.device == logits.device
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ids.cpu(), rids), "ids differ from the reference"
    # both compute in float32 (float64) from the same logits
    assert_accurate(w, rw, what=f"{variant} weights")
    # each row's ids are distinct and ordered by descending selection score
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("variant", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_router_topk_float32_vs_float64_reference(device, variant):
    logits, kw = _args(variant, device)
    w, ids = ms.router_topk(logits, **kw)
    kw64 = {n: (v.double() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    rw64, rids64 = _ref(logits.double(), **kw64)
    assert torch.equal(ids.cpu(), rids64)
    assert_accurate(w, rw64, what="weights vs float64 reference")


@pytest.mark.parametrize("variant", ["qwen2_moe", "deepseek_v3", "gpt_oss", "large_k"])
def test_router_topk_non_contiguous(device, variant):
    E, kw = VARIANTS[variant]
    kw = dict(kw)
    if kw.get("bias"):
        kw["bias"] = (0.1 * torch.randn(2 * E, device=device))[::2]
        assert not kw["bias"].is_contiguous()
    logits = torch.randn(E, 29, device=device, dtype=torch.bfloat16).t()
    assert not logits.is_contiguous()
    w, ids = ms.router_topk(logits, **kw)
    rw, rids = _ref(logits, **kw)
    assert torch.equal(ids.cpu(), rids)
    assert_accurate(w, rw)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_router_topk_ties_pick_lower_id(device, dtype):
    # few distinct values: most rows hold ties, which go to the lower id, best first
    logits = torch.randint(0, 3, (50, 16)).to(device=device, dtype=dtype)
    for kw in (
        {"k": 5},
        {"k": 5, "score": "sigmoid", "num_groups": 4, "topk_groups": 2},
        {"k": 3, "topk_first": True},
    ):
        w, ids = ms.router_topk(logits, **kw)
        rw, rids = _ref(logits, **kw)
        assert torch.equal(ids.cpu(), rids), kw
        assert_accurate(w, rw)
    # a row of equal values picks 0..k-1 in order
    flat = torch.full((3, 10), 0.25, device=device, dtype=dtype)
    _, ids = ms.router_topk(flat, 4, score="sigmoid", num_groups=5, topk_groups=2)
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 3
    # equal group scores (top-2 sums of the logits, all 1.0): the lower group wins
    g = torch.tensor([[0.5, 0.5, 0.0, 1.0, 1.0, 0.0]], device=device, dtype=dtype)
    _, ids = ms.router_topk(g, 2, score="sigmoid", topk_first=True, num_groups=3, topk_groups=1)
    assert ids.cpu().tolist() == [[0, 1]]


def test_router_topk_nan_ranks_first_like_reference(device):
    x = torch.tensor([[0.5, float("nan"), 2.0, float("nan"), 2.0, -float("inf")]], device=device)
    for kw in ({"k": 6, "score": "sigmoid"}, {"k": 3, "score": "sigmoid", "num_groups": 3, "topk_groups": 2}):
        w, ids = ms.router_topk(x, **kw)
        rw, rids = _ref(x, **kw)
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu(), rw, equal_nan=True)


def test_router_topk_edge_shapes(device):
    # no tokens
    w, ids = ms.router_topk(torch.randn(0, 8, device=device), 2, normalize=True)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    # one expert
    w, ids = ms.router_topk(torch.randn(5, 1, device=device), 1)
    assert torch.equal(ids.cpu(), torch.zeros(5, 1, dtype=torch.int64))
    torch.testing.assert_close(w.cpu(), torch.ones(5, 1))
    w, ids = ms.router_topk(torch.randn(5, 1, device=device), 1, score="sigmoid", topk_first=True)
    assert torch.equal(ids.cpu(), torch.zeros(5, 1, dtype=torch.int64))
    # k = E everywhere: ids are a permutation, softmax weights sum to 1
    logits = torch.randn(9, 33, device=device)
    w, ids = ms.router_topk(logits, 33)
    assert torch.equal(ids.sort(dim=1).values.cpu(), torch.arange(33).expand(9, 33))
    torch.testing.assert_close(w.sum(1).cpu(), torch.ones(9))
    # a large E, k spanning both selection strategies. The logits lie on a 1/64 grid: many exact
    # ties, and no two distinct scores within rounding of each other (with 3000 continuous values
    # some neighbours are ~1 ulp apart, and there float32 rounding decides the order).
    logits = (torch.randn(4, 3000, device=device) * 64).round() / 64
    for k in (1, 16, 17, 300, 3000):
        w, ids = ms.router_topk(logits, k)
        rw, rids = _ref(logits, k=k)
        assert torch.equal(ids.cpu(), rids), k
        assert_accurate(w, rw)


def test_router_topk_bias_dtype(device):
    logits = torch.randn(20, 32, device=device)
    bias = (0.1 * torch.randn(32, device=device)).to(torch.bfloat16)
    kw = {"k": 4, "score": "sigmoid", "bias": bias, "num_groups": 4, "topk_groups": 2, "normalize": True}
    w, ids = ms.router_topk(logits, **kw)
    rw, rids = _ref(logits, **kw)
    assert torch.equal(ids.cpu(), rids)
    assert_accurate(w, rw)


# ------------------------------------------------------------------------------------------------
# backward


def _topk_weights_fn(kw):
    def f(x):
        return ms.router_topk(x, **kw)[0]

    return f


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_topk_gradcheck(device, variant):
    logits, kw = _args(variant, device, torch.float64, T=4)
    if isinstance(kw.get("bias"), torch.Tensor):
        kw["bias"] = kw["bias"].double()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(_topk_weights_fn(kw), (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [
        "mixtral",
        "olmoe",
        "deepseek_v3",
        "gpt_oss",
        "llama4",
        "softmax_bias_groups",
        "groups_k_beyond_kept",
        "topk_first_groups_k_beyond_kept",
    ],
)
def test_router_topk_backward_matches_reference(device, variant, dtype):
    logits, kw = _args(variant, device, dtype)
    gw = torch.randn(logits.shape[0], kw["k"], device=device)
    x = logits.detach().requires_grad_(True)
    w, ids = ms.router_topk(x, **kw)
    (g,) = torch.autograd.grad(w, x, gw)
    assert g.dtype == dtype and g.shape == logits.shape

    def ref_grad(inp, out_dtype):
        xr = inp.detach().cpu().to(out_dtype).requires_grad_(True)
        # the bias stays float32 (the reference upcasts it anyway) so the selection is the same
        bias_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        rkw = {n: (v.cpu().to(bias_dtype) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
        rw, rids = R.router_topk(xr, **rkw)
        assert torch.equal(rids, ids.cpu())
        return torch.autograd.grad(rw, xr, gw.cpu().to(rw.dtype))[0]

    ref64 = ref_grad(logits, torch.float64)
    ref_lowp = ref_grad(logits, dtype) if dtype in (torch.bfloat16, torch.float16) else None
    assert_accurate(g, ref64, ref_lowp, what="grad_logits")


def test_router_topk_backward_direct(device):
    # the backward op on its own: int32 ids, float64 grads, non-contiguous grad_weights
    logits = torch.randn(11, 20, device=device)
    _w, ids = ms.router_topk(logits, 4, normalize=True, scale=1.3)
    gw = torch.randn(4, 11, device=device, dtype=torch.float64).t()
    g = torch.ops.moestream.router_topk_backward(gw, logits, ids.int(), "softmax", False, True, 1.3)
    x = logits.cpu().double().requires_grad_(True)
    rw, _rids = R.router_topk(x, 4, normalize=True, scale=1.3)
    (ref,) = torch.autograd.grad(rw, x, gw.cpu())
    assert g.dtype == torch.float32
    assert_accurate(g, ref)


# ------------------------------------------------------------------------------------------------
# transformers' own routers


def _hidden(T, H, dtype=torch.float32):
    return torch.randn(T, H, dtype=dtype)


def _rows_sorted(w, ids):
    order = ids.argsort(dim=1)
    return w.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("norm", [True, False])
def test_matches_transformers_softmax_routers(norm):
    pytest.importorskip("transformers")
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    H, T = 24, 33
    routers = [
        Qwen3MoeTopKRouter(
            Qwen3MoeConfig(hidden_size=H, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
        ),
        OlmoeTopKRouter(
            OlmoeConfig(hidden_size=H, num_experts=64, num_experts_per_tok=8, norm_topk_prob=norm)
        ),
    ]
    if norm:  # Mixtral always renormalises
        routers.append(
            MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=8, num_experts_per_tok=2))
        )
    with torch.no_grad():
        for r in routers:
            r.weight.copy_(torch.randn_like(r.weight))
            logits, scores, idx = r(_hidden(T, H))
            w, ids = ms.router_topk(logits, r.top_k, normalize=norm)
            assert torch.equal(ids, idx), type(r).__name__
            assert rel_err(w, scores) <= 1e-6, type(r).__name__


def test_matches_transformers_deepseek_v3_router():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    H, T = 24, 41
    cfg = DeepseekV3Config(
        hidden_size=H, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    r = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn_like(r.weight))
        r.e_score_correction_bias.copy_(0.1 * torch.randn(64))
        logits, scores, idx = r(_hidden(T, H))
        w, ids = ms.router_topk(
            logits, 6, score="sigmoid", bias=r.e_score_correction_bias, num_groups=8, topk_groups=3,
            normalize=True, scale=2.5,
        )  # fmt: skip
    # transformers selects with sorted=False: compare per row in id order
    w, ids = _rows_sorted(w, ids)
    scores, idx = _rows_sorted(scores, idx)
    assert torch.equal(ids, idx)
    assert rel_err(w, scores) <= 1e-6


def test_k_beyond_kept_groups_picks_dropped_groups_with_real_weights(device):
    # E = 16 in 4 groups, 1 kept, k = 7: the 4 kept experts first (by score), then 3 from the
    # dropped groups, lowest ids first, weighted by their own scores
    E, G, k, T = 16, 4, 7, 23
    logits = torch.randn(T, E, device=device)
    bias = 0.1 * torch.randn(E, device=device)
    for normalize in (False, True):
        w, ids = ms.router_topk(
            logits, k, score="sigmoid", bias=bias, num_groups=G, topk_groups=1, normalize=normalize
        )
        ids, w = ids.cpu(), w.cpu()
        s = torch.sigmoid(logits.cpu())
        sel = (s + bias.cpu()).view(T, G, E // G)
        kept = sel.topk(2, dim=-1).values.sum(-1).argmax(-1)  # the one kept group per token
        for t in range(T):
            g = int(kept[t])
            in_kept = torch.arange(g * 4, g * 4 + 4)
            order = in_kept[sel[t, g].argsort(descending=True)]
            assert ids[t, :4].tolist() == order.tolist()
            dropped = [e for e in range(E) if e // 4 != g][:3]
            assert ids[t, 4:].tolist() == dropped
            raw = s[t, ids[t]]
            want = raw / (raw.sum() + 1e-20) if normalize else raw
            torch.testing.assert_close(w[t], want, rtol=1e-6, atol=1e-7)


def test_matches_transformers_deepseek_v3_router_k_beyond_kept_groups():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    H, T = 24, 41
    for E, n_group, k in ((8, 2, 8), (16, 4, 7)):
        cfg = DeepseekV3Config(
            hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=1,
            norm_topk_prob=False, routed_scaling_factor=1.5,
        )  # fmt: skip
        r = DeepseekV3TopkRouter(cfg)
        with torch.no_grad():
            r.weight.copy_(torch.randn_like(r.weight))
            r.e_score_correction_bias.copy_(0.1 * torch.randn(E))
            logits, scores, idx = r(_hidden(T, H))
            w, ids = ms.router_topk(
                logits, k, score="sigmoid", bias=r.e_score_correction_bias, num_groups=n_group,
                topk_groups=1, normalize=False, scale=1.5,
            )  # fmt: skip
        per = E // n_group
        if k == E:  # every expert: the same (id, weight) pairs
            w, ids = _rows_sorted(w, ids)
            scores, idx = _rows_sorted(scores, idx)
            assert torch.equal(ids, idx)
            assert rel_err(w, scores) <= 1e-6
            continue
        # torch.topk's choice among the dropped groups' equal (-inf) entries is unspecified: the
        # kept group's experts agree, and every pick carries the weight transformers gives it
        for t in range(T):
            ours = dict(zip(ids[t].tolist(), w[t].tolist()))
            theirs = dict(zip(idx[t].tolist(), scores[t].tolist()))
            kept = ids[t, :per].tolist()
            assert sorted(e for e in theirs if e // per == kept[0] // per) == sorted(kept)
            for e in kept:
                assert abs(ours[e] - theirs[e]) <= 1e-6 * abs(theirs[e])
            want = torch.sigmoid(logits[t, ids[t]]) * 1.5
            assert rel_err(w[t], want) <= 1e-6


def test_matches_transformers_gpt_oss_and_llama4_routers():
    pytest.importorskip("transformers")
    from transformers import GptOssConfig, Llama4TextConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    H, T = 24, 37
    r = GptOssTopKRouter(GptOssConfig(hidden_size=H, num_local_experts=32, num_experts_per_tok=4))
    with torch.no_grad():
        r.weight.copy_(torch.randn_like(r.weight))
        r.bias.copy_(torch.randn_like(r.bias))
        logits, scores, idx = r(_hidden(T, H))
        w, ids = ms.router_topk(logits, 4, topk_first=True)
    assert torch.equal(ids, idx)
    assert rel_err(w, scores) <= 1e-6

    r = Llama4Router(Llama4TextConfig(hidden_size=H, num_local_experts=16, num_experts_per_tok=1))
    with torch.no_grad():
        r.weight.copy_(torch.randn_like(r.weight))
        dense_scores, logits = r(_hidden(T, H))
        w, ids = ms.router_topk(logits, 1, score="sigmoid", topk_first=True)
    # Llama 4 returns [T, E] scores: sigmoid of the chosen logit, 0 elsewhere
    ours = torch.zeros_like(dense_scores).scatter_(1, ids, w)
    assert rel_err(ours, dense_scores) <= 1e-6


def test_aux_loss_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    B, S, E, k = 3, 13, 16, 4
    logits = torch.randn(B * S, E)
    attn = (torch.rand(B, S) > 0.3).long()
    _, ids = ms.router_topk(logits, k)
    for mask in (None, attn):
        theirs = load_balancing_loss_func((logits,), E, k, mask)
        ours = ms.router_aux_loss(logits, ids, None if mask is None else mask.reshape(-1))
        assert rel_err(ours, theirs) <= 1e-6


# ------------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_aux_loss_matches_reference(device, dtype, with_mask):
    T, E, k = 300, 24, 3  # more tokens than one reduction chunk
    logits = torch.randn(T, E, device=device).to(dtype)
    ids = torch.randint(0, E, (T, k), device=device)
    mask = (torch.rand(T, device=device) > 0.25).float() if with_mask else None
    loss = ms.router_aux_loss(logits, ids, mask)
    ref = R.router_aux_loss(logits.cpu(), ids.cpu(), None if mask is None else mask.cpu())
    assert loss.shape == () and loss.dtype == ref.dtype
    assert_accurate(loss, ref, what="aux loss")
    ref64 = R.router_aux_loss(logits.cpu().double(), ids.cpu(), None if mask is None else mask.cpu())
    if dtype != torch.float64:
        assert rel_err(loss, ref64) <= 1e-5

    # backward vs autograd of the reference
    x = logits.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(
        ms.router_aux_loss(x, ids, mask), x, torch.tensor(1.7, device=device, dtype=loss.dtype)
    )
    assert g.dtype == dtype

    def ref_grad(d):
        xr = logits.detach().cpu().to(d).requires_grad_(True)
        out = R.router_aux_loss(xr, ids.cpu(), None if mask is None else mask.cpu())
        return torch.autograd.grad(out, xr, torch.tensor(1.7, dtype=out.dtype))[0]

    ref_lowp = ref_grad(dtype) if dtype in (torch.bfloat16, torch.float16) else None
    assert_accurate(g, ref_grad(torch.float64), ref_lowp, what="aux loss grad")


def test_aux_loss_mask_and_ids_dtypes(device):
    T, E = 40, 8
    logits = torch.randn(T, E, device=device)
    ids = torch.randint(0, E, (T, 2), device=device)
    mask_bool = torch.rand(T, device=device) > 0.5
    ref = R.router_aux_loss(logits.cpu(), ids.cpu(), mask_bool.cpu())
    for m in (mask_bool, mask_bool.long(), mask_bool.to(torch.bfloat16)):
        for i in (ids, ids.int(), ids.t().contiguous().t()):
            assert_accurate(ms.router_aux_loss(logits, i, m), ref)
    # non-contiguous logits
    lt = torch.randn(E, T, device=device).t()
    assert_accurate(ms.router_aux_loss(lt, ids, None), R.router_aux_loss(lt.cpu(), ids.cpu()))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_z_loss_matches_reference(device, dtype):
    T, E = 301, 19
    logits = (3 * torch.randn(T, E, device=device)).to(dtype)
    loss = ms.router_z_loss(logits)
    ref = R.router_z_loss(logits.cpu())
    assert loss.shape == () and loss.dtype == ref.dtype
    assert_accurate(loss, ref, what="z loss")
    if dtype != torch.float64:
        assert rel_err(loss, R.router_z_loss(logits.cpu().double())) <= 1e-5

    x = logits.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(ms.router_z_loss(x), x, torch.tensor(0.3, device=device, dtype=loss.dtype))
    assert g.dtype == dtype

    def ref_grad(d):
        xr = logits.detach().cpu().to(d).requires_grad_(True)
        out = R.router_z_loss(xr)
        return torch.autograd.grad(out, xr, torch.tensor(0.3, dtype=out.dtype))[0]

    ref_lowp = ref_grad(dtype) if dtype in (torch.bfloat16, torch.float16) else None
    assert_accurate(g, ref_grad(torch.float64), ref_lowp, what="z loss grad")
    # non-contiguous
    lt = torch.randn(E, 17, device=device).t()
    assert_accurate(ms.router_z_loss(lt), R.router_z_loss(lt.cpu()))


def test_losses_gradcheck(device):
    T, E = 7, 6
    x = torch.randn(T, E, device=device, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, E, (T, 2), device=device)
    mask = torch.rand(T, device=device, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ms.router_aux_loss(t, ids, None), (x,))
    assert torch.autograd.gradcheck(lambda t: ms.router_aux_loss(t, ids, mask), (x,))
    assert torch.autograd.gradcheck(ms.router_z_loss, (x,))


def test_losses_edge_shapes(device):
    # no tokens: the mean over nothing is NaN, as in the reference; the grads are empty
    empty = torch.randn(0, 5, device=device)
    ids = torch.zeros(0, 2, dtype=torch.int64, device=device)
    assert torch.isnan(ms.router_z_loss(empty)) and torch.isnan(R.router_z_loss(empty.cpu()))
    assert torch.isnan(ms.router_aux_loss(empty, ids)) and torch.isnan(
        R.router_aux_loss(empty.cpu(), ids.cpu())
    )
    one = torch.tensor(1.0, device=device)
    assert ms.ops._ops.router_z_loss_backward(one, empty).shape == (0, 5)
    assert ms.ops._ops.router_aux_loss_backward(one, empty, ids, None).shape == (0, 5)
    # one expert: every token goes to it
    x = torch.randn(6, 1, device=device)
    ids = torch.zeros(6, 1, dtype=torch.int64, device=device)
    assert_accurate(ms.router_aux_loss(x, ids), R.router_aux_loss(x.cpu(), ids.cpu()))
    assert_accurate(ms.router_z_loss(x), R.router_z_loss(x.cpu()))
    # an expert nobody chose
    x = torch.randn(10, 4, device=device)
    ids = torch.randint(0, 3, (10, 2), device=device)
    assert_accurate(ms.router_aux_loss(x, ids), R.router_aux_loss(x.cpu(), ids.cpu()))
    # rows of -inf / +inf in the z-loss behave like torch.logsumexp
    inf = float("inf")
    x = torch.tensor([[-inf, -inf], [inf, 0.0], [1.0, 2.0]], device=device)
    assert ms.router_z_loss(x).item() == R.router_z_loss(x.cpu()).item() == inf


def test_deterministic_across_thread_counts():
    # chunked reductions: the same bits whatever the number of threads
    T, E = 2000, 64
    logits = torch.randn(T, E)
    ids = torch.randint(0, E, (T, 4))
    mask = torch.rand(T)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_(True)
            loss = ms.router_aux_loss(x, ids, mask) + ms.router_z_loss(x)
            (g,) = torch.autograd.grad(loss, x)
            w, i = ms.router_topk(logits, 8, score="sigmoid", num_groups=8, topk_groups=4, normalize=True)
            results.append((loss, g, w, i))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases(device):
    x = torch.randn(9, 16, device=device)
    bias = 0.1 * torch.randn(16, device=device)
    ids = ms.router_topk(x, 4)[1]
    gw = torch.randn(9, 4, device=device)
    mask = torch.rand(9, device=device)
    one = torch.tensor(1.0, device=device)
    op = torch.ops.moestream
    xg = x.clone().requires_grad_(True)
    return [
        (op.router_topk.default, (xg, 4, "softmax", False, None, 1, 1, True, 1.0)),
        (op.router_topk.default, (xg, 4, "sigmoid", False, bias, 4, 2, True, 2.5)),
        (op.router_topk.default, (xg, 4, "softmax", True, bias, 1, 1, False, 1.0)),
        (op.router_topk.default, (x.double(), 16, "sigmoid", True, None, 1, 1, False, 1.0)),
        (op.router_topk.default, (xg, 7, "sigmoid", False, bias, 4, 1, True, 2.5)),  # k > kept
        (op.router_topk_backward.default, (gw, x, ids, "softmax", False, True, 1.0)),
        (op.router_topk_backward.default, (gw, x.half(), ids.int(), "sigmoid", True, False, 2.0)),
        (op.router_aux_loss.default, (xg, ids, None)),
        (op.router_aux_loss.default, (xg, ids, mask)),
        (op.router_aux_loss_backward.default, (one, x, ids, mask)),
        (op.router_z_loss.default, (xg,)),
        (op.router_z_loss.default, (x.bfloat16(),)),
        (op.router_z_loss_backward.default, (one, x)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# bad input


def test_router_topk_bad_input(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="logits must have 2 dimensions"):
        ms.router_topk(x[0], 2)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        ms.router_topk(x.long(), 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, E\].*E = .*8.*got k = 0"):
        ms.router_topk(x, 0)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, E\].*got k = 9"):
        ms.router_topk(x, 9)
    with pytest.raises(RuntimeError, match='score must be one of "softmax", "sigmoid", got "relu"'):
        ms.router_topk(x, 2, score="relu")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[E\] = \[8\], got \[7\]"):
        ms.router_topk(x, 2, bias=torch.zeros(7, device=device))
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ms.router_topk(x, 2, bias=torch.zeros(8, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="num_groups must divide"):
        ms.router_topk(x, 2, num_groups=3)
    with pytest.raises(RuntimeError, match="num_groups must be >= 1"):
        ms.router_topk(x, 2, num_groups=0)
    with pytest.raises(RuntimeError, match="topk_groups must be in"):
        ms.router_topk(x, 2, num_groups=4, topk_groups=5)
    with pytest.raises(RuntimeError, match="topk_groups must be in"):
        ms.router_topk(x, 2, num_groups=4, topk_groups=0)
    # k beyond the kept groups' experts is accepted (as by transformers); only k > E is refused
    with pytest.raises(RuntimeError, match=r"k must be in \[1, E\].*got k = 9"):
        ms.router_topk(x, 9, num_groups=4, topk_groups=2)


def test_router_topk_backward_bad_input(device):
    x = torch.randn(4, 8, device=device)
    ids = torch.randint(0, 8, (4, 2), device=device)
    gw = torch.randn(4, 2, device=device)
    bwd = torch.ops.moestream.router_topk_backward
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, E\).*got ids\[1, 0\] = 8"):
        bwd(
            gw, x, torch.tensor([[0, 1], [8, 2], [0, 1], [0, 1]], device=device), "softmax", False, False, 1.0
        )
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, E\).*got ids\[0, 1\] = -1"):
        bwd(gw, x, torch.tensor([[0, -1]] * 4, device=device), "sigmoid", False, False, 1.0)
    with pytest.raises(RuntimeError, match="ids must be int32 or int64"):
        bwd(gw, x, ids.float(), "softmax", False, False, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_weights must have the shape of ids \[4, 2\], got \[4, 3\]"):
        bwd(torch.randn(4, 3, device=device), x, ids, "softmax", False, False, 1.0)
    with pytest.raises(RuntimeError, match=r"ids must have T = logits.size\(0\) = 4 rows"):
        bwd(gw[:3], x, ids[:3], "softmax", False, False, 1.0)
    with pytest.raises(RuntimeError, match="score must be"):
        bwd(gw, x, ids, "tanh", False, False, 1.0)


def test_losses_bad_input(device):
    x = torch.randn(4, 8, device=device)
    ids = torch.randint(0, 8, (4, 2), device=device)
    with pytest.raises(RuntimeError, match=r"router_aux_loss: ids must lie in \[0, E\).*= 8"):
        ms.router_aux_loss(x, torch.full((4, 2), 8, device=device))
    with pytest.raises(RuntimeError, match="router_aux_loss: ids must be int32 or int64"):
        ms.router_aux_loss(x, ids.float())
    with pytest.raises(RuntimeError, match="router_aux_loss: ids must have 2 dimensions"):
        ms.router_aux_loss(x, ids[:, 0])
    with pytest.raises(RuntimeError, match=r"ids must have T = logits.size\(0\) = 4 rows"):
        ms.router_aux_loss(x, ids[:3])
    with pytest.raises(RuntimeError, match=r"mask must have shape \[T\] = \[4\], got \[5\]"):
        ms.router_aux_loss(x, ids, torch.ones(5, device=device))
    with pytest.raises(RuntimeError, match=r"mask must have shape \[T\] = \[4\], got \[4, 1\]"):
        ms.router_aux_loss(x, ids, torch.ones(4, 1, device=device))
    with pytest.raises(RuntimeError, match="router_aux_loss: logits must be float32"):
        ms.router_aux_loss(x.int(), ids)
    with pytest.raises(RuntimeError, match="router_z_loss: logits must have 2 dimensions"):
        ms.router_z_loss(x[None])
    with pytest.raises(RuntimeError, match="router_z_loss: logits must be float32"):
        ms.router_z_loss(x.long())
    op = torch.ops.moestream
    with pytest.raises(RuntimeError, match="router_z_loss_backward: grad must be a scalar"):
        op.router_z_loss_backward(torch.ones(2, device=device), x)
    with pytest.raises(RuntimeError, match="router_aux_loss_backward: grad must be a scalar"):
        op.router_aux_loss_backward(torch.ones(2, device=device), x, ids, None)
    with pytest.raises(RuntimeError, match=r"router_aux_loss_backward: ids must lie in \[0, E\)"):
        op.router_aux_loss_backward(torch.tensor(1.0, device=device), x, ids + 8, None)


@cuda
@pytest.mark.cuda
def test_device_mismatch_messages():
    assert HAS_CUDA
    x = torch.randn(4, 8, device="cuda")
    ids = torch.randint(0, 8, (4, 2))
    with pytest.raises(RuntimeError, match="logits and bias must be on the same device"):
        ms.router_topk(x, 2, bias=torch.zeros(8))
    with pytest.raises(RuntimeError, match="logits and ids must be on the same device"):
        ms.router_aux_loss(x, ids)
    with pytest.raises(RuntimeError, match="logits and mask must be on the same device"):
        ms.router_aux_loss(x, ids.cuda(), torch.ones(4))
