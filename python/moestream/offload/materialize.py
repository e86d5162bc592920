"""Carries out an offload plan: writes the offload files (storage "disk" with in-memory weights),
fills and pins the host pool (storage "cpu"), builds the engine from its config, moves the resident
tensors to the device and leaves placeholders in the streamed parameters."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref

import torch
from torch import nn

from .. import _C
from . import safetensors_io as sio
from .model_view import Entry, Piece, Source
from .options import Resolved, fmt_bytes
from .planner import Plan
from .runtime import OffloadState, UnitState


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


class _Files:
    """The engine's file table: each path registered once."""

    def __init__(self, streamer) -> None:
        self.streamer = streamer
        self.index: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        if path not in self.index:
            self.index[path] = self.streamer.add_file(path)
        return self.index[path]

    def segments(self, pieces: list[Piece], name: str, dst: int = 0) -> list:
        """The engine segments reading `pieces` to byte `dst` (+ each piece's own dst) of a slot or tensor."""
        return [_C.Segment(dst + p.dst, p.nbytes, self(p.path), p.offset, name) for p in pieces]


def _placeholder(dtype: torch.dtype, shape, device: torch.device, cache: dict) -> torch.Tensor:
    base = cache.get(dtype)
    if base is None:
        base = cache[dtype] = torch.zeros((), dtype=dtype, device=device)
    return base.expand(*shape) if len(shape) else base


def _set_tensor(e: Entry, value: torch.Tensor) -> None:
    """Gives entry e the tensor `value`, keeping the Parameter object when it has real storage
    (optimisers and tied modules keep working) and replacing meta ones (meta cannot take real data)."""
    if e.is_param:
        if e.obj.device.type == "meta" or e.obj.dtype != value.dtype:
            new = nn.Parameter(value, requires_grad=False)
            for mod, attr in e.owners:
                mod._parameters[attr] = new
            e.obj = new
        else:
            e.obj.data = value
    else:
        for mod, attr in e.owners:
            mod._buffers[attr] = value
        e.obj = value


def _write_unit_files(plan: Plan, entries: list[Entry], opts: Resolved) -> str | None:
    """Storage "disk" with weights in memory: one safetensors file per unit. Returns the temporary
    directory to remove with the model, if one was made."""
    if not any(entries[t.key].source.pieces is None for u in plan.units for t in u.tensors):
        return None
    tmpdir = None
    out = opts.offload_dir
    if out is None:
        out = tmpdir = tempfile.mkdtemp(prefix="moestream-offload-")
    try:
        _write_units(plan, entries, opts, out)
    except BaseException:
        if tmpdir is not None:  # a failed write (disk full) must not leave the directory behind
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return tmpdir


