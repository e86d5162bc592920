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
from .expert_cache import ExpertCache, ExpertGroupState
from .model_view import Entry, Piece, Source, slice_pieces
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


def _file_groups(plan: Plan) -> list[tuple[str, str, list[tuple[int, str]]]]:
    """(file stem, unit name, [(key, tensor name)]) of each offload file: one per unit, one per
    experts module (its fused [E, ...] tensors, read one expert at a time)."""
    out = [
        (f"unit-{ui:05d}", u.module, [(t.key, t.name) for t in u.tensors]) for ui, u in enumerate(plan.units)
    ]
    if plan.experts is not None:
        for gi, g in enumerate(plan.experts.groups):
            out.append((f"experts-{gi:05d}", g.module, [(t.key, t.name) for t in g.tensors]))
    return out


def _write_unit_files(plan: Plan, entries: list[Entry], opts: Resolved) -> str | None:
    """Storage "disk" with weights in memory: one safetensors file per unit (and per experts
    module). Returns the temporary directory to remove with the model, if one was made."""
    groups = _file_groups(plan)
    if not any(entries[k].source.pieces is None for _, _, ts in groups for k, _ in ts):
        return None
    tmpdir = None
    out = opts.offload_dir
    if out is None:
        out = tmpdir = tempfile.mkdtemp(prefix="moestream-offload-")
    try:
        _write_units(plan, groups, entries, opts, out)
    except BaseException:
        if tmpdir is not None:  # a failed write (disk full) must not leave the directory behind
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return tmpdir


def _write_units(plan: Plan, groups: list, entries: list[Entry], opts: Resolved, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    bar = progress_bar(plan.streamed_bytes, "moestream: writing offload files", opts.progress)
    for stem, module, ts in groups:
        ts = [
            (k, name) for k, name in ts if entries[k].source.pieces is None
        ]  # file-backed ones stay where they are
        if not ts:
            continue
        path = os.path.join(out, f"{stem}.safetensors")
        sio.write_safetensors(
            path,
            [(name, entries[k].source.tensor) for k, name in ts],
            metadata={"format": "moestream-offload", "unit": module},
            on_tensor=bar.update if bar is not None else None,
        )
        infos, _ = sio.read_header(path)
        for k, name in ts:
            src, info = entries[k].source, infos[name]
            entries[k].source = Source(
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


def _streamer(plan: Plan, opts: Resolved, pool, slot_bytes: int, num_slots: int, **extra):
    """A Streamer of `num_slots` slots of `slot_bytes` with the plan's readers and staging."""
    config = _C.StreamerConfig(
        device=opts.engine_device,
        slot_bytes=slot_bytes,
        num_slots=num_slots,
        num_readers=opts.num_readers,
        chunk_bytes=plan.chunk_bytes,
        num_staging=plan.num_staging,
        direct_io=opts.direct_io,
        staging_pin=opts.pin,
        **extra,
    )
    return _C.Streamer(pool, config)


def _expert_cache(
    plan: Plan, entries: list[Entry], opts: Resolved, pool, placeholders: dict, bar_enabled: bool
):
    """The expert streamer (one expert per slot, slots contiguous) with one unit per expert, and the
    experts' parameters turned into placeholders."""
    ep = plan.experts
    streamer = _streamer(
        plan, opts, pool, ep.slot_bytes, ep.num_slots, contiguous_slots=True, eviction=opts.eviction
    )
    files = _Files(streamer)
    cache = ExpertCache(streamer, prefetch=opts.expert_prefetch, gather=opts.device.type == "cuda")
    bar = progress_bar(
        ep.expert_bytes, "moestream: filling host memory (experts)", bar_enabled and pool is not None
    )
    for g in ep.groups:
        specs, params = {}, []
        for i, t in enumerate(g.tensors):
            e = entries[t.key]
            src = e.source
            if opts.storage == "cpu" and src.nbytes:
                dst = pool.view(g.host_offsets[i], src.nbytes)
                if src.pieces is not None:
                    streamer.read_into(dst, files.segments(src.pieces, t.name))
                else:
                    dst.view(src.dtype).view(src.shape).copy_(src.tensor)
                del dst
                if bar is not None:
                    bar.update(src.nbytes)
            name = e.names[0]
            attr = name[len(g.module) + 1 :] if name.startswith(g.module + ".") else name.rsplit(".", 1)[-1]
            specs[attr] = (t.offset, src.dtype, tuple(src.shape[1:]))  # "down_proj", "down_proj.qweight"
        for x in range(g.num_experts):
            segs = []
            for i, t in enumerate(g.tensors):
                src = entries[t.key].source
                name = f"{t.name}[{x}]"
                if opts.storage == "cpu":
                    segs.append(
                        _C.Segment(
                            t.offset, t.nbytes, _C.Segment.FROM_POOL, g.host_offsets[i] + x * t.nbytes, name
                        )
                    )
                else:
                    segs.extend(
                        files.segments(slice_pieces(src.pieces, x * t.nbytes, t.nbytes), name, dst=t.offset)
                    )
            assert streamer.add_unit(segs) == g.first_unit + x
        for t in g.tensors:
            e = entries[t.key]
            src = e.source
            e.obj.requires_grad_(False) if e.is_param else None
            e.source = Source(src.dtype, src.shape, pieces=src.pieces)  # drop the in-memory tensor
            _set_tensor(e, _placeholder(src.dtype, src.shape, opts.device, placeholders))
            params.append(e.obj)
            e.owners = []
        cache.groups.append(ExpertGroupState(g.module, g.first_unit, g.num_experts, g.top_k, specs, params))
    if bar is not None:
        bar.close()
    cache_files = list(files.index)
    return cache, cache_files


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
    streamer = _streamer(plan, opts, pool, plan.slot_bytes, plan.num_slots)
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
    state.files = list(files.index)
    if plan.experts is not None:
        state.cache, cache_files = _expert_cache(plan, entries, opts, pool, cache, bar_enabled=opts.progress)
        state.files += [f for f in cache_files if f not in state.files]
    # pinned after filling: the source tensors were freed as their bytes moved in
    if pool is not None and opts.pin != _C.PinMode.none and not pool.pin():
        _warn_unpinned("host memory", plan.host_bytes, pool.pin_error)
    if tmpdir is not None:
        state._finalizer = weakref.finalize(state, shutil.rmtree, tmpdir, True)
    return state
