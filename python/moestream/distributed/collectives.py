"""Differentiable collectives for expert parallelism, on ``torch.distributed`` (NCCL or gloo).

``torch.distributed.all_to_all_single`` is not differentiable; :func:`all_to_all` is, with the
reverse all-to-all as its backward. It is a plain ``autograd.Function`` (not
``torch.distributed.nn.functional.all_to_all_single``) so that uneven and empty splits and the
gloo backend are handled the same way in the forward and the backward, and so that a rank that
sends or receives nothing still takes part in both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_to_all", "all_to_all_counts", "sum_with_local_grad"]


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        # the rows came from in_splits[r] rows of rank r: their gradients go back the same way
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Rows of ``x`` [sum(in_splits), ...] sent to the ranks of ``group``: the first in_splits[0]
    rows to rank 0, the next in_splits[1] to rank 1, ...; returns [sum(out_splits), ...], the
    out_splits[r] rows received from rank r in rank order. Differentiable (the backward is the
    reverse all-to-all, a collective: every rank must run it)."""
    if len(out_splits) != len(in_splits):
        raise ValueError(
            f"all_to_all: out_splits and in_splits differ in length: {out_splits} vs {in_splits}"
        )
    if x.shape[0] != sum(in_splits):
        raise ValueError(f"all_to_all: x has {x.shape[0]} rows but in_splits sum to {sum(in_splits)}")
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_to_all_counts(counts: Tensor, group=None) -> Tensor:
    """counts [W * n] int64 (n values for each rank) -> the [W * n] values the ranks sent to this
    one (not differentiable: counts of rows)."""
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


def sum_with_local_grad(x: Tensor, group=None) -> Tensor:
    """The sum of ``x`` over the ranks of ``group``, whose gradient is this rank's own: the value
    every rank sees is the group's, and each rank's backward reaches only its own inputs, so the
    gradients summed over ranks are those of the single-process computation on all ranks' data
    (the convention of the expert-parallel tests: the per-rank losses add up to the global loss)."""
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return x + (total - x.detach())
