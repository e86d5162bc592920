"""Random inputs shared by the suites: fresh normal data (never zeros), realistic routing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .core import SuiteSkip
from .shapes import Shape


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


def randn(shape, dtype: torch.dtype, device: torch.device, g: torch.Generator, scale: float = 1.0) -> Tensor:
    t = torch.randn(shape, dtype=torch.float32, device=device, generator=g)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def require_moe(shape: Shape, suite: str) -> None:
    if not shape.is_moe:
        raise SuiteSkip(f"{shape.name} is a dense shape; the {suite} suite needs an MoE shape")


def router_logits(shape: Shape, tokens: int, dtype: torch.dtype, device, g) -> Tensor:
    return randn((tokens, shape.num_experts), dtype, device, g)


def router_bias(shape: Shape, device, g) -> Tensor | None:
    if not shape.router_bias:
        return None
    return randn((shape.num_experts,), torch.float32, device, g, 0.1)


def routing(shape: Shape, tokens: int, device, g) -> tuple[Tensor, Tensor]:
    """Routing as the model does it, from random logits: weights [T, k] float32, ids [T, k] int64."""
    logits = router_logits(shape, tokens, torch.float32, device, g)
    return reference.router_topk(
        logits, shape.top_k, bias=router_bias(shape, device, g), **shape.routing_kwargs()
    )


def offsets_from_ids(ids: Tensor, num_experts: int) -> Tensor:
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)[:num_experts]
    return torch.cumsum(counts, 0).to(torch.int64)


def experts_hit(ids: Tensor, num_experts: int) -> int:
    return int((torch.bincount(ids.reshape(-1), minlength=num_experts)[:num_experts] > 0).sum())


def gate_up_weight(shape: Shape, dtype, device, g) -> Tensor:
    """[E, 2I, H] (transformers' layout, transpose_b) or [E, H, 2I], scaled like a trained layer."""
    E, H, I2 = shape.num_experts, shape.hidden, 2 * shape.intermediate
    dims = (E, I2, H) if shape.transpose_b else (E, H, I2)
    return randn(dims, dtype, device, g, 1.0 / math.sqrt(H))


def down_weight(shape: Shape, dtype, device, g) -> Tensor:
    E, H, I = shape.num_experts, shape.hidden, shape.intermediate
    dims = (E, H, I) if shape.transpose_b else (E, I, H)
    return randn(dims, dtype, device, g, 1.0 / math.sqrt(I))


def expert_biases(shape: Shape, dtype, device, g) -> tuple[Tensor | None, Tensor | None]:
    if not shape.expert_bias:
        return None, None
    E, H, I = shape.num_experts, shape.hidden, shape.intermediate
    return randn((E, 2 * I), dtype, device, g, 0.1), randn((E, H), dtype, device, g, 0.1)


def experts_kwargs(shape: Shape) -> dict:
    """The expert path's keyword arguments of ``ms.moe_experts`` (and the reference) for a shape."""
    return {
        "kind": shape.kind,
        "layout": shape.layout,
        "transpose_b": shape.transpose_b,
        "alpha": shape.alpha,
        "limit": shape.limit,
    }


def expert_param_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of one expert's weights (and biases)."""
    H, I = shape.hidden, shape.intermediate
    n = 3 * H * I + ((2 * I + H) if shape.expert_bias else 0)
    return n * itemsize(dtype)
