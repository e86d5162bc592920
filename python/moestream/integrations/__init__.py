"""Adapters between other libraries and :mod:`moestream.nn`.

Nothing here imports transformers at import time: :mod:`moestream.integrations.transformers` does,
and it is imported only when :func:`patch_moe` / :func:`unpatch_moe` are called or when transformers'
experts registry (``transformers.integrations.moe``) is loaded, at which point the ``"moestream"``
experts implementation is registered there (see :func:`install_transformers_hook`).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

__all__ = ["install_transformers_hook", "patch_moe", "unpatch_moe"]

_HF_MOE_MODULE = "transformers.integrations.moe"
_HF_MODELING = "transformers.modeling_utils"


def patch_moe(model, *, families=None) -> int:
    """Replace every supported transformers MoE block of ``model`` in place with a
    :class:`moestream.nn.MoE` that shares its parameters; see
    :func:`moestream.integrations.transformers.patch_moe`."""
    from .transformers import patch_moe as _patch

    return _patch(model, families=families)


def unpatch_moe(model) -> int:
    """Put back the original transformers blocks replaced by :func:`patch_moe`; returns how many."""
    from .transformers import unpatch_moe as _unpatch

    return _unpatch(model)


def _register_with_transformers() -> None:
    try:
        from . import transformers as _hf  # noqa: F401  (registers the "moestream" experts function)
    except Exception as e:  # never break the user's transformers import because of us
        warnings.warn(
            f"moestream: could not register the 'moestream' experts implementation: {e!r}", stacklevel=2
        )


def _install_unreached_warning() -> None:
    try:
        from .coverage import install_warning

        install_warning()
    except Exception as e:  # noqa: BLE001 (never break the user's transformers import because of us)
        warnings.warn(f"moestream: could not install the experts-implementation check: {e!r}", stacklevel=2)


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader of a transformers module, then ``callback`` (moestream's registration)."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _TransformersMoeFinder(importlib.abc.MetaPathFinder):
    """A post-import hook: when ``fullname`` (transformers' experts registry, or its
    ``modeling_utils``) is first imported, run ``callback`` (register moestream there). Costs nothing
    until then (importing transformers eagerly would cost seconds)."""

    def __init__(self, fullname: str = _HF_MOE_MODULE, callback=_register_with_transformers):
        self.fullname = fullname
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenRegister(spec.loader, self.callback)
        return spec


def install_transformers_hook() -> None:
    """Make sure the ``"moestream"`` experts implementation is registered with transformers as soon as
    transformers' experts registry exists: now if it is already imported, else when it gets imported;
    likewise the warning for models whose experts "moestream" cannot reach
    (:func:`moestream.integrations.coverage.install_warning`) once ``transformers.modeling_utils``
    exists. Called by ``import moestream``."""
    for module, callback in (
        (_HF_MOE_MODULE, _register_with_transformers),
        (_HF_MODELING, _install_unreached_warning),
    ):
        if module in sys.modules and hasattr(
            sys.modules[module], "PreTrainedModel" if module == _HF_MODELING else "__name__"
        ):
            callback()
        elif not any(isinstance(f, _TransformersMoeFinder) and f.fullname == module for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersMoeFinder(module, callback))
