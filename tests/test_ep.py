"""Expert parallelism (moestream.distributed) on gloo, with 2 and 4 CPU processes.

One group of processes per world size runs every check of :data:`CHECKS` in order (process start
and imports dominate the cost, so they are paid once); each check compares the expert-parallel
result of every rank with the single-process result on the concatenated batch of all ranks, which
every rank also computes (same seeds, same inputs):

- outputs: each rank's rows equal the single-process rows (float32, 1e-5 relative);
- gradients: each local expert's gradient equals the single-process gradient of that expert; the
  replicated parameters' gradients summed over the ranks equal the single-process ones (each rank's
  loss is its own rows' share of the single-process loss);
- skewed routing (ranks and experts without tokens), capacity mode (drops exactly what it
  reports), router statistics, state dicts, errors, transformers' EP registry.

This file is also the launcher (``python tests/test_ep.py launch 2,4 OUT_DIR``: imports once, forks
the ranks) and a worker (``python tests/test_ep.py WORLD RANK INIT_FILE OUT_DIR``: one rank).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
TIMEOUT_S = 240

# ---------------------------------------------------------------------------------------------
# the worker side (imports moestream and torch.distributed lazily: pytest collection stays cheap)


def _err(a, b) -> float:
    from moestream.testing import rel_err

    return rel_err(a.detach(), b.detach())


def _close(what: str, got, want, tol: float = TOL) -> None:
    e = _err(got, want)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.0e}"


def _splits(ctx, sizes):
    """Row ranges [start, end) of each rank in the concatenated batch."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return starts[ctx.rank], starts[ctx.rank] + sizes[ctx.rank]


class Ctx:
    def __init__(self, world: int, rank: int, tmp: str):
        import torch.distributed as dist

        self.dist = dist
        self.world = world
        self.rank = rank
        self.tmp = tmp  # a directory of this group's own

    def sum_grads(self, grads: dict) -> dict:
        out = {}
        for k, g in grads.items():
            g = g.clone()
            self.dist.all_reduce(g)
            out[k] = g
        return out


def _moe_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_model_grads(ctx, ep_model, ref_grads: dict, what: str) -> None:
    """Expert grads: this rank's slice of the single-process grads; the rest: summed over ranks."""
    from moestream import distributed as msd

    expert_ids = {id(p) for p in msd.expert_parameters(ep_model)}
    assert expert_ids, f"{what}: no sharded expert parameters"
    replicated = {}
    for name, p in ep_model.named_parameters():
        if p.grad is None:
            assert ref_grads.get(name) is None, f"{what}: {name} got no gradient"
            continue
        if id(p) in expert_ids:
            L = p.shape[0]
            _close(f"{what} expert grad {name}", p.grad, ref_grads[name][ctx.rank * L : (ctx.rank + 1) * L])
        else:
            replicated[name] = p.grad
    summed = ctx.sum_grads(replicated)
    for name, g in summed.items():
        _close(f"{what} summed grad {name}", g, ref_grads[name])


# nn.MoE configurations: every routing variant, with and without shared experts and biases
_NN_CASES = {
    "mixtral": {"routing": "mixtral"},
    "qwen2_moe": {"routing": "qwen2_moe", "shared_expert": 10, "shared_expert_gate": True},
    "deepseek_v3": {
        "routing": {"preset": "deepseek_v3", "num_groups": 4, "topk_groups": 2, "scale": 2.5},
        "shared_expert": 12,
    },
    "gpt_oss": {
        "routing": "gpt_oss",
        "activation": "gptoss",
        "layout": "interleaved",
        "weight_layout": "in_out",
        "expert_bias": True,
    },
    "llama4": {"routing": "llama4", "k": 1, "shared_expert": 8, "weight_layout": "in_out"},
}


def _nn_moe(name: str, seed: int, **extra):
    import moestream as ms

    kw = dict(_NN_CASES[name])
    routing = kw.pop("routing")
    if isinstance(routing, dict):
        routing = ms.nn.Routing.preset(routing.pop("preset"), **routing)
    k = kw.pop("k", 2)
    torch.manual_seed(seed)
    m = ms.nn.MoE(16, 12, 8, k, routing, **kw, **extra)
    r = m.submodule("router")
    with torch.no_grad():
        r.weight.normal_(0, 0.5)  # spread routing over all experts
        if r.bias is not None:
            r.bias.normal_(0, 0.1)
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.normal_(0, 0.1)
        ex = m.submodule("experts")
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return m


