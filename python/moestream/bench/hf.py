"""transformers' own experts modules as baselines (imported lazily; transformers is optional).

A shape names its transformers model family; the family's ``*Experts`` module is built from a
small config with the shape's sizes, on the meta device (so no memory is allocated for its own
weights), and then given the bench's weight tensors as its parameters (the same storage, no copy).
Its forward is transformers' dispatcher: ``config._experts_implementation`` picks "eager" (the
model's own loop over experts) or "grouped_mm" (``transformers.integrations.moe``).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .shapes import Shape

# family -> (config class, modeling module, experts class, config kwargs from the shape)
_FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeExperts",
        lambda s: {
            "hidden_size": s.hidden,
            "moe_intermediate_size": s.intermediate,
            "num_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
            "norm_topk_prob": s.normalize,
            "hidden_act": "silu",
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralExperts",
        lambda s: {
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_local_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
            "hidden_act": "silu",
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3Experts",
        lambda s: {
            "hidden_size": s.hidden,
            "moe_intermediate_size": s.intermediate,
            "n_routed_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
            "n_group": s.num_groups,
            "topk_group": s.topk_groups,
            "routed_scaling_factor": s.scale,
            "hidden_act": "silu",
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        "transformers.models.gpt_oss.modeling_gpt_oss",
        "GptOssExperts",
        lambda s: {
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_local_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
        },
    ),
}

IMPLEMENTATIONS = ("eager", "grouped_mm")


def unavailable_reason(shape: Shape) -> str | None:
    """Why transformers' experts module cannot serve as a baseline for this shape (None: it can)."""
    if shape.hf_family not in _FAMILIES:
        return f"no transformers experts module for shape {shape.name}"
    try:
        importlib.import_module(_FAMILIES[shape.hf_family][1])
    except ImportError as e:
        return f"transformers is not installed ({e.msg}); pip install 'moestream[transformers]'"
    return None


def _quiet_transformers():
    import transformers

    log = transformers.logging
    prev = log.get_verbosity()
    log.set_verbosity_error()
    return lambda: log.set_verbosity(prev)


def build_experts(
    shape: Shape,
    implementation: str,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    requires_grad: bool = False,
) -> nn.Module:
    """transformers' experts module for ``shape`` using these weights (shared storage).

    Weight layouts must be the family's own: [E, 2I, H] / [E, H, I] (Qwen3-MoE, Mixtral,
    DeepSeek-V3; ``shape.transpose_b``), [E, H, 2I] / [E, I, H] plus biases (GPT-OSS)."""
    import transformers

    cfg_name, mod_name, cls_name, kwargs = _FAMILIES[shape.hf_family]
    restore = _quiet_transformers()
    try:
        config = getattr(transformers, cfg_name)(num_hidden_layers=1, **kwargs(shape))
        if shape.hf_family == "gpt_oss":
            config.swiglu_limit = shape.limit
            config.swiglu_alpha = shape.alpha
        config._experts_implementation = implementation
        cls = getattr(importlib.import_module(mod_name), cls_name)
        with torch.device("meta"):
            module = cls(config)
    finally:
        restore()

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach(), requires_grad=requires_grad)

    expect = {"gate_up_proj": w_gate_up, "down_proj": w_down}
    if b_gate_up is not None:
        expect["gate_up_proj_bias"] = b_gate_up
    if b_down is not None:
        expect["down_proj_bias"] = b_down
    for name, t in expect.items():
        have = getattr(module, name, None)
        if have is None or tuple(have.shape) != tuple(t.shape):
            got = None if have is None else tuple(have.shape)
            raise ValueError(f"{cls_name}.{name} has shape {got}, the bench's weight is {tuple(t.shape)}")
        setattr(module, name, param(t))
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{cls_name} has parameters the bench does not provide: {leftover}")
    if shape.hf_family == "gpt_oss":
        module.alpha, module.limit = shape.alpha, shape.limit
    return module
