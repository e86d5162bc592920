"""What the offload planner sees of a model: its unique tensors (tied ones once) with every name and
owner, where each one's values come from, and which modules are the repeated blocks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .planner import ExpertGroupSpec, ModelLayout, TensorSpec


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass
class Piece:
    """Bytes [offset, offset + nbytes) of file ``path`` go to byte ``dst`` of a tensor."""

    path: str
    offset: int
    nbytes: int
    dst: int = 0


@dataclass
class Source:
    """Where a tensor's values come from: an in-memory tensor, or byte ranges of files."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    pieces: list[Piece] | None = None

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


def slice_pieces(pieces: list[Piece], start: int, nbytes: int) -> list[Piece]:
    """The pieces of bytes [start, start + nbytes) of a tensor stored as `pieces`, with their dst
    relative to `start` (one expert of a fused [E, ...] tensor)."""
    out = []
    for p in pieces:
        lo, hi = max(p.dst, start), min(p.dst + p.nbytes, start + nbytes)
        if lo < hi:
            out.append(Piece(p.path, p.offset + (lo - p.dst), hi - lo, lo - start))
    if sum(p.nbytes for p in out) != nbytes:
        raise ValueError(f"moestream.offload: the file pieces do not cover bytes [{start}, {start + nbytes})")
    return out


@dataclass
class Entry:
    """One unique parameter or buffer of the model (tied parameters are one entry)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    is_param: bool
    obj: torch.Tensor
    source: Source | None = None
    persistent: bool = False  # buffers: saved in the state dict


def collect_entries(model: nn.Module) -> tuple[list[Entry], dict[str, Entry]]:
    """Unique parameters and buffers with every (module, attribute) that refers to them."""
    by_id: dict[int, Entry] = {}
    order: list[Entry] = []
    persistent = set(model.state_dict(keep_vars=True).keys())
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                e = by_id.get(id(t))
                if e is None:
                    e = by_id[id(t)] = Entry([], [], is_param, t)
                    order.append(e)
                if not any(m is mod and a == attr for m, a in e.owners):
                    e.owners.append((mod, attr))
                if prefix + attr not in e.names:
                    e.names.append(prefix + attr)
    names = {n: e for e in order for n in e.names}
    for e in order:
        e.persistent = (not e.is_param) and any(n in persistent for n in e.names)
    return order, names


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the nn.ModuleList (of 2+ modules) holding the most parameters.
    For transformers decoders this is ``model.layers`` / ``model.decoder.layers``."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            n = sum(p.numel() for p in mod.parameters())
            if n > 0 and (best is None or n > best[0]):
                best = (n, name, mod)
    if best is None:
        raise ValueError(
            "moestream.offload: found no nn.ModuleList of blocks with parameters in the model; "
            "pass blocks=<the ModuleList or list of modules to stream>"
        )
    return best[1], best[2]


def block_modules(model: nn.Module, blocks: str | Iterable[nn.Module] | None) -> list[nn.Module]:
    if blocks is None:
        mods = list(find_blocks(model)[1])
    elif isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(
                f"moestream.offload: blocks={blocks!r} names no submodule of the model"
            ) from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"moestream.offload: blocks={blocks!r} names a single {type(container).__name__}, not the "
                "nn.ModuleList (or nn.Sequential) of repeated blocks; pass e.g. the name of its parent list, "
                "or a list of modules"
            )
        mods = list(container)
    elif isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"moestream.offload: blocks is a single {type(blocks).__name__}, not a list of blocks; pass the "
            "nn.ModuleList of repeated blocks, or a list of modules"
        )
    else:
        try:
            mods = list(blocks)
        except TypeError:
            raise TypeError(
                f"moestream.offload: blocks must be a module name, an nn.ModuleList or a list of modules, "
                f"got {type(blocks).__name__}"
            ) from None
    if not all(isinstance(m, nn.Module) for m in mods):
        raise TypeError("moestream.offload: blocks must hold nn.Module objects")
    if not mods:
        raise ValueError("moestream.offload: no blocks to stream")
    known = {id(m) for m in model.modules()}
    if any(id(b) not in known for b in mods):
        raise ValueError("moestream.offload: every block must be a submodule of the model")
    return mods


def attach_sources(entries: list[Entry], sources: dict[int, Source]) -> None:
    """Every entry gets a source: the checkpoint's (by id of its tensor) or its own in-memory tensor."""
    for e in entries:
        if id(e.obj) in sources:
            e.source = sources[id(e.obj)]
        elif e.obj.device.type == "meta":
            raise ValueError(
                f"moestream.offload: '{e.names[0]}' has no data (meta tensor) and no source in the checkpoint"
            )
        else:
            e.source = Source(e.obj.dtype, tuple(e.obj.shape), tensor=e.obj.detach())