def _router_losses(moe, x, aux_fn, z_fn):
    router = moe.submodule("router")
    logits = router.logits(x)
    _, _, ids = router(x)
    return aux_fn(logits, ids) + 0.1 * z_fn(logits)


def check_all_to_all(ctx):
    """all_to_all with uneven and empty splits, float64: every row arrives where it should, and
    the backward is the adjoint (sum over ranks of <A x, g> = sum of <x, A^T g>)."""
    from moestream.distributed import all_to_all

    W, r = ctx.world, ctx.rank
    n = lambda src, dst: (src * 3 + dst * 2) % 4  # rows rank src sends rank dst (some zero)
    in_splits = [n(r, d) for d in range(W)]
    out_splits = [n(s, r) for s in range(W)]
    # row i from src to dst holds (src, dst, i): the receiver can check what it got
    x = torch.tensor([[r, d, i] for d in range(W) for i in range(n(r, d))], dtype=torch.float64).reshape(
        -1, 3
    )
    x.requires_grad_(True)
    y = all_to_all(x, out_splits, in_splits)
    want = torch.tensor([[s, r, i] for s in range(W) for i in range(n(s, r))], dtype=torch.float64)
    assert torch.equal(y.detach(), want.reshape(-1, 3)), (y, want)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    y.backward(g)
    dots = torch.stack([(y.detach() * g).sum(), (x.detach() * x.grad).sum()])
    ctx.dist.all_reduce(dots)
    assert torch.allclose(dots[0], dots[1], rtol=1e-12), dots
    with _raises(ValueError, "in_splits sum"):
        all_to_all(x, out_splits, [s + 1 for s in in_splits])


def check_nn_moe(ctx):
    """ms.nn.MoE of every routing variant: outputs, gradients, router aux + z losses."""
    import moestream as ms
    from moestream import distributed as msd

    sizes = [7, 4, 11, 2][: ctx.world]
    a, b = _splits(ctx, sizes)
    for i, name in enumerate(_NN_CASES):
        ref = _nn_moe(name, seed=10 + i)
        ep = copy.deepcopy(ref)
        assert ms.parallelize_experts(ep) == 1
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(sum(sizes), 16, generator=g)
        go = torch.randn(sum(sizes), 16, generator=g)

        x_ref = x.clone().requires_grad_(True)
        out = ref(x_ref)
        router_loss = _router_losses(ref, x_ref, ms.router_aux_loss, ms.router_z_loss)
        ((out * go).sum() + router_loss).backward()

        x_ep = x[a:b].clone().requires_grad_(True)
        out_ep = ep(x_ep)
        aux = lambda lg, ids: msd.router_aux_loss(lg, ids)
        router_loss_ep = _router_losses(ep, x_ep, aux, msd.router_z_loss)
        ((out_ep * go[a:b]).sum() + router_loss_ep).backward()

        _close(f"{name} output", out_ep, out[a:b])
        _close(f"{name} router aux + z loss", router_loss_ep, router_loss)
        _close(f"{name} input grad", x_ep.grad, x_ref.grad[a:b])
        _compare_model_grads(ctx, ep, _moe_grads(ref), name)


def check_nn_moe_ep_group(ctx):
    """MoE(..., ep_group=...) holds this rank's slice of the experts the same seed gives without it."""
    import moestream as ms
    import torch.distributed as dist

    for name, kw in (("mixtral", {}), ("gpt_oss", {"weight_layout": "in_out", "expert_bias": True})):
        torch.manual_seed(3)
        ref = ms.nn.MoE(16, 12, 8, 2, name, **kw)
        torch.manual_seed(3)
        ep = ms.nn.MoE(16, 12, 8, 2, name, **kw, ep_group=dist.group.WORLD)
        ex, ex_ref = ep.submodule("experts"), ref.submodule("experts")
        L = 8 // ctx.world
        assert ex.placement.local_experts == L and ex.num_experts == 8
        for pname, p in ex.named_parameters():
            want = getattr(ex_ref, pname)[ctx.rank * L : (ctx.rank + 1) * L]
            assert p.shape[0] == L and torch.equal(p, want), f"{name}: {pname} is not this rank's slice"
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(ctx.rank))
        _close(f"{name} ep_group output", ep(x), ref(x))  # every rank its own tokens


