"""Sharding the experts of moestream MoE blocks over a process group, and what goes with it:
which parameters are sharded, summing the replicated parameters' gradients, the full state dict.

A sharded :class:`moestream.nn.GroupedExperts` keeps its parameter names; its parameters hold
experts [rank * L, (rank + 1) * L) (shape [L, ...]); its ``placement`` is an
:class:`~moestream.distributed.ExpertParallel`. Its ``load_state_dict`` accepts either the local
shard or the full [E, ...] tensors (a single-process checkpoint), of which it keeps this rank's
slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn.moe import GroupedExperts, MoE
from .placement import ExpertParallel

__all__ = [
    "all_reduce_grads",
    "expert_parameters",
    "full_state_dict",
    "is_sharded",
    "parallelize_experts",
    "replicated_parameters",
    "shard_experts",
]

_EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def is_sharded(experts: nn.Module) -> bool:
    return isinstance(getattr(experts, "placement", None), ExpertParallel)


def _load_slice_hook(module, state_dict, prefix, *args, **kwargs):
    """Full [E, ...] expert tensors in a state dict (a single-process checkpoint) -> this rank's
    [L, ...] slice; a local shard passes unchanged."""
    ep: ExpertParallel = module.placement
    for name in _EXPERT_TENSORS:
        key = prefix + name
        t = state_dict.get(key)
        if t is not None and t.dim() > 0 and t.shape[0] == ep.global_experts != ep.local_experts:
            state_dict[key] = t.narrow(0, ep.first_expert, ep.local_experts)


def shard_experts(
    experts: GroupedExperts,
    group: dist.ProcessGroup | None = None,
    *,
    capacity_factor: float | None = None,
    original: nn.Module | None = None,
) -> ExpertParallel:
    """Keep this rank's slice of ``experts``' parameters (new Parameters of shape [L, ...], the full
    ones released) and route its forward through an :class:`ExpertParallel` placement. ``original``:
    a module holding the same Parameter objects (the transformers experts module of a patched
    block), updated to hold the shards too."""
    if is_sharded(experts):
        raise ValueError(f"shard_experts: these experts are already sharded ({experts.placement})")
    E = experts.num_experts
    ep = ExpertParallel(E, group, capacity_factor=capacity_factor)
    for name in _EXPERT_TENSORS:
        p = getattr(experts, name, None)
        if p is None:
            continue
        if p.shape[0] != E:
            raise ValueError(f"shard_experts: {name} has {p.shape[0]} experts, expected num_experts={E}")
        shard = nn.Parameter(
            p.detach().narrow(0, ep.first_expert, ep.local_experts).clone(), requires_grad=p.requires_grad
        )
        setattr(experts, name, shard)
        if original is not None and getattr(original, name, None) is p:
            setattr(original, name, shard)
    experts.placement = ep
    experts.num_local_experts = ep.local_experts
    experts._register_load_state_dict_pre_hook(_load_slice_hook, with_module=True)
    return ep


def parallelize_experts(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, capacity_factor: float | None = None
) -> int:
    """Shard the experts of every moestream MoE block in ``model`` (:class:`moestream.nn.MoE`,
    including transformers blocks replaced by :func:`moestream.patch_moe`) over ``group`` (default:
    the world): rank r of W keeps experts [r * E / W, (r + 1) * E / W) as parameters of shape
    [E / W, ...]; routers, shared experts and dense layers stay replicated. Returns how many blocks
    were sharded (blocks already sharded are skipped).

    Each rank then feeds its own tokens and gets its own rows back. Gradients: each rank's expert
    parameters receive the gradients of every rank's tokens routed to them; the replicated
    parameters receive this rank's part only (sum them over the group, e.g. with
    :func:`all_reduce_grads`, or give them to DDP / FSDP). Raises ``ValueError`` when E is not
    divisible by the group's size or when ``model`` has no moestream MoE block (patch transformers
    models with :func:`moestream.patch_moe` first)."""
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    if not blocks:
        raise ValueError(
            f"parallelize_experts: found no moestream MoE block in {type(model).__name__} (build it with "
            "moestream.nn.MoE, or call moestream.patch_moe(model) first for a transformers model)"
        )
    world = dist.get_world_size(group) if dist.is_initialized() else None
    for m in blocks:
        E = m.submodule("experts").num_experts
        if world is not None and E % world != 0:
            raise ValueError(
                f"parallelize_experts: a {type(m).__name__} block has num_experts={E}, not divisible by the process "
                f"group's size {world}"
            )
    n = 0
    for m in blocks:
        experts = m.submodule("experts")
        if is_sharded(experts):
            continue
        orig = m.__dict__.get("_moestream_original")
        original = getattr(orig[0], "experts", None) if orig else None
        shard_experts(experts, group, capacity_factor=capacity_factor, original=original)
        n += 1
    return n


def _sharded_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if is_sharded(m):
            yield name, m


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded (per-rank) expert parameters of ``model``."""
    return [p for _, m in _sharded_experts(model) for p in m.parameters(recurse=False)]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter of ``model``: the same on every rank (what DDP / FSDP should handle;
    for DDP, ignore :func:`expert_parameters` with ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""
    sharded = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if id(p) not in sharded]


def all_reduce_grads(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, average: bool = False
) -> None:
    """Sum (``average``: average) the gradients of the replicated parameters over ``group``, in one
    flattened all-reduce. The expert gradients are already complete on their rank."""
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded expert tensor gathered from the ranks of its group
    (all-gather: every rank gets the full dict), equal to the single-process state dict: the same
    keys, shapes and values (checkpoints are unchanged by expert parallelism)."""
    sd = model.state_dict()
    for prefix, m in _sharded_experts(model):
        ep: ExpertParallel = m.placement
        for name in _EXPERT_TENSORS:
            key = f"{prefix}.{name}" if prefix else name
            t = sd.get(key)
            if t is None:
                continue
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(ep.world_size)]
            dist.all_gather(parts, t, group=ep.group)
            sd[key] = torch.cat(parts)
    return sd
