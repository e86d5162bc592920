"""The ``"moestream"`` implementation of transformers' expert-parallel registry (transformers 5.x
``transformers.distributed.expert_parallel.EPImplementationInterface``), so that
``DistributedConfig(ep_size=..., ep_implementation="moestream")`` sends the tokens with
moestream's dispatch (:class:`moestream.distributed.ExpertParallel`: counts and rows by
``all_to_all_single`` in ``permute`` order) and runs the local experts on moestream's kernels.

Imported by :mod:`moestream.integrations.transformers`; does nothing when the installed
transformers has no such registry.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["register"]


def _local_experts_forward(module: nn.Module, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """The module's experts on rows whose ids are local (no off-rank sentinels), through moestream's
    experts function: its expert-parallel fallback (for sentinel ids) does not apply here."""
    from .transformers import moestream_experts_forward

    flag = module.__dict__.pop("_is_expert_parallel", None)
    try:
        return moestream_experts_forward(module, x, ids, weights)
    finally:
        if flag is not None:
            module.__dict__["_is_expert_parallel"] = flag


def _make_implementation(base: type) -> type:
    from ..distributed import ExpertParallel

    class MoestreamEP(base):
        """moestream's dispatch and combine (dropless all-to-all in ``permute`` order) and experts,
        for ranks holding different batches (``tp_size`` 1)."""

        def __init__(self, experts: nn.Module, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            if tp_mesh.size() > 1:
                raise ValueError(
                    "ep_implementation='moestream' runs with tp_size=1 (each rank its own batch); use 'all_to_all' "
                    "with tensor parallelism"
                )
            self.module = experts
            self.placement = ExpertParallel(self.num_local_experts * ep_mesh.size(), ep_mesh.get_group())

        def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            ep = self.placement
            x = hidden_states.to(self.module.down_proj.dtype)
            rows, perm, offsets = ops.permute(x, top_k_index, ep.global_experts)
            lrows, loffsets, _, state = ep.dispatch(rows, offsets, None)
            counts = torch.diff(loffsets, prepend=loffsets.new_zeros(1))
            lids = torch.repeat_interleave(
                torch.arange(ep.local_experts, device=x.device), counts, output_size=lrows.shape[0]
            ).unsqueeze(1)
            ones = torch.ones_like(lids, dtype=lrows.dtype)
            y = _local_experts_forward(self.module, lrows, lids, ones)
            y = ep.combine(y, state)
            return ops.unpermute(y, perm, top_k_weights).to(hidden_states.dtype)

    return MoestreamEP


def register() -> bool:
    """Register ``"moestream"`` in transformers' EP registry when it exists; returns whether it did."""
    try:
        from transformers.distributed import expert_parallel as hf_ep
    except Exception:  # noqa: BLE001  (no registry in this transformers, or no torch.distributed)
        return False
    registry = getattr(hf_ep, "EPImplementationInterface", None)
    base = getattr(hf_ep, "EPImplementation", None)
    if registry is None or base is None:
        return False
    registry.register("moestream", _make_implementation(base))
    return True
