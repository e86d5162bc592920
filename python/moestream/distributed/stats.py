"""Router statistics reduced over an expert-parallel group, so that they equal the single-process
values on the concatenated batch of all ranks.

The losses' values are the group's on every rank; their gradients reach this rank's logits only
(:func:`~moestream.distributed.collectives.sum_with_local_grad`), so gradients summed over the
ranks equal the single-process gradients: add the loss on every rank and sum the replicated
parameters' gradients (``all_reduce_grads``); with averaging data parallelism (DDP's default),
multiply the loss by the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import sum_with_local_grad

__all__ = ["expert_load", "router_aux_loss", "router_z_loss"]


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def router_aux_loss(logits: Tensor, ids: Tensor, mask: Tensor | None = None, group=None) -> Tensor:
    """:func:`moestream.router_aux_loss` (Switch-Transformer load balancing, E * sum_e f_e * P_e)
    over the tokens of every rank of ``group``: logits [T, E], ids [T, k], mask [T] optional (this
    rank's tokens) -> a scalar, the same on every rank and equal to the single-process loss on the
    concatenated batch."""
    if logits.dim() != 2 or ids.dim() != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"router_aux_loss: logits must be [T, E] and ids [T, k], got logits {tuple(logits.shape)}, ids "
            f"{tuple(ids.shape)}"
        )
    acc = _acc(logits)
    T, E = logits.shape
    probs = torch.softmax(logits.to(acc), dim=-1)
    m = torch.ones(T, dtype=acc, device=logits.device) if mask is None else mask.to(acc).reshape(T)
    counts = torch.zeros(E, dtype=acc, device=logits.device)
    counts.scatter_add_(0, ids.reshape(-1).long(), m.repeat_interleave(ids.shape[1]))
    # counts and the token total are not differentiable: one all-reduce for both
    ct = torch.cat([counts, m.sum().reshape(1)])
    dist.all_reduce(ct, group=group)
    counts, total = ct[:E], ct[E]
    psum = sum_with_local_grad((probs * m[:, None]).sum(0), group)
    return ((counts / total) * (psum / total)).sum() * E


def router_z_loss(logits: Tensor, group=None) -> Tensor:
    """:func:`moestream.router_z_loss` (mean over tokens of logsumexp(logits)^2) over the tokens of
    every rank of ``group``."""
    lse = torch.logsumexp(logits.to(_acc(logits)), dim=-1)
    n = torch.tensor(float(lse.numel()), dtype=lse.dtype, device=lse.device)
    dist.all_reduce(n, group=group)
    return sum_with_local_grad((lse * lse).sum(), group) / n


def expert_load(ids: Tensor, num_experts: int, group=None) -> Tensor:
    """Tokens routed to each expert [E] int64 over every rank of ``group`` (ids [T, k] of this
    rank): the counts DeepSeek-V3's auxiliary-loss-free balancing updates its score-correction
    bias from, equal on every rank so that the replicated bias stays replicated."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts)
    if counts.numel() != num_experts:
        raise ValueError(f"expert_load: ids hold values >= num_experts={num_experts}")
    dist.all_reduce(counts, group=group)
    return counts
