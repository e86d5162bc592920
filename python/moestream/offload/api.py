"""``ms.offload``: stream an in-memory model's repeated blocks, and the plan -> materialise -> bind
sequence that ``load_offloaded`` shares."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .materialize import materialize
from .model_view import Source, attach_sources, block_modules, collect_entries, find_expert_modules, layout_of
from .options import ByteSize, OffloadOptions
from .planner import plan_offload
from .runtime import OffloadState


def install(
    model: nn.Module, options: OffloadOptions, sources: dict[int, Source] | None = None, entries=None
) -> OffloadState:
    """Makes `model` run with its blocks streamed. `sources` maps id(tensor) to where its values are
    (file byte ranges of a checkpoint); tensors without one keep their current values."""
    opts = options.resolve()
    if getattr(model, "_moestream_offload", None) is not None:
        raise RuntimeError("moestream.offload: this model is already offloaded")
    # Slots, placeholders and parameters must be ordinary tensors even when called under
    # inference_mode, or a later forward outside it could not use them.
    with torch.inference_mode(False), torch.no_grad():
        if entries is None:
            if opts.compress is not None:
                from ..quant import quantize_model

                # the blocks' linears and experts become packed tensors, which stream as plain bytes
                quantize_model(model, opts.compress, blocks=opts.blocks)
            entries, _ = collect_entries(model)
        attach_sources(entries, sources or {})
        blocks = block_modules(model, opts.blocks)
        xmods, dense = ([], []) if opts.experts == "layer" else find_expert_modules(model, blocks)
        if dense and opts.experts == "cache" or (dense and not xmods and opts.experts is None):
            warnings.warn(
                f"moestream.offload: the experts of {dense[0]}"
                + (f" (and {len(dense) - 1} more)" if len(dense) > 1 else "")
                + " compute every expert in one dense product, so they are streamed with their layer; "
                "apply ms.patch_moe(model) first to cache them one expert at a time",
                stacklevel=3,
            )
        layout, modules = layout_of(model, entries, blocks, xmods)
        plan = plan_offload(layout, opts)  # raises before anything is changed
        for w in plan.warnings:
            warnings.warn(w, stacklevel=3)
        state = materialize(plan, entries, opts)
        cached = [] if plan.experts is None else xmods
        state.bind(
            model,
            [modules[u.module] for u in plan.units],
            [x.module for x in cached],
            [x.router for x in cached],
            [x.dense for x in cached],
        )
    return state


def offload(
    model: nn.Module,
    device: str | torch.device | None = None,
    max_device_memory: ByteSize = None,
    storage: str = "cpu",
    offload_dir: str | None = None,
    prefetch: int = 2,
    *,
    blocks: str | Iterable[nn.Module] | None = None,
    num_readers: int = 4,
    chunk_bytes: int | None = None,
    pin: bool | None = None,
    direct_io: bool | None = None,
    progress: bool = False,
    experts: str | None = None,
    cache_policy: str = "lru",
    expert_prefetch: bool = True,
    expert_slots: int | None = None,
    cpu_experts: bool = False,
    compress: str | None = None,
) -> nn.Module:
    """Streams the model's repeated blocks to `device` just ahead of use; returns the model.

    device: "cuda[:N]" or "cpu" (default: the current CUDA device if any). On CPU the slots are RAM
    and storage="disk" runs models larger than RAM.
    max_device_memory: budget for the weights on the device (resident weights + slots), e.g. "4GiB";
    None: everything but the blocks resident and prefetch + 1 slots. Activations and the KV cache
    come on top. A budget below one layer plus the resident weights raises ValueError with the need.
    storage: "cpu" (weights in page-locked host memory, one copy per layer) or "disk" (safetensors
    files in offload_dir, a temporary directory if None, read with pread by reader threads).
    prefetch: layers loaded ahead of the one computing (slots = prefetch + 1).
    blocks: the nn.ModuleList (or its name, or a list of modules) to stream; found automatically.
    num_readers, chunk_bytes: reader threads and the size of each read and copy.
    pin: page-lock the host memory (default: on CUDA). direct_io: O_DIRECT reads (default: storage "disk").
    experts: "cache" (the default for blocks with fused experts modules) streams each expert on its
    own into a device-side expert cache: only the experts the router selected and that are not cached
    are read; "layer" streams each layer with all its experts. cache_policy: "lru" or "lfu" eviction.
    expert_prefetch: predict the next layer's experts (its router applied to the current hidden
    state) and load them ahead. expert_slots: the cache size in experts (default: what the budget
    leaves after the resident weights and the layer slots; without a budget, one layer's experts per
    layer slot). ``ms.offload_stats`` reports ``expert_hits``, ``expert_misses``, ``expert_hit_rate``
    and the prediction's ``prefetch_precision`` / ``prefetch_recall``.
    compress: None, "int8" or "int4" (group 64, symmetric) or a ``moestream.quant.QuantScheme``: the
    blocks' linear layers and experts are quantized in place first (``moestream.quant.quantize_model``;
    embeddings, norms, routers and the head are kept), so 1.9x / 3.6x fewer bytes are streamed.
    Forwards of one offloaded model from several threads run one at a time (the streamed weights
    and slots are shared). Inference only: streamed parameters are views into reused slots during their block's forward;
    they are set to requires_grad=False. Do not call ``model.to()`` after offloading.
    """
    opts = OffloadOptions(**{k: v for k, v in locals().items() if k != "model"})  # every other argument
    install(model, opts)
    return model
