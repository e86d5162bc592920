"""moestream: fast MoE kernels (forward and backward) and asynchronous weight streaming for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # registers torch.ops.moestream.*
    distributed,
    nn,
    offload,  # the package; calling it is offload.offload (streams a model)
    ops,
    quant,
    reference,
)
from .distributed import parallelize_experts
from .integrations import install_transformers_hook as _install_transformers_hook
from .integrations import patch_moe, unpatch_moe
from .offload import load_layered, load_offloaded, offload_stats, save_layered
from .ops import (
    gated_activation,
    grouped_mm,
    moe_experts,
    permute,
    router_aux_loss,
    router_topk,
    router_z_loss,
    unpermute,
)
from .quant import quantize_model

__version__ = "0.1.0"

with_cuda: bool = bool(_C.with_cuda)

# registers the "moestream" experts implementation with transformers once (and if) it is imported
_install_transformers_hook()

__all__ = [
    "distributed",
    "gated_activation",
    "grouped_mm",
    "load_layered",
    "load_offloaded",
    "moe_experts",
    "nn",
    "offload",
    "offload_stats",
    "ops",
    "parallelize_experts",
    "patch_moe",
    "permute",
    "quant",
    "quantize_model",
    "reference",
    "router_aux_loss",
    "router_topk",
    "router_z_loss",
    "save_layered",
    "unpatch_moe",
    "unpermute",
    "with_cuda",
]