def _write_units(plan: Plan, entries: list[Entry], opts: Resolved, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    bar = progress_bar(plan.streamed_bytes, "moestream: writing offload files", opts.progress)
    for ui, u in enumerate(plan.units):
        path = os.path.join(out, f"unit-{ui:05d}.safetensors")
        sio.write_safetensors(
            path,
            [(t.name, entries[t.key].source.tensor) for t in u.tensors],
            metadata={"format": "moestream-offload", "unit": u.module},
            on_tensor=bar.update if bar is not None else None,
        )
        infos, _ = sio.read_header(path)
        for t in u.tensors:
            src, info = entries[t.key].source, infos[t.name]
            entries[t.key].source = Source(
                src.dtype, src.shape, pieces=[Piece(path, info.offset, info.nbytes, 0)]
            )
    if bar is not None:
        bar.close()
    sio.fsync_dir(out)


def _warn_unpinned(what: str, nbytes: int, error: str) -> None:
    warnings.warn(
        f"moestream.offload: could not page-lock {fmt_bytes(nbytes)} of {what} ({error}); "
        "using pageable memory instead (host-to-device copies will be slower)",
        stacklevel=5,
    )


def materialize(plan: Plan, entries: list[Entry], opts: Resolved) -> OffloadState:
    """Builds the engine and the unit states for `plan`; entries get their device tensors or placeholders."""
    tmpdir = _write_unit_files(plan, entries, opts) if opts.storage == "disk" else None
    try:
        return _materialize(plan, entries, opts, tmpdir)
    except BaseException:
        if tmpdir is not None:  # nothing refers to the offload files of a model that failed to load
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _materialize(plan: Plan, entries: list[Entry], opts: Resolved, tmpdir: str | None) -> OffloadState:
    device = opts.device
    pool = _C.HostPool(plan.host_bytes, opts.pin) if plan.host_bytes else None
    config = _C.StreamerConfig(
        device=opts.engine_device,
        slot_bytes=plan.slot_bytes,
        num_slots=plan.num_slots,
        num_readers=opts.num_readers,
        chunk_bytes=plan.chunk_bytes,
        num_staging=plan.num_staging,
        direct_io=opts.direct_io,
        staging_pin=opts.pin,
    )
    streamer = _C.Streamer(pool, config)
    if opts.pin != _C.PinMode.none and not streamer.staging_pinned:
        _warn_unpinned("staging buffers", plan.staging_bytes, streamer.staging_pin_error)
    files = _Files(streamer)
    state = OffloadState(
        streamer=streamer, pool=pool, device=device, storage=opts.storage, plan=plan, files=[]
    )

    # resident tensors onto the device
    for key in plan.resident:
        e = entries[key]
        src = e.source
        if src.pieces is not None:
            t = torch.empty(src.shape, dtype=src.dtype)
            if src.nbytes:
                streamer.read_into(t, files.segments(src.pieces, e.names[0]))
            _set_tensor(e, t.to(device))
        elif e.obj.device != device:
            _set_tensor(e, e.obj.detach().to(device))

    # streamed tensors into the pool (storage "cpu") or registered as file ranges (storage "disk")
    cache: dict = {}
    bar = progress_bar(plan.host_bytes, "moestream: filling host memory", opts.progress and pool is not None)
    for ui, u in enumerate(plan.units):
        segs, params, specs, holders = [], [], [], []
        for t in u.tensors:
            e = entries[t.key]
            src = e.source
            if opts.storage == "cpu":
                base = u.host_offset + t.offset
                if src.nbytes:
                    dst = pool.view(base, src.nbytes)
                    if src.pieces is not None:
                        streamer.read_into(dst, files.segments(src.pieces, t.name))
                    else:
                        dst.view(src.dtype).view(src.shape).copy_(src.tensor)
                    del dst
                segs.append(_C.Segment(t.offset, src.nbytes, _C.Segment.FROM_POOL, base, t.name))
                if bar is not None:
                    bar.update(src.nbytes)
            else:
                segs.extend(files.segments(src.pieces, t.name, dst=t.offset))
            ph = _placeholder(src.dtype, src.shape, device, cache)
            if e.is_param:
                # inference only: a streamed parameter is a view of a reused slot during its unit's
                # forward, so it must not collect gradients
                e.obj.requires_grad_(False)
            e.source = Source(src.dtype, src.shape, pieces=src.pieces)  # drop the in-memory tensor
            _set_tensor(e, ph)
            params.append(e.obj)
            specs.append((t.offset, src.nbytes, src.dtype, tuple(src.shape)))
            holders.append(ph)
            e.owners = []  # no module references from the state: deleting the model frees everything
        assert streamer.add_unit(segs) == ui
        state.units.append(UnitState(u.module, params, specs, holders, u.nbytes, ahead=list(u.ahead)))
    if bar is not None:
        bar.close()
    # pinned after filling: the source tensors were freed as their bytes moved in
    if pool is not None and opts.pin != _C.PinMode.none and not pool.pin():
        _warn_unpinned("host memory", plan.host_bytes, pool.pin_error)
    state.files = list(files.index)
    if tmpdir is not None:
        state._finalizer = weakref.finalize(state, shutil.rmtree, tmpdir, True)
    return state
