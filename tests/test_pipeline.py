"""moestream.pipeline: the one composition of the expert path, on both op sets (moestream's ops and
the reference ops), against the literal per-expert loop; the placement seam (dispatch / combine);
the argument contract of the composed path against the native kernel's."""

from __future__ import annotations

import moestream
import pytest
import torch
from conftest import DTYPES, assert_accurate
from moestream import ops, pipeline, reference
from test_moe_experts import ALPHA, CONFIGS, DIFF, LIMIT, call_fused, make

OP_SETS = {"moestream": ops.OPS, "reference": reference.OPS}

# (T, H, I, E, k); ids drawn per case: distinct experts per token
EDGES = {
    "T0": (0, 16, 8, 4, 2),
    "k=E": (9, 24, 16, 5, 5),
    "E1": (11, 20, 12, 1, 1),
    "I0": (6, 12, 0, 3, 2),
    "k0": (5, 16, 8, 4, 0),
    "odd": (13, 33, 17, 4, 3),
}


def experts_of(a, transpose_b) -> pipeline.Experts:
    return pipeline.Experts(a["w_gate_up"], a["w_down"], a["b_gate_up"], a["b_down"], transpose_b)


def loop(a, kind, layout, transpose_b, dtype=None):
    """The ground truth: reference.moe_experts_loop, in ``dtype`` when given."""

    def cvt(t):
        return t if t is None or dtype is None or not t.is_floating_point() else t.to(dtype)

    b = {n: cvt(t) for n, t in a.items()}
    return reference.moe_experts_loop(
        **b, kind=kind, layout=layout, transpose_b=transpose_b, alpha=ALPHA, limit=LIMIT
    )


def run(op_set, a, kind, layout, transpose_b, placement=pipeline.LOCAL):
    gate = pipeline.Gate(kind, layout, ALPHA, LIMIT)
    return pipeline.run(
        op_set, a["x"], a["ids"], a["weights"], experts_of(a, transpose_b), gate, placement=placement
    )


# ---- the composition on each op set against the loop --------------------------------------------


@pytest.mark.parametrize("op_set", list(OP_SETS))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_loop(device, op_set, dtype, transpose_b, config):
    kind, layout, bias = config
    a = make(24, 36, 20, 6, 2, dtype, device, transpose_b, bias)
    out = run(OP_SETS[op_set], a, kind, layout, transpose_b)
    assert out.shape == a["x"].shape and out.dtype == dtype and out.device == a["x"].device
    assert_accurate(
        out, loop(a, kind, layout, transpose_b, torch.float64), loop(a, kind, layout, transpose_b)
    )


@pytest.mark.parametrize("op_set", list(OP_SETS))
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("case", list(EDGES))
def test_edge_shapes(device, op_set, transpose_b, case):
    T, H, I, E, k = EDGES[case]
    for dtype in (torch.float32, torch.bfloat16):
        a = make(T, H, I, E, k, dtype, device, transpose_b, bias=True)
        out = run(OP_SETS[op_set], a, "gptoss", "interleaved", transpose_b)
        ref64 = loop(a, "gptoss", "interleaved", transpose_b, torch.float64)
        assert out.shape == (T, H) and out.dtype == dtype
        assert_accurate(out, ref64, loop(a, "gptoss", "interleaved", transpose_b), what=f"{case} {dtype}")
        if T == 0 or k == 0:
            assert (out == 0).all()
        if I == 0 and T > 0:  # every routed slot contributes its expert's b_down
            assert out.abs().sum() > 0


@pytest.mark.parametrize("op_set", list(OP_SETS))
def test_expert_without_tokens_and_duplicate_ids(device, op_set):
    ids = torch.tensor([[1, 1], [0, 3], [3, 3], [0, 1], [1, 0]])  # expert 2 gets nothing
    a = make(5, 16, 8, 4, 2, torch.float64, device, bias=True, ids=ids)
    out = run(OP_SETS[op_set], a, "swiglu", "concat", False)
    assert_accurate(out, loop(a, "swiglu", "concat", False))


@pytest.mark.parametrize("case", ["I0", "k=E", "E1", "T0"])
def test_public_function_edge_shapes(device, case):
    # ms.moe_experts, with and without gradients, agrees with the loop on every edge shape; I = 0
    # takes the composed path (the fused CPU kernel does not handle an empty intermediate)
    T, H, I, E, k = EDGES[case]
    for transpose_b in (False, True):
        a = make(T, H, I, E, k, torch.float32, device, transpose_b, bias=True)
        kw = {
            "kind": "gptoss",
            "layout": "interleaved",
            "transpose_b": transpose_b,
            "alpha": ALPHA,
            "limit": LIMIT,
        }
        ref64 = loop(a, "gptoss", "interleaved", transpose_b, torch.float64)
        with torch.no_grad():
            assert_accurate(moestream.moe_experts(**a, **kw), ref64, what=case)
        leaves = {n: a[n].detach().clone().requires_grad_(True) for n in DIFF}
        out = moestream.moe_experts(**dict(a, **leaves), **kw)
        assert_accurate(out, ref64, what=case)
        if T > 0:
            out.sum().backward()
            assert all(t.grad is not None for t in leaves.values())