def layout_of(
    model: nn.Module, entries: list[Entry], blocks: list[nn.Module], experts: Sequence[ExpertModule] = ()
) -> tuple[ModelLayout, dict[str, nn.Module]]:
    """The planner's view of the model (names and sizes only) and the modules by name."""
    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    block_names = [name_of[id(b)] for b in blocks]
    inside = {id(m) for b in blocks for m in b.modules()}
    order = {id(m): i for i, m in enumerate(modules.values())}
    first = min(order[id(b)] for b in blocks)
    leaves_before, leaves_after = [], []
    for name, m in modules.items():
        if id(m) in inside or not m._parameters or any(True for _ in m.children()):
            continue
        (leaves_before if order[id(m)] < first else leaves_after).append(name)
    tensors = []
    from ..quant import PackedWeight

    for i, e in enumerate(entries):
        p = e.source.pieces
        tensors.append(
            TensorSpec(
                key=i,
                names=tuple(e.names),
                nbytes=e.source.nbytes,
                # a compressed weight's packed buffers stream like the parameter they stand for
                is_param=e.is_param or any(isinstance(m, PackedWeight) for m, _ in e.owners),
                file_pos=(p[0].path, p[0].offset) if p else None,
                owners=tuple(dict.fromkeys(name_of[id(m)] for m, _ in e.owners)),
            )
        )
    key_of = {(id(m), a): i for i, e in enumerate(entries) for m, a in e.owners}

    def key(module: nn.Module, attr: str) -> int:  # attr may be dotted: "gate_up_proj.qweight"
        sub, _, a = attr.rpartition(".")
        return key_of[(id(module.get_submodule(sub) if sub else module), a)]

    groups = []
    for x in experts:
        rkeys = ()
        if x.router is not None:
            rkeys = tuple(key_of[(id(x.router), a)] for a, p in x.router._parameters.items() if p is not None)
        groups.append(
            ExpertGroupSpec(
                module=x.name,
                block=x.block,
                keys=tuple(key(x.module, a) for a in x.attrs),
                num_experts=x.num_experts,
                top_k=x.top_k,
                router_keys=rkeys,
            )
        )
    return ModelLayout(tensors, block_names, leaves_before, leaves_after, groups), modules


# ----------------------------------------------------------------------------------------------
# experts: the modules an expert cache can run one expert at a time


@dataclass
class ExpertModule:
    """A fused experts module inside block ``block``: E experts whose weights are the direct
    parameters ``attrs`` of shape [E, ...] (expert e is the slice [e]). It is called as
    ``module(x [T, H], ids [T, k], weights [T, k]) -> [T, H]`` (transformers' experts modules and
    ``ms.nn.GroupedExperts``). ``router`` is the sibling module scoring the E experts (its weight
    is [E, H]), used to predict the experts of this block from an earlier block's hidden state."""

    block: int
    name: str
    module: nn.Module
    attrs: list[str]
    num_experts: int
    top_k: int
    router: nn.Module | None = None
    router_name: str | None = None
    dense: bool = False  # called as module(routed_in [E * T, H]) (transformers' Llama 4)
    quant: bool = False  # moestream.quant.QuantizedGroupedExperts (packed weights)


