"""Hugging Face transformers glue for streaming checkpoints in place (imported lazily by
moestream.offload, which does not need transformers).

- ``empty_model``: the model built from its config with parameters on the meta device (no memory).
- ``resolve_conversions``: maps checkpoint tensors whose names differ from the model's through the
  renamings and weight conversions transformers itself applies when loading (transformers 5 fuses
  per-expert MoE weights into 3-D tensors: ``experts.{e}.gate_proj`` + ``experts.{e}.up_proj`` ->
  ``experts.gate_up_proj``). Stacking and concatenation are byte placements, so those tensors are
  still streamed straight from the original files, no conversion pass needed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..offload.model_view import Piece, Source
from ..offload.safetensors_io import TensorInfo


def empty_model(checkpoint_dir: str, model_cls=None, trust_remote_code: bool = False) -> nn.Module:
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - the [transformers] extra is missing
        raise ImportError(
            "moestream.load_offloaded: building the model from its config needs transformers and accelerate "
            "(pip install 'moestream[transformers]'), or pass model=<a module skeleton>"
        ) from e
    if not os.path.exists(os.path.join(checkpoint_dir, "config.json")):
        raise FileNotFoundError(
            f"moestream.load_offloaded: '{checkpoint_dir}' has no config.json to build the model from; "
            "pass model=<a module skeleton> (e.g. built under torch.device('meta'))"
        )
    config = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code)
    cls = model_cls or AutoModelForCausalLM
    # Parameters on meta (no memory); buffers real, so computed ones (rotary inv_freq) are correct.
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    # init_empty_weights re-creates parameters as they are registered, which unties tied ones
    # (lm_head / embed_tokens): tie them again so they are one tensor, stored and loaded once.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(checkpoint_dir)
    except (OSError, ValueError):  # no generation_config.json: keep the one derived from the config
        pass
    model.eval()
    return model


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _direct(info: TensorInfo) -> Source:
    return Source(info.dtype, info.shape, pieces=[Piece(info.path, info.offset, info.nbytes, 0)])


def _place(target: str, conv, by_pattern: dict[str, list[TensorInfo]]) -> Source:
    """Byte placement of the tensors merged by `conv` (MergeModulelist(dim=0), then optionally
    Concatenate(dim=d)) into `target`."""
    ops = list(conv.operations)
    kinds = [type(op).__name__ for op in ops]
    patterns = [p for p in conv.source_patterns if p in by_pattern]
    supported = (
        kinds
        and kinds[0] == "MergeModulelist"
        and getattr(ops[0], "dim", 0) == 0
        and (
            kinds == ["MergeModulelist"] and len(patterns) == 1 or kinds == ["MergeModulelist", "Concatenate"]
        )
    )
    if not supported:
        keys = [i.name for p in patterns for i in by_pattern[p]][:3]
        raise NotImplementedError(
            f"moestream.load_offloaded: checkpoint tensors {keys}... become '{target}' through {kinds}, which is "
            "not a plain byte placement; load the model once and write it with ms.save_layered(model, dir)"
        )
    stacks = []
    for p in patterns:
        infos = sorted(by_pattern[p], key=lambda i: _natural_key(i.name))
        first = infos[0]
        for i in infos:
            if i.shape != first.shape or i.dtype != first.dtype:
                raise ValueError(
                    f"moestream.load_offloaded: '{i.name}' is {i.dtype} {list(i.shape)} but '{first.name}' is "
                    f"{first.dtype} {list(first.shape)}; they cannot be stacked into '{target}'"
                )
        stacks.append(infos)
    dtype = stacks[0][0].dtype
    if any(s[0].dtype != dtype for s in stacks):
        raise ValueError(
            f"moestream.load_offloaded: the tensors merged into '{target}' have different dtypes"
        )
    es = torch.empty((), dtype=dtype).element_size()
    shapes = [(len(s),) + s[0].shape for s in stacks]
    if len(kinds) == 1:
        infos = stacks[0]
        nb = infos[0].nbytes
        pieces = [Piece(i.path, i.offset, i.nbytes, k * nb) for k, i in enumerate(infos)]
        return Source(dtype, shapes[0], pieces=pieces)
    nd = len(shapes[0])
    d = ops[1].dim + nd if ops[1].dim < 0 else ops[1].dim
    for s in shapes:
        if len(s) != nd or any(s[j] != shapes[0][j] for j in range(nd) if j != d):
            raise ValueError(
                f"moestream.load_offloaded: cannot concatenate stacks of shapes {shapes} along dim {d} into '{target}'"
            )
    out_shape = list(shapes[0])
    out_shape[d] = sum(s[d] for s in shapes)
    outer = math.prod(out_shape[:d])
    inner = [math.prod(s[d:]) for s in shapes]  # elements of each stack per outer index
    row = sum(inner)
    pieces: list[Piece] = []
    for o in range(outer):
        col = 0
        for infos, inn in zip(stacks, inner):
            n_each = math.prod(infos[0].shape)
            pos, left = o * inn, inn
            while left > 0:
                e, w = divmod(pos, n_each)
                take = min(left, n_each - w)
                pieces.append(
                    Piece(
                        infos[e].path,
                        infos[e].offset + w * es,
                        take * es,
                        (o * row + col + pos - o * inn) * es,
                    )
                )
                pos += take
                left -= take
            col += inn
    return Source(dtype, tuple(out_shape), pieces=pieces)


def resolve_conversions(
    model: nn.Module, ckpt: dict[str, TensorInfo], target_names: Iterable[str]
) -> dict[str, Source]:
    """Sources for model tensors reached from checkpoint names through transformers' renamings,
    base-model prefix changes and (stack / concatenate) weight conversions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {}
    targets = set(target_names)
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers cannot map: names are matched directly
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = dict.fromkeys(targets, True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, Source] = {}
    groups: dict[str, tuple[object, dict[str, list[TensorInfo]]]] = {}
    for key, info in ckpt.items():
        try:
            new, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        except (TypeError, AttributeError):  # another transformers 5.x signature: direct names only
            return out
        if pattern is None:
            if new in targets and new not in out:
                out[new] = _direct(info)
            continue
        conv = next((c for c in converters if pattern in c.source_patterns), None)
        if conv is None:
            continue
        _, by_pattern = groups.setdefault(new, (conv, {}))
        by_pattern.setdefault(pattern, []).append(info)
    for target, (conv, by_pattern) in groups.items():
        if target in targets:
            out[target] = _place(target, conv, by_pattern)
    return out
