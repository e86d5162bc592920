"""A streamed model at run time: the engine, the units' parameters and the hooks that bind each
unit's parameters to its slot while the unit's module runs.

Between forwards a streamed parameter holds a placeholder: a one-element tensor on the device expanded
to the parameter's shape (no memory, right dtype/shape/device, so ``model.device``/``model.dtype`` and
shape checks still work). Inside its module's forward it is a view into the slot.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class UnitState:
    name: str
    params: list[nn.Parameter]  # the streamed tensors of the unit, in slot order
    specs: list[tuple[int, int, torch.dtype, tuple[int, ...]]]  # (slot offset, nbytes, dtype, shape) of each
    placeholders: list[torch.Tensor]
    nbytes: int
    ahead: list[int] = field(default_factory=list)
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    acquired: bool = False


class OffloadState:
    """Engine, units and hooks of an offloaded model (``ms.offload_stats(model)`` reads its counters).
    It holds no reference to the modules, so deleting the model frees the pool, the slots and the files."""

    def __init__(self, *, streamer, pool, device: torch.device, storage: str, plan, files: list[str]) -> None:
        self.streamer = streamer
        self.pool = pool
        self.device = device
        self.storage = storage
        self.plan = plan
        self.units: list[UnitState] = []
        self.files = files
        self.handles: list = []
        self.cache = None  # ExpertCache when the experts are cached one by one
        self._cache_modules: list = []
        self._finalizer = None
        self._patched: list[nn.Module] = []  # modules whose _apply / to bind() replaced
        # One forward at a time: the units' parameters and slots are shared by every caller, so
        # forwards from several threads are serialised (held across the model's whole forward, and
        # per unit for callers that run a submodule directly). Reentrant: nested units are fine.
        self._lock = threading.RLock()
        self._entered = (
            threading.local()
        )  # model-level entries of this thread (always_call may run without one)

    # -- hooks --------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args) -> None:
        self._lock.acquire()
        self._entered.depth = getattr(self._entered, "depth", 0) + 1

    def _exit(self, module: nn.Module, args, output) -> None:
        depth = getattr(self._entered, "depth", 0)
        if depth:  # an earlier pre-hook may have raised before _enter ran
            self._entered.depth = depth - 1
            self._lock.release()

    def _kv_cache(self, module: nn.Module, args, kwargs) -> None:
        """transformers' offloaded KV cache (``generate(..., cache_implementation="offloaded")``)
        moves each layer's keys and values to host memory between uses and back on a CUDA side
        stream; its ``update`` calls ``torch.cuda`` unconditionally, so on a CPU model it fails
        ("Torch not compiled with CUDA enabled") although the cache already lives in host memory
        there. On CPU its offloading is turned off: the same cache, the same tokens, nothing to move.
        On CUDA it is left as it is (its side stream and ours are independent)."""
        if self.device.type != "cpu":
            return
        # "cache" since transformers 5.2x, "past_key_values" before
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        for c in (
            cache,
            getattr(cache, "self_attention_cache", None),
            getattr(cache, "cross_attention_cache", None),
        ):
            if getattr(c, "offloading", False) is True:
                c.offloading = False
        return

    def _pre(self, idx: int, module: nn.Module, args) -> None:
        u = self.units[idx]
        self._lock.acquire()
        try:
            slot, s = self.streamer.acquire(idx, u.ahead)
        except BaseException:
            self._lock.release()
            raise
        u.acquired = True
        views = u.views.get(s)
        if views is None:
            # ordinary tensors even under inference_mode: the cached views serve every later call
            with torch.inference_mode(False):
                views = [slot[off : off + n].view(dtype).view(shape) for off, n, dtype, shape in u.specs]
            u.views[s] = views
        for p, v in zip(u.params, views):
            p.data = v

    def _post(self, idx: int, module: nn.Module, args, output):
        u = self.units[idx]
        if not u.acquired:  # the pre-hook failed; nothing to give back
            return None
        try:
            for p, ph in zip(u.params, u.placeholders):
                p.data = ph
            u.acquired = False
            self.streamer.release(idx)
        finally:
            self._lock.release()
        if torch.is_grad_enabled():
            return _refuse_backward(output, u.name)
        return None

    def bind(
        self,
        model: nn.Module,
        unit_modules: list[nn.Module],
        expert_modules: list[nn.Module] = (),
        routers: list[nn.Module | None] = (),
        dense: list[bool] = (),
    ) -> None:
        """Installs the hooks on each unit's module (and the expert cache's forward on each experts
        module) and attaches this state to the model."""
        if self.cache is not None:
            self.cache.bind(list(expert_modules), list(routers), list(dense) or [False] * len(expert_modules))
            self._cache_modules = [weakref.ref(m) for m in expert_modules]
        self.handles.append(model.register_forward_pre_hook(self._enter))
        self.handles.append(model.register_forward_pre_hook(self._kv_cache, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._exit, always_call=True))
        for i, m in enumerate(unit_modules):
            self.handles.append(m.register_forward_pre_hook(functools.partial(self._pre, i)))
            self.handles.append(m.register_forward_hook(functools.partial(self._post, i), always_call=True))
        model._moestream_offload = self
        self._guard(model, unit_modules)

    def _guard(self, model: nn.Module, unit_modules: list[nn.Module]) -> None:
        """Refuses, at the call, what would silently give wrong results: a state dict (the streamed
        parameters hold placeholders, so it would hold zeros), loading one into the placeholders,
        and moving or casting the model (the slots and the files keep the old device and dtype)."""

        def no_state_dict(module, prefix, keep_vars):
            # keep_vars=True asks for the Parameter objects themselves (introspection), not values
            if not keep_vars:
                raise RuntimeError(
                    "moestream: state_dict() of an offloaded model would hold placeholders, not the streamed "
                    "weights; take the state dict before ms.offload, or save the checkpoint it streams from"
                )

        def no_load(module, *args):
            raise RuntimeError(
                "moestream: load_state_dict() into an offloaded model is not supported (its streamed weights "
                "come from the offload storage); load the weights before ms.offload"
            )

        def no_apply(*args, **kwargs):
            raise RuntimeError(
                "moestream: an offloaded model cannot be moved or cast (.to(), .cuda(), .half(), ...): its "
                "streamed weights, slots and files keep the device and dtype they were offloaded with; "
                "move or cast the model before ms.offload"
            )

        def to(*args, **kwargs):
            # .to() to where the model already is (pipelines call model.to(device)) is allowed
            device, dtype, _, fmt = torch._C._nn._parse_to(*args, **kwargs)
            if dtype is None and fmt is None and (device is None or _same_device(device, self.device)):
                return model
            return no_apply()

        for m in unit_modules:
            self.handles.append(m.register_state_dict_pre_hook(no_state_dict))
            self.handles.append(m._register_load_state_dict_pre_hook(no_load))
        for m in [model, *unit_modules]:
            m.__dict__["_apply"] = no_apply  # .to / .cuda / .half / .float ... all go through _apply
        model.__dict__["to"] = to
        self._patched = [model, *unit_modules]

    # -- reports ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = dict(self.streamer.stats())
        p = self.plan
        s.update(
            device=str(self.device),
            storage=self.storage,
            units=len(self.units),
            prefetch=p.prefetch,
            resident_bytes=p.resident_bytes,
            streamed_bytes=p.streamed_bytes,
            read_buffer_bytes=p.ram_extra,
            device_bytes=p.resident_bytes + int(s["num_slots"]) * int(s["slot_bytes"]) + p.ram_extra,
            budget=p.budget,
            experts="cache" if self.cache is not None else "layer",
        )
        if self.cache is not None:
            c = self.cache.stats()
            s["layer_bytes_read"] = s["bytes_read"]
            s["bytes_read"] = s["bytes_read"] + c["expert_bytes_read"]
            s["bytes_loaded"] = s["bytes_loaded"] + c["expert_bytes_loaded"]
            s["wait_seconds"] = s["wait_seconds"] + c["expert_wait_seconds"]
            s["device_bytes"] += p.cache_bytes
            s.update(c)
        return s

    def reset_stats(self) -> None:
        self.streamer.reset_stats()
        if self.cache is not None:
            self.cache.reset()

    def synchronize(self) -> None:
        self.streamer.synchronize()
        if self.cache is not None:
            self.cache.streamer.synchronize()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m in getattr(self, "_patched", []):
            m.__dict__.pop("_apply", None)
            m.__dict__.pop("to", None)
        self._patched = []
        if self.cache is not None:
            self.cache.unbind([r() for r in self._cache_modules])
            self._cache_modules = []


def _same_device(a: torch.device, b: torch.device) -> bool:
    a = torch.device(a)
    if a.type == "cuda" and a.index is None:
        a = torch.device("cuda", torch.cuda.current_device())
    return a == b


class _NoBackward(torch.autograd.Function):
    """Identity whose backward raises: a streamed unit's saved tensors are views into a slot that
    later units overwrite, and its parameters are not trained, so gradients through it would be
    silently wrong (input gradients) or missing (weights)."""

    @staticmethod
    def forward(ctx, name: str, x: torch.Tensor) -> torch.Tensor:
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"moestream: backward through the streamed block '{ctx.name}' of an offloaded model is not "
            "supported: offloaded models are inference-only (run them under torch.no_grad() or "
            "torch.inference_mode(); train before offloading)"
        )


def _refuse_backward(output, name: str):
    """`output` with every tensor that requires grad passed through _NoBackward (None if none does)."""
    from torch.utils._pytree import tree_map_only

    found = False

    def wrap(t: torch.Tensor) -> torch.Tensor:
        nonlocal found
        if not t.requires_grad:
            return t
        found = True
        return _NoBackward.apply(name, t)

    out = tree_map_only(torch.Tensor, wrap, output)
    return out if found else None


def get_state(model: nn.Module) -> OffloadState:
    """The streaming state bound to an offloaded model (units, streamer); raises if it is not offloaded."""
    st = getattr(model, "_moestream_offload", None)
    if st is None:
        raise ValueError("moestream: this model is not offloaded (use ms.offload or ms.load_offloaded first)")
    return st


def offload_stats(model: nn.Module) -> dict:
    """Counters of an offloaded model: bytes read from storage (``bytes_read``) and loaded into slots
    (``bytes_loaded``), ``acquires`` and slot ``hits``, ``wait_seconds``, the slot ring
    (``num_slots`` x ``slot_bytes``), the memory it takes on the device (``device_bytes``) and the budget."""
    return get_state(model).stats()