def _pipeline_case(ctx, sizes, ids_fn, seed, capacity_factor=None):
    """The expert pipeline with an ExpertParallel placement vs LOCAL on the concatenated batch."""
    from moestream import ops, pipeline
    from moestream.distributed import ExpertParallel

    E, H, I, k = 8, 16, 12, 2
    g = torch.Generator().manual_seed(seed)
    T = sum(sizes)
    x = torch.randn(T, H, generator=g)
    ids = ids_fn(T, g)
    w = torch.rand(T, k, generator=g) + 0.1
    go = torch.randn(T, H, generator=g)
    full = [
        torch.randn(E, H, 2 * I, generator=g) * 0.3,
        torch.randn(E, I, H, generator=g) * 0.3,
        torch.randn(E, 2 * I, generator=g) * 0.3,
        torch.randn(E, H, generator=g) * 0.3,
    ]
    act = pipeline.Gate("swiglu", "concat")
    ep = ExpertParallel(E, capacity_factor=capacity_factor)
    L, a, b = E // ctx.world, *_splits(ctx, sizes)
    local = [t[ctx.rank * L : (ctx.rank + 1) * L].clone().requires_grad_(True) for t in full]
    xl, wl = x[a:b].clone().requires_grad_(True), w[a:b].clone().requires_grad_(True)
    out = pipeline.run(ops.OPS, xl, ids[a:b], wl, pipeline.Experts(*local), act, placement=ep)
    (out * go[a:b]).sum().backward()
    return {
        "x": x,
        "ids": ids,
        "w": w,
        "go": go,
        "full": full,
        "act": act,
        "ep": ep,
        "local": local,
        "xl": xl,
        "wl": wl,
        "out": out,
        "L": L,
        "a": a,
        "b": b,
    }


def _local_reference(c, weights):
    from moestream import ops, pipeline

    full = [t.clone().requires_grad_(True) for t in c["full"]]
    x = c["x"].clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    out = pipeline.run(ops.OPS, x, c["ids"], w, pipeline.Experts(*full), c["act"])
    (out * c["go"]).sum().backward()
    return out, x.grad, w.grad, [t.grad for t in full]


def _compare_pipeline(ctx, c, ref, what, w_grad_mask=None):
    out, xg, wg, fg = ref
    a, b, L, r = c["a"], c["b"], c["L"], ctx.rank
    _close(f"{what} output", c["out"], out[a:b])
    _close(f"{what} x grad", c["xl"].grad, xg[a:b])
    want_wg = wg[a:b] if w_grad_mask is None else wg[a:b] * w_grad_mask
    _close(f"{what} weights grad", c["wl"].grad, want_wg)
    for name, t, g in zip(("w_gate_up", "w_down", "b_gate_up", "b_down"), c["local"], fg):
        assert t.grad is not None, f"{what}: {name} got no gradient"
        _close(f"{what} {name} grad", t.grad, g[r * L : (r + 1) * L])


def check_skewed_routing(ctx):
    """Every token routed to rank 0's first two experts: other ranks and experts receive nothing,
    some ranks have no tokens at all; all still take part in forward and backward."""
    sizes = [10, 0, 7, 0][: ctx.world]

    def ids_fn(T, g):
        flip = torch.rand(T, generator=g) < 0.5
        first = torch.where(flip, 1, 0)
        return torch.stack([first, 1 - first], dim=1)

    c = _pipeline_case(ctx, sizes, ids_fn, seed=7)
    _compare_pipeline(ctx, c, _local_reference(c, c["w"]), "skewed")
    # a rank with no tokens sends nothing; the load it reports is all zeros
    if sizes[ctx.rank] == 0:
        assert int(c["ep"].load.sum()) == 0
    # random routing with uneven token counts
    sizes = [5, 9, 1, 6][: ctx.world]
    c = _pipeline_case(ctx, sizes, lambda T, g: _distinct_ids(T, 2, 8, g), seed=8)
    _compare_pipeline(ctx, c, _local_reference(c, c["w"]), "uneven")
    # the byte counters: rows to / from other ranks, dispatch and combine (float32 rows of 16)
    owner = c["ids"] // c["L"]
    ranks = torch.repeat_interleave(torch.arange(ctx.world), torch.tensor(sizes))
    mine = ranks == ctx.rank
    sent = int((owner[mine] != ctx.rank).sum())
    received = int(((owner == ctx.rank) & ~mine[:, None]).sum())
    row = 16 * 4
    # dispatch sends `sent` rows and receives `received`; combine sends those back and gets its own
    got = (c["ep"].bytes_sent, c["ep"].bytes_received)
    assert got == (row * (sent + received),) * 2, (got, sent, received)