def test_weights_dtype(device):
    # routing weights in another float dtype than the tokens: the output keeps the tokens' dtype
    a = make(10, 16, 8, 4, 2, torch.bfloat16, device, transpose_b=True)
    for wdt in (torch.float32, torch.bfloat16, torch.float64):
        b = dict(a, weights=a["weights"].to(wdt))
        for op_set in OP_SETS.values():
            out = run(op_set, b, "swiglu", "concat", True)
            assert out.dtype == torch.bfloat16
            assert_accurate(
                out, loop(b, "swiglu", "concat", True, torch.float64), loop(b, "swiglu", "concat", True)
            )


# ---- gradients through the composition, float64 -------------------------------------------------


@pytest.mark.parametrize("op_set", list(OP_SETS))
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("case", ["plain", "k=E", "I0", "no-tokens-expert"])
def test_gradcheck(device, op_set, transpose_b, case):
    shape = {
        "plain": (5, 6, 4, 3, 2),
        "k=E": (4, 6, 3, 3, 3),
        "I0": (4, 5, 0, 3, 2),
        "no-tokens-expert": None,
    }
    if case == "no-tokens-expert":
        ids = torch.tensor([[0, 2], [2, 0], [0, 3], [3, 2]])  # expert 1 gets nothing
        a = make(4, 6, 4, 4, 2, torch.float64, device, transpose_b, bias=True, ids=ids)
    else:
        a = make(*shape[case], torch.float64, device, transpose_b, bias=True)
    names = [n for n in DIFF if a[n] is not None and a[n].numel() > 0]

    def f(*ts):
        return run(OP_SETS[op_set], dict(a, **dict(zip(names, ts))), "gptoss", "interleaved", transpose_b)

    inputs = tuple(a[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ---- the placement seam ----------------------------------------------------------------------------


class SlotPlacement(pipeline.Placement):
    """What an expert cache does at the seam: only the experts that received rows are "resident",
    copied into slots in an order of the cache's choosing (here: reversed); the rows are re-grouped
    by slot and put back in ``combine``. (Reads the counts on the host, as a cache must.)"""

    def dispatch(self, rows, offsets, experts):
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        used = torch.nonzero(counts).flatten().tolist()[::-1]  # slot s holds expert used[s]
        starts = (offsets - counts).tolist()
        order = torch.cat(
            [torch.arange(starts[e], starts[e] + int(counts[e]), device=rows.device) for e in used]
            or [offsets.new_zeros(0)]
        )
        sel = torch.tensor(used, dtype=torch.long, device=rows.device)
        slots = experts.map(lambda t: t.index_select(0, sel))
        slot_offsets = torch.cumsum(counts[sel], 0)
        return rows.index_select(0, order), slot_offsets, slots, order

    def combine(self, y, order):
        return torch.zeros_like(y).index_copy(0, order, y)


class TwoRanks(pipeline.Placement):
    """What expert parallelism does at the seam, as rank 0 of 2 in one process: the experts at hand
    are the local shard [0, E/2) of E; rows of experts [E/2, E) are "sent" to rank 1, which runs
    its shard on them (simulated here in ``combine``), and come back in the reverse exchange."""

    def __init__(self, op_set, remote: pipeline.Experts, gate: pipeline.Gate):
        self.op_set, self.remote, self.gate = op_set, remote, gate

    def num_experts(self, experts):
        return experts.num_experts + self.remote.num_experts

    def dispatch(self, rows, offsets, experts):
        split = int(offsets[experts.num_experts - 1])  # a host read, as the exchange's counts are
        local = offsets[: experts.num_experts]
        return rows[:split], local, experts, (rows[split:], offsets[experts.num_experts :] - split)

    def combine(self, y, sent):
        rows, offsets = sent
        y_remote = pipeline.expert_mlp(self.op_set, rows, offsets, self.remote, self.gate)  # "rank 1"
        return torch.cat([y, y_remote])


@pytest.mark.parametrize("op_set", list(OP_SETS))
@pytest.mark.parametrize("placement", ["slots", "two-ranks"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_placement_seam(device, op_set, placement, transpose_b):
    # experts 1 and 4 receive nothing, so the slot placement holds a strict subset of the experts
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(18)])
    ids = torch.where(ids >= 1, ids + 1, ids)
    ids = torch.where(ids >= 4, ids + 1, ids)
    a = make(18, 20, 12, 6, 2, torch.float64, device, transpose_b, bias=True, ids=ids)
    gate = pipeline.Gate("gptoss", "interleaved", ALPHA, LIMIT)
    names = [n for n in DIFF if a[n] is not None]

    def ours(b):
        experts = experts_of(b, transpose_b)
        if placement == "slots":
            where = SlotPlacement()
        else:
            where = TwoRanks(OP_SETS[op_set], experts.narrow(3, 3), gate)
            experts = experts.narrow(0, 3)
        return pipeline.run(OP_SETS[op_set], b["x"], b["ids"], b["weights"], experts, gate, placement=where)

    assert_accurate(ours(a), loop(a, "gptoss", "interleaved", transpose_b))
    # gradients travel back through dispatch and combine
    g = torch.randn(18, 20, dtype=torch.float64, device=device)
    grads = {}
    for who, fn in (("ours", ours), ("loop", lambda b: loop(b, "gptoss", "interleaved", transpose_b))):
        leaves = {n: a[n].detach().clone().requires_grad_(True) for n in names}
        grads[who] = torch.autograd.grad(fn(dict(a, **leaves)), list(leaves.values()), g)
    for n, got, want in zip(names, grads["ours"], grads["loop"]):
        assert_accurate(got, want, what=f"grad {n}")


def test_placement_num_experts():
    # ids refer to the placement's expert space (the global E of an expert-parallel rank), not to
    # the number of experts whose weights are at hand
    class Global(pipeline.Placement):
        def num_experts(self, experts):
            return 2 * experts.num_experts

        def dispatch(self, rows, offsets, experts):
            assert offsets.shape[0] == 2 * experts.num_experts
            return rows, offsets[: experts.num_experts], experts, None

    a = make(8, 12, 6, 3, 1, torch.float64, ids=torch.randint(0, 3, (8, 1)))
    out = run(ops.OPS, a, "swiglu", "concat", False, Global())
    assert_accurate(out, loop(a, "swiglu", "concat", False))


def test_post_and_custom_activation():
    # the hooks the transformers experts function uses: an activation callable and a post-expert
    # norm on the expert outputs (before the weighted combine)
    a = make(9, 16, 8, 4, 2, torch.float64, transpose_b=True, bias=True)
    act = lambda h: torch.tanh(h[:, :8]) * h[:, 8:]
    post = lambda y: y * 2.0
    out = pipeline.run(ops.OPS, a["x"], a["ids"], a["weights"], experts_of(a, True), act, post=post)
    ref = torch.zeros_like(a["x"])
    for t in range(9):
        for s in range(2):
            e = int(a["ids"][t, s])
            h = a["x"][t] @ a["w_gate_up"][e].t() + a["b_gate_up"][e]
            y = (torch.tanh(h[:8]) * h[8:]) @ a["w_down"][e].t() + a["b_down"][e]
            ref[t] += a["weights"][t, s] * 2.0 * y
    assert_accurate(out, ref)


@pytest.mark.parametrize("k", [1, 3])
def test_weight_inputs(k):
    # Llama 4: the routing weight scales the expert's input; summed over slots
    a = make(7, 12, 6, 4, k, torch.float64, transpose_b=True)

    def experts_fn(x, ids, w):
        return loop(dict(a, x=x, ids=ids, weights=w), "swiglu", "concat", True)

    out = pipeline.weight_inputs(experts_fn, a["x"], a["ids"], a["weights"])
    ref = torch.zeros_like(a["x"])
    for s in range(k):
        one = dict(
            a,
            x=a["x"] * a["weights"][:, s : s + 1],
            ids=a["ids"][:, s : s + 1],
            weights=torch.ones(7, 1, dtype=torch.float64),
        )
        ref += loop(one, "swiglu", "concat", True)
    assert_accurate(out, ref)


# ---- the composed path's argument contract equals the native kernel's --------------------------


def _bad_cases(a):
    w1, w2 = a["w_gate_up"], a["w_down"]
    E, H = w1.shape[0], a["x"].shape[1]
    return {
        "ids dtype": {"ids": a["ids"].float()},
        "ids rows": {"ids": a["ids"][:5], "weights": a["weights"][:5]},
        "weights shape": {"weights": torch.rand(6, 3)},
        "weights dtype": {"weights": a["weights"].to(torch.int64)},
        "x dim": {"x": a["x"][None]},
        "x dtype": {"x": a["x"].to(torch.int64)},
        "w_gate_up dtype": {"w_gate_up": w1.double()},
        "w_gate_up dim": {"w_gate_up": w1[0]},
        "w_gate_up H": {"w_gate_up": torch.randn(E, H - 1, H - 1)},
        "w_gate_up odd": {"w_gate_up": torch.randn(E, 15, H) if a["tb"] else torch.randn(E, H, 15)},
        "w_down shape": {"w_down": w2.transpose(1, 2)},
        "w_down dim": {"w_down": w2[0]},
        "w_down dtype": {"w_down": w2.half()},
        "b_gate_up shape": {"b_gate_up": torch.randn(E, 8)},
        "b_down shape": {"b_down": torch.randn(E - 1, H)},
        "b_down dtype": {"b_down": a["b_down"].to(torch.int32)},
        "kind": {"kind": "relu"},
        "layout": {"layout": "halves"},
    }


def _message(fn, what) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    raise AssertionError(f"{what}: no error")


_NAMES = ("x", "ids", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down")


@pytest.mark.parametrize("transpose_b", [False, True])
def test_composed_path_checks_like_the_kernel(transpose_b):
    # the composed path (CUDA kernel, differentiable path) raises the native kernel's messages
    a = make(6, 16, 8, 4, 2, torch.float32, "cpu", transpose_b=transpose_b, bias=True)
    for what, kw in _bad_cases(dict(a, tb=transpose_b)).items():
        b = dict(a, **{n: v for n, v in kw.items() if n in _NAMES})
        kind, layout = kw.get("kind", "swiglu"), kw.get("layout", "concat")
        args = [b[n] for n in _NAMES]
        want = _message(lambda: call_fused(b, kind, layout, transpose_b), what)  # noqa: B023
        got = _message(lambda: ops._check_experts_args(*args, kind, layout, transpose_b), what)  # noqa: B023
        assert want.startswith("moestream.moe_experts: "), (what, want)
        assert got == want, what
    # and through the public function on the differentiable path
    leaf = a["w_down"].detach().clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"moe_experts: b_down must have shape \[E, H\]"):
        moestream.moe_experts(**dict(a, w_down=leaf, b_down=torch.randn(3, 16)), transpose_b=transpose_b)


def test_cuda_kernel_function_on_cpu_tensors():
    # the function registered as moe_experts' CUDA kernel is device-agnostic Python: on CPU tensors
    # it gives the fused CPU kernel's result, zeros for no slots, and x's strides
    a = make(20, 24, 16, 5, 2, torch.float32, transpose_b=True, bias=True)
    args = (
        a["x"],
        a["ids"],
        a["weights"],
        a["w_gate_up"],
        a["w_down"],
        a["b_gate_up"],
        a["b_down"],
        "gptoss",
        "interleaved",
        True,
        ALPHA,
        LIMIT,
    )
    torch.testing.assert_close(
        ops._moe_experts_cuda(*args), call_fused(a, "gptoss", "interleaved", True), rtol=1e-5, atol=1e-5
    )
    xt = a["x"].t().contiguous().t()
    assert ops._moe_experts_cuda(xt, *args[1:]).stride() == xt.stride()
    for T, k in ((0, 2), (4, 0)):
        b = make(T, 24, 16, 5, k, torch.float32, transpose_b=True, bias=True)
        out = ops._moe_experts_cuda(
            *[b[n] for n in ("x", "ids", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down")],
            "swiglu",
            "concat",
            True,
            ALPHA,
            LIMIT,
        )
        assert out.shape == (T, 24) and (out == 0).all()


# ---- the bench's float64 oracle (the pipeline's expert stage, one expert at a time) -------------


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bench_oracle_matches_loop(transpose_b, config):
    from moestream.bench import oracle

    kind, layout, bias = config
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(15)])  # expert 4 gets nothing
    a = make(15, 20, 12, 5, 2, torch.bfloat16, transpose_b=transpose_b, bias=bias, ids=ids)
    kw = {"kind": kind, "layout": layout, "transpose_b": transpose_b, "alpha": ALPHA, "limit": LIMIT}
    args = [a[n] for n in _NAMES]
    out = oracle.moe_experts64(*args, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loop(a, kind, layout, transpose_b, torch.float64), rtol=1e-10, atol=1e-10)
    g = torch.randn(15, 20, dtype=torch.bfloat16)
    res = oracle.moe_experts_grads64(*args, g, **kw)
    torch.testing.assert_close(res["out"], out, rtol=1e-10, atol=1e-10)
    names = [n for n in DIFF if a[n] is not None]
    leaves = {n: a[n].detach().double().requires_grad_(True) for n in names}
    ref = loop(dict(a, **leaves), kind, layout, transpose_b)
    for n, want in zip(names, torch.autograd.grad(ref, list(leaves.values()), g.double())):
        torch.testing.assert_close(res[f"grad_{n}"], want, rtol=1e-10, atol=1e-10, msg=n)
