"""Weight streaming: run models far larger than device memory (or RAM).

This package is also callable: ``moestream.offload(model, ...)`` is :func:`moestream.offload.api.offload`
(the same function as ``moestream.offload.offload``), so that ``ms.offload(model)`` and
``import moestream.offload`` / ``from moestream.offload import OffloadOptions`` both mean what they say.

- ``offload(model, ...)``: stream the repeated blocks of an in-memory model from host memory or disk;
- ``load_offloaded(checkpoint_dir, ...)``: build the model empty and stream a safetensors checkpoint in place;
- ``save_layered`` / ``load_layered``: a per-block safetensors layout written atomically;
- ``offload_stats(model)``: the counters of a streamed model.

Inside: ``options`` (OffloadOptions, shared by the three entry points) -> ``planner`` (pure: units,
slots, pool layout, staging, what stays resident) -> ``materialize`` (files, host pool, the engine
``moestream._C.Streamer``) -> ``runtime`` (the hooks binding each unit to its slot, the counters).
"""

import inspect as _inspect
import sys as _sys
import types as _types

from .api import offload
from .checkpoint import load_layered, load_offloaded, save_layered
from .model_view import find_blocks
from .options import OffloadOptions, fmt_bytes, parse_bytes
from .planner import Plan, plan_offload
from .runtime import OffloadState, get_state, offload_stats

__all__ = [
    "OffloadOptions",
    "OffloadState",
    "Plan",
    "find_blocks",
    "fmt_bytes",
    "get_state",
    "load_layered",
    "load_offloaded",
    "offload",
    "offload_stats",
    "parse_bytes",
    "plan_offload",
    "save_layered",
]


class _CallableModule(_types.ModuleType):
    """The package's module type: calling it calls :func:`offload`. (Binding the function to the
    name ``moestream.offload`` instead would hide this package behind it for ``import
    moestream.offload as m`` and ``getattr`` lookups.)"""

    # the function itself, not a wrapper: no extra frame, so warnings still point at the caller
    __call__ = staticmethod(offload)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(offload)  # what inspect.signature / help() show for the call