def _distinct_ids(T, k, E, g, bias=None):
    scores = torch.rand(T, E, generator=g)
    if bias is not None:
        scores = scores + bias
    return scores.topk(k, dim=1).indices


def check_capacity(ctx):
    """capacity_factor: static shapes; drops exactly the rows past the first C of each expert on
    each rank (in (token, slot) order), and reports how many."""
    T, k, E, cf = 12, 2, 8, 1.0
    sizes = [T] * ctx.world
    bias = torch.tensor([1.0, 0.8, 0, 0, 0, 0, 0, 0])  # experts 0 and 1 overflow
    c = _pipeline_case(ctx, sizes, lambda n, g: _distinct_ids(n, k, E, g, bias), seed=9, capacity_factor=cf)
    C = math.ceil(cf * T * k / E)
    assert c["ep"].capacity(T * k) == C
    # the independent count: walk every rank's (token, slot) pairs in order
    keep = torch.ones(sum(sizes), k)
    for r in range(ctx.world):
        seen = [0] * E
        for t in range(r * T, (r + 1) * T):
            for s in range(k):
                e = int(c["ids"][t, s])
                if seen[e] >= C:
                    keep[t, s] = 0
                seen[e] += 1
    want_dropped = int((keep[c["a"] : c["b"]] == 0).sum())
    assert want_dropped > 0, "the routing should overflow some expert"
    assert int(c["ep"].dropped) == want_dropped, (
        f"reported {int(c['ep'].dropped)} dropped, expected {want_dropped}"
    )
    # dropped slots contribute nothing: the reference with their weights zeroed
    ref = _local_reference(c, c["w"] * keep)
    _compare_pipeline(ctx, c, ref, "capacity", w_grad_mask=keep[c["a"] : c["b"]])


def check_router_stats(ctx):
    """expert_load over the group equals the counts of the concatenated batch."""
    from moestream import distributed as msd

    sizes = [6, 0, 9, 4][: ctx.world]
    g = torch.Generator().manual_seed(11)
    ids = _distinct_ids(sum(sizes), 3, 8, g)
    a, b = _splits(ctx, sizes)
    got = msd.expert_load(ids[a:b], 8)
    assert torch.equal(got, torch.bincount(ids.reshape(-1), minlength=8))


def check_state_dict(ctx):
    """full_state_dict equals the single-process state dict; a full state dict loads into an EP model
    as this rank's slices."""
    import moestream as ms
    from moestream import distributed as msd

    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        ms.nn.MoE(16, 12, 8, 2), torch.nn.Linear(16, 16), ms.nn.MoE(16, 12, 8, 2, "qwen3_moe")
    )
    ep = copy.deepcopy(ref)
    assert ms.parallelize_experts(ep) == 2
    assert ms.parallelize_experts(ep) == 0  # already sharded
    sd_ref, sd_full = ref.state_dict(), msd.full_state_dict(ep)
    assert list(sd_full) == list(sd_ref)
    for key in sd_ref:
        assert torch.equal(sd_full[key], sd_ref[key]), key
    # a single-process checkpoint into a fresh EP model
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(
        ms.nn.MoE(16, 12, 8, 2), torch.nn.Linear(16, 16), ms.nn.MoE(16, 12, 8, 2, "qwen3_moe")
    )
    ms.parallelize_experts(fresh)
    fresh.load_state_dict(sd_ref)
    for key, t in fresh.state_dict().items():
        assert torch.equal(t, ep.state_dict()[key]), key


def check_errors(ctx):
    """E not divisible by the group's size, and a model without MoE blocks, are clear errors."""
    import moestream as ms

    bad = ms.nn.MoE(16, 12, 4 * ctx.world + 1, 2)
    with _raises(ValueError, "not divisible"):
        ms.parallelize_experts(bad)
    with _raises(ValueError, "no moestream MoE block"):
        ms.parallelize_experts(torch.nn.Linear(4, 4))


