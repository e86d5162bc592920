"""Plain-PyTorch implementations of every moestream op.

This module is the oracle for the tests and the baseline for the benchmarks. It favours being
obviously right over being fast: loops over experts are written out, and every routing variant
follows the transformers 5.x code it mirrors. Math runs in float32 (float64 when the input is
float64) and results are cast back like the native ops do.

``moe_experts`` is the expert pipeline (:mod:`moestream.pipeline`) run on these ops;
``moe_experts_loop`` is the same path as a literal per-expert loop, the independent ground truth
both are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import pipeline

__all__ = [
    "gated_activation",
    "grouped_mm",
    "moe_experts",
    "moe_experts_loop",
    "permute",
    "router_aux_loss",
    "router_topk",
    "router_z_loss",
    "unpermute",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _topk_lowest_id_first(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim, descending, ties broken by the lower index (deterministically).

    A stable descending sort keeps equal values in index order, which is exactly that rule.
    """
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def router_topk(
    logits: Tensor,
    k: int,
    score: str = "softmax",
    topk_first: bool = False,
    bias: Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Routing weights [T, k] (float32; float64 for float64 logits) and expert ids [T, k] (int64).

    - softmax / sigmoid then top-k (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3);
    - ``topk_first``: top-k on the logits, then softmax over the k (GPT-OSS) or sigmoid (Llama 4);
    - ``bias`` is added to the scores for selection only (DeepSeek-V3's correction bias);
    - group-limited: groups ranked by the sum of their top-2 scores, the best ``topk_groups`` kept;
      the others' selection values become -inf, so a k larger than the kept experts also picks
      from the dropped groups (lowest ids first), with their real weights, as transformers'
      DeepSeek-V3 router does (its ``torch.topk`` picks some of those equal -inf entries);
    - ``normalize`` divides by (sum + 1e-20); ``scale`` multiplies last.
    """
    acc = _acc_dtype(logits)
    lg = logits.to(acc)
    T, E = lg.shape
    if topk_first:
        sel = lg if bias is None else lg + bias.to(acc)
        sel = _group_mask(sel, num_groups, topk_groups)
        _, ids = _topk_lowest_id_first(sel, k)
        top = lg.gather(1, ids)
        w = torch.softmax(top, dim=-1) if score == "softmax" else torch.sigmoid(top)
    else:
        s = torch.softmax(lg, dim=-1) if score == "softmax" else torch.sigmoid(lg)
        sel = s if bias is None else s + bias.to(acc)
        sel = _group_mask(sel, num_groups, topk_groups)
        _, ids = _topk_lowest_id_first(sel, k)
        w = s.gather(1, ids)
    if normalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * scale
    return w, ids


def _group_mask(sel: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    if num_groups <= 1:
        return sel
    T, E = sel.shape
    g = sel.view(T, num_groups, E // num_groups)
    top2 = min(2, E // num_groups)
    group_scores = _topk_lowest_id_first(g, top2)[0].sum(dim=-1)
    _, gidx = _topk_lowest_id_first(group_scores, topk_groups)
    keep = torch.zeros(T, num_groups, dtype=torch.bool, device=sel.device)
    keep.scatter_(1, gidx, True)
    keep = keep.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
    return sel.masked_fill(~keep, float("-inf"))


def router_aux_loss(logits: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load-balancing loss, as transformers' ``load_balancing_loss_func``:
    E * sum_e f_e * P_e, f_e the share of (token, slot) assignments per token routed to e,
    P_e the mean softmax probability of e (tokens weighted by ``mask`` when given)."""
    acc = _acc_dtype(logits)
    T, E = logits.shape
    probs = torch.softmax(logits.to(acc), dim=-1)
    m = torch.ones(T, dtype=acc, device=logits.device) if mask is None else mask.to(acc).reshape(T)
    counts = torch.zeros(E, dtype=acc, device=logits.device)
    counts.scatter_add_(0, ids.reshape(-1).long(), m.repeat_interleave(ids.shape[1]))
    total = m.sum()
    f = counts / total
    p = (probs * m[:, None]).sum(0) / total
    return (f * p).sum() * E


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    lse = torch.logsumexp(logits.to(_acc_dtype(logits)), dim=-1)
    return (lse * lse).mean()


def permute(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of x copied into (expert, token, slot) order.

    Returns x_sorted [T*k, H], perm [T, k] int64 (the x_sorted row holding token t's slot s)
    and offsets [E] int64 (cumulative ends of each expert's rows)."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    # flat index t*k + s already orders (token, slot); a stable sort by expert gives (expert, token, slot)
    order = torch.sort(flat, stable=True).indices
    perm = torch.empty_like(order)
    perm[order] = torch.arange(order.numel(), device=ids.device)
    x_sorted = x[order // k] if k > 0 else x.new_empty((0, x.shape[1]))
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    offsets = torch.cumsum(counts, 0).to(torch.int64)
    return x_sorted.contiguous(), perm.view(T, k), offsets


def unpermute(y_sorted: Tensor, perm: Tensor, weights: Tensor | None = None) -> Tensor:
    """y[t] = sum_s weights[t, s] * y_sorted[perm[t, s]], accumulated in float32 in slot order."""
    acc = _acc_dtype(y_sorted)
    T, k = perm.shape
    out = torch.zeros(T, y_sorted.shape[1], dtype=acc, device=y_sorted.device)
    for s in range(k):
        rows = y_sorted[perm[:, s]].to(acc)
        if weights is not None:
            rows = rows * weights[:, s : s + 1].to(acc)
        out += rows
    return out.to(y_sorted.dtype)


def grouped_mm(
    a: Tensor, b: Tensor, offsets: Tensor, transpose_b: bool = False, bias: Tensor | None = None
) -> Tensor:
    """out[rows of group g] = a[rows of g] @ b[g] (b[g].T if transpose_b) (+ bias[g]); rows past
    offsets[-1] are zero. Accumulates in float32 (float64 for float64 inputs)."""
    acc = _acc_dtype(a)
    N = b.shape[1] if transpose_b else b.shape[2]
    out = torch.zeros(a.shape[0], N, dtype=acc, device=a.device)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            bg = b[g].to(acc)
            out[start:end] = a[start:end].to(acc) @ (bg.t() if transpose_b else bg)
            if bias is not None:
                out[start:end] += bias[g].to(acc)
        start = end
    return out.to(a.dtype)


def int8_activations(a: Tensor, group_size: int) -> Tensor:
    """What the CPU compressed matmuls multiply with ``activations="int8"``: a [M, K] quantized per
    row and group of ``group_size`` elements to int8 with the scale max|a| / 127 (in float32, round
    half to even) and dequantized, in float64. A group with a NaN or an infinity gets a non-finite
    scale, so its row's results are not finite."""
    M, K = a.shape
    x = a.float().reshape(M, K // group_size, group_size)
    amax = x.abs().amax(-1, keepdim=True)
    amax = torch.where(torch.isnan(x).any(-1, keepdim=True), torch.full_like(amax, float("nan")), amax)
    ok = (amax > 0) & torch.isfinite(amax)
    # tensors divided by tensors: one rounding, as the kernels compute them (a division by a
    # Python scalar may be a multiplication by its reciprocal: two)
    inv = torch.where(ok, torch.full_like(amax, 127.0) / torch.where(ok, amax, torch.ones_like(amax)), 0.0)
    q = torch.round(torch.nan_to_num(x * inv, nan=-128.0)).clamp(-128, 127)
    return (q.double() * (amax / torch.full_like(amax, 127.0)).double()).reshape(M, K)


def gated_activation(
    x: Tensor, kind: str = "swiglu", layout: str = "concat", alpha: float = 1.702, limit: float = 7.0
) -> Tensor:
    """x [..., 2I] -> [..., I]; gate/up either as two halves ("concat") or alternating ("interleaved").

    swiglu: silu(gate) * up; geglu: gelu(gate) * up (erf form);
    gptoss: gate = gate.clamp(max=limit); up = up.clamp(-limit, limit);
            gate * sigmoid(alpha * gate) * (up + 1)."""
    acc = _acc_dtype(x)
    xf = x.to(acc)
    if layout == "concat":
        gate, up = xf.chunk(2, dim=-1)
    else:
        gate, up = xf[..., ::2], xf[..., 1::2]
    if kind == "swiglu":
        out = F.silu(gate) * up
    elif kind == "geglu":
        out = F.gelu(gate) * up
    elif kind == "gptoss":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        out = gate * torch.sigmoid(gate * alpha) * (up + 1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return out.to(x.dtype)


#: The reference ops as the pipeline's op set (plain PyTorch, differentiable by autograd).
OPS = pipeline.ExpertOps(permute, grouped_mm, gated_activation, unpermute)


def moe_experts(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    kind: str = "swiglu",
    layout: str = "concat",
    transpose_b: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """The expert path composed of the reference ops (:func:`moestream.pipeline.run` on
    :data:`OPS`): permute, grouped_mm, activation, grouped_mm, weighted unpermute."""
    return pipeline.moe_experts(
        OPS, x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b, alpha, limit
    )


def moe_experts_loop(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    kind: str = "swiglu",
    layout: str = "concat",
    transpose_b: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """The expert path as the usual Python loop over experts (index_add_ into the output): the
    ground truth for ``moe_experts`` and every composition of :mod:`moestream.pipeline` (it shares
    no code with them but ``gated_activation``) and the 'plain PyTorch' baseline. Differentiable."""
    out = torch.zeros_like(x)
    E = w_gate_up.shape[0]
    for e in range(E):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        w1 = w_gate_up[e].t() if transpose_b else w_gate_up[e]
        w2 = w_down[e].t() if transpose_b else w_down[e]
        h = x[tok] @ w1
        if b_gate_up is not None:
            h = h + b_gate_up[e]
        a = gated_activation(h, kind, layout, alpha, limit)
        y = a @ w2
        if b_down is not None:
            y = y + b_down[e]
        out = out.index_add(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
    return out


def dense_flops(tokens: int, hidden: int, intermediate: int, k: int) -> int:
    """Matmul FLOPs of the expert path's forward: two GEMMs per routed (token, slot)."""
    return 2 * tokens * k * (hidden * 2 * intermediate + intermediate * hidden)
