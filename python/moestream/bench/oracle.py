"""The correctness gate's references: float64 results of ``moestream.reference``, computed in
pieces (per expert, or per block of rows) so that no float64 copy of all expert weights is made.

Every implementation's output is compared with the reference computed in float64 from the same
(low-precision) inputs with :func:`moestream.testing.rel_err` (index outputs exactly), within
:data:`moestream.testing.BENCH_TOLERANCE`. Router ids: at most 0.1% of rows may pick a different
expert set than the float64 reference (near-ties decided differently in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import pipeline, reference
from ..testing import block_rows

ROUTER_ID_MISMATCH = 1e-3  # fraction of rows whose chosen experts may differ from the float64 reference


# ---------------------------------------------------------------------------------------------
# float64 references, piecewise


def f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def router_topk64(logits: Tensor, k: int, bias: Tensor | None, **kw) -> tuple[Tensor, Tensor]:
    return reference.router_topk(f64(logits), k, bias=f64(bias), **kw)


def unpermute64(y_sorted: Tensor, perm: Tensor, weights: Tensor | None) -> Tensor:
    T, k = perm.shape
    out = torch.empty(T, y_sorted.shape[1], dtype=torch.float64, device=y_sorted.device)
    step = max(1, block_rows(y_sorted.shape[1]) // max(1, k))
    for s in range(0, T, step):
        p = perm[s : s + step]
        rows = y_sorted[p.reshape(-1)].to(torch.float64)
        local = torch.arange(rows.shape[0], device=perm.device).view(p.shape)
        w = None if weights is None else f64(weights[s : s + step])
        out[s : s + step] = reference.unpermute(rows, local, w)
    return out


def grouped_mm64(
    a: Tensor, b: Tensor, offsets: Tensor, transpose_b: bool, bias: Tensor | None = None
) -> Tensor:
    N = b.shape[1] if transpose_b else b.shape[2]
    out = torch.zeros(a.shape[0], N, dtype=torch.float64, device=a.device)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            one = torch.tensor([end - start], dtype=torch.int64, device=a.device)
            bg = None if bias is None else f64(bias[g : g + 1])
            out[start:end] = reference.grouped_mm(f64(a[start:end]), f64(b[g : g + 1]), one, transpose_b, bg)
        start = end
    return out


def gated_activation64(x: Tensor, kind: str, layout: str, alpha: float, limit: float) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], x2.shape[1] // 2, dtype=torch.float64, device=x.device)
    step = block_rows(x2.shape[1])
    for s in range(0, x2.shape[0], step):
        out[s : s + step] = reference.gated_activation(f64(x2[s : s + step]), kind, layout, alpha, limit)
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def _expert_slices(ids: Tensor, num_experts: int):
    """Yield (expert, token index, slot index) for every expert that receives tokens."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    start = 0
    for e, c in enumerate(counts):
        if c:
            idx = order[start : start + c]
            yield e, idx // k, idx % k
        start += c


def _expert_mlp64(xs: Tensor, experts: pipeline.Experts, gate: pipeline.Gate) -> Tensor:
    """One expert's MLP on its rows in float64: the pipeline's expert stage on the reference ops."""
    one = torch.tensor([xs.shape[0]], dtype=torch.int64, device=xs.device)
    return pipeline.expert_mlp(reference.OPS, xs, one, experts, gate)


def moe_experts64(
    x,
    ids,
    weights,
    w_gate_up,
    w_down,
    b_gate_up=None,
    b_down=None,
    kind="swiglu",
    layout="concat",
    transpose_b=False,
    alpha=1.702,
    limit=7.0,
) -> Tensor:
    """The expert path in float64, one expert at a time (the weights are converted per expert)."""
    experts = pipeline.Experts(w_gate_up, w_down, b_gate_up, b_down, transpose_b)
    gate = pipeline.Gate(kind, layout, alpha, limit)
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e, tok, slot in _expert_slices(ids, experts.num_experts):
        y = _expert_mlp64(f64(x[tok]), experts.narrow(e, 1).map(f64), gate)
        out.index_add_(0, tok, y * f64(weights[tok, slot]).unsqueeze(1))
    return out


def moe_experts_grads64(
    x,
    ids,
    weights,
    w_gate_up,
    w_down,
    b_gate_up,
    b_down,
    grad_out,
    kind="swiglu",
    layout="concat",
    transpose_b=False,
    alpha=1.702,
    limit=7.0,
) -> dict[str, Tensor]:
    """Forward output and the gradients of sum(out * grad_out) with respect to x, the routing
    weights, the expert weights and biases, in float64 (autograd through the reference ops, one
    expert at a time)."""
    E = w_gate_up.shape[0]
    gate = pipeline.Gate(kind, layout, alpha, limit)
    dev = x.device
    res = {
        "out": torch.zeros(x.shape, dtype=torch.float64, device=dev),
        "grad_x": torch.zeros(x.shape, dtype=torch.float64, device=dev),
        "grad_weights": torch.zeros(weights.shape, dtype=torch.float64, device=dev),
        "grad_w_gate_up": torch.zeros(w_gate_up.shape, dtype=torch.float64, device=dev),
        "grad_w_down": torch.zeros(w_down.shape, dtype=torch.float64, device=dev),
    }
    if b_gate_up is not None:
        res["grad_b_gate_up"] = torch.zeros(b_gate_up.shape, dtype=torch.float64, device=dev)
    if b_down is not None:
        res["grad_b_down"] = torch.zeros(b_down.shape, dtype=torch.float64, device=dev)
    with torch.enable_grad():
        for e, tok, slot in _expert_slices(ids, E):
            leaves = {
                "x": f64(x[tok]).requires_grad_(),
                "w": f64(weights[tok, slot]).requires_grad_(),
                "w1": f64(w_gate_up[e : e + 1]).requires_grad_(),
                "w2": f64(w_down[e : e + 1]).requires_grad_(),
            }
            if b_gate_up is not None:
                leaves["b1"] = f64(b_gate_up[e : e + 1]).requires_grad_()
            if b_down is not None:
                leaves["b2"] = f64(b_down[e : e + 1]).requires_grad_()
            one = pipeline.Experts(
                leaves["w1"], leaves["w2"], leaves.get("b1"), leaves.get("b2"), transpose_b
            )
            y = _expert_mlp64(leaves["x"], one, gate)
            contrib = y * leaves["w"].unsqueeze(1)
            names = list(leaves)
            grads = torch.autograd.grad(contrib, [leaves[n] for n in names], f64(grad_out[tok]))
            g = dict(zip(names, grads))
            res["out"].index_add_(0, tok, contrib.detach())
            res["grad_x"].index_add_(0, tok, g["x"])
            res["grad_weights"][tok, slot] = g["w"]
            res["grad_w_gate_up"][e] = g["w1"][0]
            res["grad_w_down"][e] = g["w2"][0]
            if "b1" in g:
                res["grad_b_gate_up"][e] = g["b1"][0]
            if "b2" in g:
                res["grad_b_down"][e] = g["b2"][0]
    return res