class _raises:
    def __init__(self, exc, match):
        self.exc, self.match = exc, match

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        assert et is not None, f"expected {self.exc.__name__} matching {self.match!r}"
        assert issubclass(et, self.exc) and self.match in str(ev), f"wrong error: {et.__name__}: {ev}"
        return True


HF_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def check_transformers(ctx):
    """Qwen3-MoE, Mixtral and DeepSeek-V3 tiny models after patch_moe: logits of every rank's
    sequences, expert and summed replicated gradients, router aux loss over the group."""
    import moestream as ms
    from moestream import distributed as msd
    from moestream import testing

    seqs = [2, 1, 1, 2][: ctx.world]
    a, b = _splits(ctx, seqs)
    for i, fam in enumerate(HF_FAMILIES):
        ref = testing.build_model(fam, "small", seed=i)
        assert ms.patch_moe(ref) > 0
        ep = copy.deepcopy(ref)
        n = ms.parallelize_experts(ep)
        assert n == sum(1 for m in ref.modules() if isinstance(m, ms.nn.MoE)), fam
        ids = testing.input_ids(sum(seqs), 5, seed=i)
        go = torch.randn(sum(seqs), 5, ref.config.vocab_size, generator=torch.Generator().manual_seed(i))
        out = ref(ids)
        (out.logits * go).sum().backward()
        out_ep = ep(ids[a:b])
        (out_ep.logits * go[a:b]).sum().backward()
        _close(f"{fam} logits", out_ep.logits, out.logits[a:b])
        _compare_model_grads(ctx, ep, _moe_grads(ref), fam)
        # checkpoints unchanged
        sd = msd.full_state_dict(ep)
        for key, t in ref.state_dict().items():
            assert torch.equal(sd[key], t), f"{fam} full_state_dict {key}"
        # the load-balancing loss over the group equals the single-process one
        if getattr(out, "router_logits", None) is None:
            assert fam == "deepseek_v3", (
                f"{fam}: no router logits in the output"
            )  # no aux loss in DeepSeek-V3
            continue
        k = ref.config.num_experts_per_tok
        lg = torch.cat(out.router_logits).detach()
        lg_ep = torch.cat(out_ep.router_logits).detach()
        want = ms.router_aux_loss(lg, lg.topk(k, dim=-1).indices)
        got = msd.router_aux_loss(lg_ep, lg_ep.topk(k, dim=-1).indices)
        _close(f"{fam} aux loss", got, want)


def check_transformers_ep_registry(ctx):
    """ "moestream" in transformers' EP registry: its implementation on a transformers experts module
    holding this rank's shard equals the full module on the concatenated batch."""
    from moestream import testing

    try:
        from transformers.distributed.expert_parallel import EPImplementationInterface
    except ImportError:
        return  # this transformers has no EP registry: nothing registered, nothing to check
    import moestream.integrations.transformers  # noqa: F401  (registers)
    from torch.distributed.device_mesh import init_device_mesh

    impls = EPImplementationInterface()
    assert "moestream" in impls
    mesh = init_device_mesh("cpu", (ctx.world, 1), mesh_dim_names=("ep", "tp"))
    E, H, I = 8, 16, 12
    g = torch.Generator().manual_seed(5)
    w = {
        "gate_up_proj": torch.randn(E, 2 * I, H, generator=g) * 0.3,
        "down_proj": torch.randn(E, H, I, generator=g) * 0.3,
    }
    sizes = {"hidden": H, "inter": I, "experts": E, "k": 2}
    full = testing.build_experts("qwen3_moe", sizes, "moestream", w)
    L = E // ctx.world
    local_w = {n: t[ctx.rank * L : (ctx.rank + 1) * L].clone() for n, t in w.items()}
    local = testing.build_experts("qwen3_moe", dict(sizes, experts=L), "moestream", local_w)
    local.num_experts = L
    local._is_expert_parallel = True  # as transformers' grouped_gemm sharding leaves it
    impl = impls["moestream"](local, mesh["ep"], mesh["tp"])
    T = [5, 3, 0, 7][: ctx.world]
    a, b = _splits(ctx, T)
    x = torch.randn(sum(T), H, generator=g)
    ids = _distinct_ids(sum(T), 2, E, g)
    rw = torch.rand(sum(T), 2, generator=g)
    _close("transformers EP registry", impl(x[a:b], ids[a:b], rw[a:b]), full(x, ids, rw)[a:b])


