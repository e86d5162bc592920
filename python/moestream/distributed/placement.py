"""Expert parallelism as a :class:`moestream.pipeline.Placement`.

Rank r of W holds experts [r * L, (r + 1) * L), L = E / W. The pipeline hands :meth:`dispatch` this
rank's rows in (expert, token, slot) order (``permute``); since each rank owns a contiguous range
of experts, that order is already grouped by destination rank, so the rows go out in one
``all_to_all_single`` with no per-expert loop. The rows received (ordered by source rank, then
local expert) are regrouped by local expert with ``permute`` (k = 1), run through the local
experts in one ``grouped_mm`` pass by the pipeline, and :meth:`combine` undoes both steps
(``unpermute``, then the reverse all-to-all).

Dropless (the default): the per-(rank, expert) counts go out first with an ``all_to_all_single`` of
W * L int64 values, and the split sizes are read back to the host (the one host synchronisation of
the layer: ``all_to_all_single`` takes its splits as Python lists).

Capacity mode (``capacity_factor``): every rank sends exactly C = ceil(capacity_factor * N / E)
rows per expert (N = its T * k rows), padded with zero rows, so every shape is static and no
count is read back (CUDA-graph friendly). Rows past the first C of an expert on a rank (in
(token, slot) order) are dropped: their expert output is zero, and the routed weight of that slot
contributes nothing. Every rank must then pass the same number of tokens (the splits are
computed locally). :attr:`ExpertParallel.dropped` counts what the last forward dropped on this
rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import pipeline
from .collectives import all_to_all, all_to_all_counts

__all__ = ["ExpertParallel"]


class ExpertParallel(pipeline.Placement):
    """Experts sharded over ``group`` (default: the world): ``num_experts`` global experts, this
    rank holding experts [rank * L, (rank + 1) * L).

    ``ops``: the op set whose ``permute`` / ``unpermute`` regroup the received rows (default
    :data:`moestream.ops.OPS`). ``capacity_factor``: ``None`` (dropless) or > 0 (static shapes,
    see the module docstring).

    After each forward: :attr:`load` [E] int64, the rows this rank routed to each expert (counted
    before any drop), and :attr:`dropped` (int64 scalar tensor, capacity mode; 0 otherwise).
    Counters since construction (or :meth:`reset_counters`): :attr:`bytes_sent` and
    :attr:`bytes_received`, the bytes of rows this rank's forward all-to-alls (dispatch and
    combine) sent to and received from other ranks (the backward moves as many again, reversed).
    """

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup | None = None,
        *,
        capacity_factor: float | None = None,
        ops: pipeline.ExpertOps | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallel: torch.distributed is not initialised (call torch.distributed.init_process_group "
                "first, e.g. under torchrun)"
            )
        world = dist.get_world_size(group)
        if num_experts % world != 0:
            raise ValueError(
                f"ExpertParallel: num_experts={num_experts} is not divisible by the process group's size {world}; "
                "every rank must hold the same number of experts"
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"ExpertParallel: capacity_factor must be None or > 0, got {capacity_factor!r}")
        if ops is None:
            from .. import ops as _ops

            ops = _ops.OPS
        self.group = group
        self.world_size = world
        self.rank = dist.get_rank(group)
        self.global_experts = num_experts
        self.local_experts = num_experts // world
        self.first_expert = self.rank * self.local_experts
        self.capacity_factor = capacity_factor
        self.ops = ops
        self.load: Tensor | None = None
        self.dropped: Tensor | None = None
        self.reset_counters()

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    def _count(self, rows: Tensor, sent: list[int], received: list[int]) -> None:
        row_bytes = rows.element_size() * rows.shape[-1]  # rows [N, H]
        self.bytes_sent += (sum(sent) - sent[self.rank]) * row_bytes
        self.bytes_received += (sum(received) - received[self.rank]) * row_bytes

    def __repr__(self) -> str:
        cf = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}"
        return (
            f"ExpertParallel(rank {self.rank} of {self.world_size}, experts [{self.first_expert}, "
            f"{self.first_expert + self.local_experts}) of {self.global_experts}{cf})"
        )

    # the Placement interface ------------------------------------------------------------------

    def num_experts(self, experts: pipeline.Experts) -> int:
        if experts.num_experts != self.local_experts:
            raise ValueError(
                f"ExpertParallel: the experts given hold {experts.num_experts} experts, but rank {self.rank} of "
                f"{self.world_size} should hold {self.local_experts} of {self.global_experts}"
            )
        return self.global_experts

    def dispatch(
        self, rows: Tensor, offsets: Tensor, experts: pipeline.Experts
    ) -> tuple[Tensor, Tensor, pipeline.Experts, Any]:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        self.load = counts.detach()
        if self.capacity_factor is not None:
            return self._dispatch_capacity(rows, offsets, counts, experts)
        self.dropped = torch.zeros((), dtype=torch.int64, device=rows.device)
        W, L = self.world_size, self.local_experts
        # recv[s * L + l]: rows rank s sends to this rank's local expert l
        recv = all_to_all_counts(counts, self.group)
        sizes = torch.stack([counts.view(W, L).sum(1), recv.view(W, L).sum(1)]).tolist()  # host sync
        send_splits, recv_splits = sizes
        got = all_to_all(rows, recv_splits, send_splits, self.group)
        self._count(rows, send_splits, recv_splits)
        # received order is (source rank, local expert, token, slot); regroup by local expert
        local_ids = torch.arange(L, device=rows.device).repeat(W)
        local_ids = local_ids.repeat_interleave(recv, output_size=got.shape[0]).unsqueeze(1)
        lrows, lperm, loffsets = self.ops.permute(got, local_ids, L)
        return lrows, loffsets, experts, ("dropless", lperm, send_splits, recv_splits)

    def combine(self, y: Tensor, state: Any) -> Tensor:
        if state[0] == "capacity":
            return self._combine_capacity(y, state)
        _, lperm, send_splits, recv_splits = state
        back = self.ops.unpermute(y, lperm, None)  # received order
        self._count(back, recv_splits, send_splits)
        return all_to_all(back, send_splits, recv_splits, self.group)

    # capacity mode ----------------------------------------------------------------------------

    def capacity(self, rows: int) -> int:
        """C, the rows each rank sends to each expert, for a rank with ``rows`` = T * k rows."""
        return math.ceil(self.capacity_factor * rows / self.global_experts)

    def _dispatch_capacity(self, rows, offsets, counts, experts):
        N, H = rows.shape
        E, W, L = self.global_experts, self.world_size, self.local_experts
        C = self.capacity(N)
        dev = rows.device
        starts = offsets - counts
        slot = torch.arange(C, device=dev)
        kept = slot.unsqueeze(0) < counts.unsqueeze(1)  # [E, C]
        # row N is an appended zero row: the padding of experts with fewer than C rows
        src = torch.where(kept, starts.unsqueeze(1) + slot.unsqueeze(0), N).reshape(E * C)
        padded = torch.cat([rows, rows.new_zeros(1, H)])[src]
        self.dropped = (counts - C).clamp(min=0).sum()
        splits = [L * C] * W
        got = all_to_all(padded, splits, splits, self.group)  # (source rank, local expert, slot)
        self._count(padded, splits, splits)
        lrows = got.view(W, L, C, H).transpose(0, 1).reshape(L * W * C, H)
        loffsets = torch.arange(1, L + 1, device=dev, dtype=torch.int64) * (W * C)
        # where row n of ``rows`` sits in ``padded`` (E * C: dropped, an appended zero row)
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=dev), counts, output_size=N)
        pos = torch.arange(N, device=dev) - starts[expert_of_row]
        dest = torch.where(pos < C, expert_of_row * C + pos, E * C)
        return lrows, loffsets, experts, ("capacity", dest, C, splits)

    def _combine_capacity(self, y, state):
        _, dest, C, splits = state
        W, L, H = self.world_size, self.local_experts, y.shape[-1]
        back = y.view(L, W, C, H).transpose(0, 1).reshape(W * L * C, H)
        self._count(back, splits, splits)
        back = all_to_all(back, splits, splits, self.group)  # [E * C, H] in this rank's padded order
        return torch.cat([back, back.new_zeros(1, H)])[dest]