def _routed_signature(module: nn.Module) -> bool:
    """Whether module.forward takes (x, ids, weights): transformers' Llama 4 experts take only the
    routed inputs of every expert (a dense [E, T, H] product) and cannot run a subset."""
    import inspect

    try:
        params = [
            p
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


# the per-expert parameters the cached expert path computes with (transformers' and ms.nn's names)
EXPERT_ATTRS = frozenset(
    ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
)


def _expert_attrs(module: nn.Module) -> tuple[list[str], int] | None:
    down = module._parameters.get("down_proj")
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
    if down is None or up is None or down.dim() != 3 or up.dim() != 3 or down.shape[0] != up.shape[0]:
        return None
    E = int(down.shape[0])
    attrs = [a for a, p in module._parameters.items() if p is not None and p.dim() >= 2 and p.shape[0] == E]
    return attrs, E


def _top_k(block: nn.Module, experts: nn.Module, model: nn.Module) -> int:
    for m in [block, *block.children()]:
        for a in ("top_k", "num_experts_per_tok"):
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                return v
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    v = getattr(cfg, "num_experts_per_tok", None)
    return v if isinstance(v, int) and v >= 1 else 1


def _router_of(
    block: nn.Module, experts: nn.Module, E: int, dims: set[int]
) -> tuple[str | None, nn.Module | None]:
    for name, m in block.named_children():
        if m is experts:
            continue
        w = m._parameters.get("weight")
        if w is not None and w.dim() == 2 and w.shape[0] == E and w.shape[1] in dims:
            return name, m
    return None, None


def find_expert_modules(model: nn.Module, blocks: list[nn.Module]) -> tuple[list[ExpertModule], list[str]]:
    """The fused experts modules of each block, in block order, and the names of experts modules
    that cannot be run one expert at a time (their forward computes every expert)."""
    from ..quant import QuantizedGroupedExperts

    name_of = {id(m): n for n, m in model.named_modules()}
    found, dense = [], []
    for bi, b in enumerate(blocks):
        for m in b.modules():
            kind = "routed"
            if isinstance(m, QuantizedGroupedExperts):
                # compressed experts: expert e is the slice [e] of every packed buffer (and bias)
                attrs = [
                    f"{w}.{t}"
                    for w in ("gate_up_proj", "down_proj")
                    for t in ("qweight", "scale", "zero")
                    if getattr(getattr(m, w), t, None) is not None
                ] + [a for a in ("gate_up_proj_bias", "down_proj_bias") if getattr(m, a) is not None]
                E, dims, kind = m.num_experts, {m.hidden_size}, "quant"
            else:
                spec = _expert_attrs(m)
                if spec is None:
                    continue
                attrs, E = spec
                routed = _routed_signature(m)
                # a dense module (every expert on every routed input, zeros where a token did not
                # pick the expert) is cached when it has no biases: a zero input row gives a zero row
                dense_ok = (
                    not routed
                    and set(attrs) == {"gate_up_proj", "down_proj"}
                    and callable(getattr(m, "act_fn", None))
                )
                if not (routed or dense_ok) or not set(attrs) <= EXPERT_ATTRS:
                    dense.append(name_of[id(m)])
                    continue
                down = m._parameters["down_proj"]
                dims, kind = {int(down.shape[1]), int(down.shape[2])}, "routed" if routed else "dense"
            parent = next((p for p in b.modules() if any(c is m for c in p.children())), b)
            rname, router = _router_of(parent, m, E, dims)
            found.append(
                ExpertModule(
                    block=bi,
                    name=name_of[id(m)],
                    module=m,
                    attrs=attrs,
                    num_experts=E,
                    top_k=_top_k(parent, m, model),
                    router=router,
                    router_name=None if rname is None else name_of[id(router)],
                    dense=kind == "dense",
                    quant=kind == "quant",
                )
            )
    return found, dense