class _Net(torch.nn.Module):
    """Replicated layers around an EP MoE block (with a shared expert)."""

    def __init__(self):
        import moestream as ms

        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.moe = ms.nn.MoE(16, 12, 8, 2, "qwen3_moe", shared_expert=8)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x, ckpt=False):
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        h = checkpoint(self.moe, h, use_reentrant=False) if ckpt else self.moe(h)
        return self.out(h)


def check_composes(ctx):
    """Activation checkpointing (the forward all-to-alls rerun in the backward), DDP (expert
    parameters ignored, replicated gradients averaged) and FSDP2 (fully_shard with the expert
    parameters ignored) give the single-process gradients."""
    import moestream as ms
    from moestream import distributed as msd
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = _Net()
    sizes = [5, 3, 7, 2][: ctx.world]
    a, b = _splits(ctx, sizes)
    g = torch.Generator().manual_seed(1)
    x, go = torch.randn(sum(sizes), 16, generator=g), torch.randn(sum(sizes), 16, generator=g)
    (ref(x) * go).sum().backward()
    ref_grads = _moe_grads(ref)

    def compare(model, what, scale):
        experts = {id(p) for p in msd.expert_parameters(model)}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            want = ref_grads[name]
            if id(p) in experts:
                L = p.shape[0]
                want = want[ctx.rank * L : (ctx.rank + 1) * L]
            else:
                want = want * scale
            _close(f"{what} grad {name}", grad, want)

    ep = copy.deepcopy(ref)
    ms.parallelize_experts(ep)
    ep.zero_grad()
    (ep(x[a:b], ckpt=True) * go[a:b]).sum().backward()
    msd.all_reduce_grads(ep)
    compare(ep, "checkpointed", 1.0)

    ep = copy.deepcopy(ref)
    ep.zero_grad()
    ms.parallelize_experts(ep)
    experts = {id(p) for p in msd.expert_parameters(ep)}
    DDP._set_params_and_buffers_to_ignore_for_model(
        ep, [n for n, p in ep.named_parameters() if id(p) in experts]
    )
    ddp = DDP(ep)  # (kept alive until the backward ran: its reducer does the all-reduce)
    (ddp(x[a:b]) * go[a:b]).sum().backward()
    compare(ep, "DDP", 1.0 / ctx.world)  # DDP averages

    ep = copy.deepcopy(ref)
    ep.zero_grad()
    ms.parallelize_experts(ep)
    fully_shard(ep, ignored_params=set(msd.expert_parameters(ep)))
    (ep(x[a:b]) * go[a:b]).sum().backward()
    compare(ep, "FSDP2", 1.0 / ctx.world)  # FSDP averages too


