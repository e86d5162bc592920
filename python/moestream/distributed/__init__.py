"""Expert parallelism on ``torch.distributed``: the experts of each MoE block sharded over a process
group (rank r of W holds experts [r * E / W, (r + 1) * E / W)), tokens sent to their experts' rank
by all-to-all and back (NCCL on GPUs, gloo on CPUs).

- :func:`parallelize_experts` shards every moestream MoE block of a model (``ms.nn.MoE``, or
  transformers blocks after ``ms.patch_moe``); ``ms.nn.MoE(..., ep_group=group)`` does it for one.
- :class:`ExpertParallel` is the :class:`moestream.pipeline.Placement` that does the dispatch and
  combine (dropless, or static shapes with ``capacity_factor``).
- :func:`router_aux_loss`, :func:`router_z_loss`, :func:`expert_load`: router statistics over
  the group, equal to the single-process values.
- :func:`all_reduce_grads`, :func:`expert_parameters`, :func:`replicated_parameters`,
  :func:`full_state_dict`: training and checkpoint glue.

Only the gloo paths are tested (CPU processes); the NCCL paths use the same ``torch.distributed``
calls but have not been run on a multi-GPU machine.
"""

from .collectives import all_to_all
from .placement import ExpertParallel
from .shard import (
    all_reduce_grads,
    expert_parameters,
    full_state_dict,
    is_sharded,
    parallelize_experts,
    replicated_parameters,
    shard_experts,
)
from .stats import expert_load, router_aux_loss, router_z_loss

__all__ = [
    "ExpertParallel",
    "all_reduce_grads",
    "all_to_all",
    "expert_load",
    "expert_parameters",
    "full_state_dict",
    "is_sharded",
    "parallelize_experts",
    "replicated_parameters",
    "router_aux_loss",
    "router_z_loss",
    "shard_experts",
]