def check_train_ep_example(ctx):
    """examples/train_ep.py (the script torchrun runs), in this process group: a short run lowers
    the loss and keeps the replicated parameters identical on every rank."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ep", ROOT / "examples" / "train_ep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, last = mod.main(["--steps", "4", "--batch", "2", "--seq", "16"])
    assert last < first, f"the loss did not go down: {first} -> {last}"


def check_transformers_distributed_config(ctx):
    """from_pretrained(..., distributed_config=DistributedConfig(ep_size=W, ep_implementation=
    "moestream")): transformers shards the experts and runs them through moestream's dispatch;
    each rank's logits equal the single-process ones."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return  # no expert-parallel support in this transformers
    from moestream import testing
    from transformers import AutoModelForCausalLM

    ckpt = Path(ctx.tmp, "ckpt")  # the group's own directory
    if ctx.rank == 0:
        testing.build_model("qwen3_moe", "small", seed=4).save_pretrained(ckpt)
    ctx.dist.barrier()
    cfg = DistributedConfig(fsdp_size=ctx.world, ep_size=ctx.world, ep_implementation="moestream")
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, distributed_config=cfg, experts_implementation="moestream"
    )
    ref = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager")
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(m.num_experts == 4 // ctx.world for m in experts), "experts not sharded"
    ids = testing.input_ids(ctx.world, 5, seed=4)[ctx.rank : ctx.rank + 1]
    from moestream.distributed import ExpertParallel

    calls, dispatch = [], ExpertParallel.dispatch
    ExpertParallel.dispatch = lambda self, *a: calls.append(1) or dispatch(self, *a)
    try:
        out = model(ids).logits
    finally:
        ExpertParallel.dispatch = dispatch
    assert len(calls) == len(experts), (
        f"moestream's dispatch ran {len(calls)} times for {len(experts)} layers"
    )
    _close("DistributedConfig logits", out, ref(ids).logits)
    ctx.dist.barrier()


CHECKS = {
    "all_to_all": check_all_to_all,
    "nn_moe": check_nn_moe,
    "nn_moe_ep_group": check_nn_moe_ep_group,
    "skewed_routing": check_skewed_routing,
    "capacity": check_capacity,
    "router_stats": check_router_stats,
    "state_dict": check_state_dict,
    "errors": check_errors,
    "transformers": check_transformers,
    "transformers_ep_registry": check_transformers_ep_registry,
    "transformers_distributed_config": check_transformers_distributed_config,
    "composes": check_composes,
    "train_ep_example": check_train_ep_example,
}


def _worker(world: int, rank: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    ctx = Ctx(world, rank, os.path.dirname(init_file))
    results = {}
    try:
        for name, fn in CHECKS.items():
            t0 = time.perf_counter()
            try:
                fn(ctx)
                results[name] = {"ok": True, "s": time.perf_counter() - t0}
            except Exception:  # noqa: BLE001  (reported to the parent, which fails the test)
                # a failed check may leave collectives unmatched: stop here (the rest: not run)
                results[name] = {"ok": False, "error": traceback.format_exc()}
                break
            finally:
                Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _launch(worlds: list[int], out_dir: str) -> None:
    """Import everything once, then fork the ranks of each world size from this process (it has
    run no torch op, so no thread pool is forked): the imports (transformers' take seconds) are
    paid once instead of once per rank."""
    import moestream.integrations.transformers  # noqa: F401  (registers "moestream" with transformers)

    for fam in (*HF_FAMILIES, "qwen3_moe"):
        importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
    importlib.import_module("torch.distributed.device_mesh")
    for world in worlds:
        wdir = Path(out_dir, f"world{world}")
        wdir.mkdir()
        pids = []
        for rank in range(world):
            pid = os.fork()
            if pid == 0:  # the rank
                code = 1
                try:
                    with open(wdir / f"log{rank}", "w") as log:
                        os.dup2(log.fileno(), 1)
                        os.dup2(log.fileno(), 2)
                        _worker(world, rank, str(wdir / "init"), str(wdir))
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------
# the pytest side

_RESULTS: dict[int, tuple[list[dict], list[str]]] = {}


def _run_all() -> dict[int, tuple[list[dict], list[str]]]:
    if _RESULTS:
        return _RESULTS
    worlds = [2, 4]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "launch", ",".join(map(str, worlds)), tmp]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
            launcher_log = p.stdout[-2000:] + p.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            launcher_log = f"timed out after {TIMEOUT_S} s: {e}"
        for world in worlds:
            wdir = Path(tmp, f"world{world}")
            results, logs = [], []
            for r in range(world):
                f, log = wdir / f"rank{r}.json", wdir / f"log{r}"
                results.append(json.loads(f.read_text()) if f.exists() else {})
                logs.append((log.read_text()[-3000:] if log.exists() else "") + launcher_log)
            _RESULTS[world] = (results, logs)
    return _RESULTS


@pytest.fixture(params=[2, 4], ids=lambda w: f"world{w}")
def ep_results(request):
    results, logs = _run_all()[request.param]
    return request.param, results, logs


@pytest.mark.parametrize("check", list(CHECKS))
def test_ep(ep_results, check):
    world, results, logs = ep_results
    for rank, res in enumerate(results):
        if check not in res:
            failed = [n for n, v in res.items() if not v["ok"]]
            why = (
                f"an earlier check failed: {failed}" if failed else f"did not run; log:\n{logs[rank][-3000:]}"
            )
            pytest.fail(f"rank {rank} of {world}: {check} {why}")
        assert res[check]["ok"], f"rank {rank} of {world}:\n{res[check]['error']}"


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        _launch([int(w) for w in sys.argv[2].split(",")], sys.argv[3])
    else:  # one rank: WORLD RANK INIT_FILE OUT_DIR
        _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
