"""Residency of a streamed model: which weights stay on the device, which are streamed, and the hooks
that bind each block's parameters to its slot while the block runs.

A *unit* is what one slot holds: one repeated block (a decoder layer; for MoE models the whole layer
with all its experts), or, when the budget is too small to keep them resident, a large module outside
the blocks (embedding, lm_head). Units run in a fixed cyclic order; before unit i runs, units
i+1 .. i+prefetch (wrapping around to the next forward) are already being loaded.

Between forwards a streamed parameter holds a placeholder: a one-element tensor on the device expanded
to the parameter's shape (no memory, right dtype/shape/device, so ``model.device``/``model.dtype`` and
shape checks still work). Inside its block's forward it is a view into the slot.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _C
from . import safetensors_io as sio

# Byte alignment of every tensor in a slot (what cudaMalloc gives; vectorised kernels want 16).
ALIGN = 256
_PAGE = 4096

ByteSize = int | float | str | None

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_bytes(value: ByteSize, what: str = "max_device_memory") -> int | None:
    """``4_000_000_000``, ``"4GiB"``, ``"300MB"``, ``"1.5 GB"`` -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"moestream: {what} must be a number of bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"moestream: {what} must look like '4GiB', '300MB' or '1.5 GB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"moestream: {what} must be a number of bytes or a string like '4GiB', got {value!r}")
    if n <= 0:
        raise ValueError(f"moestream: {what} must be positive, got {value!r}")
    return n


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def default_device() -> torch.device:
    from .. import with_cuda

    if with_cuda and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def normalize_device(device) -> torch.device:
    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda":
        from .. import with_cuda

        if not with_cuda:
            raise RuntimeError(
                "moestream.offload: device 'cuda' needs moestream built with CUDA; this build has none"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("moestream.offload: device 'cuda' requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"moestream.offload: device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def _engine_device(dev: torch.device) -> str:
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index}"


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


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


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
        return _nbytes(self.shape, self.dtype)


@dataclass
class _Entry:
    """One unique parameter or buffer of the model (tied parameters are one entry)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    is_param: bool
    obj: torch.Tensor
    source: Source | None = None
    unit: int = -1  # -1: resident
    offset: int = 0  # byte offset in the slot
    placeholder: torch.Tensor | None = None
    persistent: bool = False  # buffers: saved in the state dict


@dataclass
class _Unit:
    name: str
    entries: list[_Entry]
    nbytes: int = 0
    params: list[nn.Parameter] = field(default_factory=list)
    placeholders: list[torch.Tensor] = field(default_factory=list)
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    ahead: list[int] = field(default_factory=list)
    acquired: bool = False


def collect_entries(model: nn.Module) -> tuple[list[_Entry], dict[str, _Entry]]:
    """Unique parameters and buffers with every (module, attribute) that refers to them."""
    by_id: dict[int, _Entry] = {}
    order: list[_Entry] = []
    persistent = set(model.state_dict(keep_vars=True).keys())
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is None:
                continue
            e = by_id.get(id(p))
            if e is None:
                e = by_id[id(p)] = _Entry([], [], True, p)
                order.append(e)
            if (mod, attr) not in [(m, a) for m, a in e.owners]:
                e.owners.append((mod, attr))
            if prefix + attr not in e.names:
                e.names.append(prefix + attr)
        for attr, b in mod._buffers.items():
            if b is None:
                continue
            e = by_id.get(id(b))
            if e is None:
                e = by_id[id(b)] = _Entry([], [], False, b)
                order.append(e)
            if (mod, attr) not in [(m, a) for m, a in e.owners]:
                e.owners.append((mod, attr))
            if prefix + attr not in e.names:
                e.names.append(prefix + attr)
    names = {n: e for e in order for n in e.names}
    for e in order:
        e.persistent = (not e.is_param) and any(n in persistent for n in e.names)
    return order, names


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class OffloadState:
    """Engine, units and hooks of an offloaded model (``model._moestream_offload``). It holds no
    reference to the modules, so deleting the model frees the pool, the slots and the files."""

    def __init__(self) -> None:
        self.units: list[_Unit] = []
        self.streamer = None
        self.pool = None
        self.device = torch.device("cpu")
        self.storage = "cpu"
        self.prefetch = 0
        self.resident_bytes = 0
        self.budget: int | None = None
        self.ram_extra = 0  # CPU: bounce buffers, part of the RAM budget
        self.files: list[str] = []
        self.handles: list = []
        self._finalizer = None

    # -- hooks --------------------------------------------------------------------------------------
    def _pre(self, idx: int, module: nn.Module, args) -> None:
        u = self.units[idx]
        slot, s = self.streamer.acquire(idx, u.ahead)
        u.acquired = True
        views = u.views.get(s)
        if views is None:
            # ordinary tensors even under inference_mode: the cached views serve every later call
            with torch.inference_mode(False):
                views = [
                    slot[e.offset : e.offset + e.source.nbytes].view(e.source.dtype).view(e.source.shape)
                    for e in u.entries
                ]
            u.views[s] = views
        for p, v in zip(u.params, views):
            p.data = v

    def _post(self, idx: int, module: nn.Module, args, output) -> None:
        u = self.units[idx]
        if not u.acquired:  # the pre-hook failed; nothing to give back
            return
        for p, ph in zip(u.params, u.placeholders):
            p.data = ph
        u.acquired = False
        self.streamer.release(idx)

    # -- reports ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = dict(self.streamer.stats())
        s.update(
            device=str(self.device),
            storage=self.storage,
            units=len(self.units),
            prefetch=self.prefetch,
            resident_bytes=self.resident_bytes,
            streamed_bytes=sum(u.nbytes for u in self.units),
            read_buffer_bytes=self.ram_extra,
            device_bytes=self.resident_bytes + int(s["num_slots"]) * int(s["slot_bytes"]) + self.ram_extra,
            budget=self.budget,
        )
        return s

    def synchronize(self) -> None:
        self.streamer.synchronize()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _placeholder(dtype: torch.dtype, shape: Sequence[int], device: torch.device, cache: dict) -> torch.Tensor:
    base = cache.get(dtype)
    if base is None:
        base = cache[dtype] = torch.zeros((), dtype=dtype, device=device)
    return base.expand(*shape) if len(shape) else base


def _set_tensor(e: _Entry, value: torch.Tensor) -> None:
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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def install(*args, **kwargs) -> OffloadState:
    # Slots, placeholders and parameters must be ordinary tensors even when called under
    # inference_mode, or a later forward outside it could not use them.
    with torch.inference_mode(False), torch.no_grad():
        return _install(*args, **kwargs)


def _install(
    model: nn.Module,
    sources: dict[int, Source],
    *,
    device: torch.device,
    max_device_memory: ByteSize,
    storage: str,
    offload_dir: str | None,
    prefetch: int,
    blocks=None,
    num_readers: int = 4,
    chunk_bytes: int | None = None,
    pin: bool | None = None,
    direct_io: bool | None = None,
    progress: bool = False,
    entries: list[_Entry] | None = None,
) -> OffloadState:
    """Makes `model` run with its blocks streamed. `sources` maps id(entry.obj) to where the values
    are (tensor in memory or file byte ranges); entries without a source keep their current tensor."""
    if storage not in ("cpu", "disk"):
        raise ValueError(f"moestream.offload: storage must be 'cpu' or 'disk', got {storage!r}")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"moestream.offload: prefetch must be an int >= 0, got {prefetch!r}")
    if getattr(model, "_moestream_offload", None) is not None:
        raise RuntimeError("moestream.offload: this model is already offloaded")
    budget = parse_bytes(max_device_memory)
    # O_DIRECT for disk storage: measured cold reads 2-7 GB/s direct vs 0.5-1.8 GB/s through the
    # page cache on the CI VM (the cache also thrashes when the model is larger than RAM).
    direct_io = storage == "disk" if direct_io is None else bool(direct_io)
    if chunk_bytes is None:
        # CUDA: large transfers amortise the per-copy cost; CPU: smaller reads kept more readers busy
        # (4 MiB read cold at 2-7 GB/s with 4 threads vs 2.3-2.7 GB/s in 16 MiB pieces on the CI VM).
        chunk_bytes = (16 << 20) if device.type == "cuda" else (4 << 20)
    chunk_bytes = max(_PAGE, _round_up(int(chunk_bytes), _PAGE))
    need_staging = storage == "disk" and (device.type == "cuda" or direct_io)
    # CUDA: enough buffers to keep every reader busy while earlier chunks cross the link. CPU: only
    # reads that are not block aligned use them (bounce buffers), and they come out of the RAM budget.
    num_staging = (
        (max(4, 2 * num_readers) if device.type == "cuda" else num_readers + 1) if need_staging else 0
    )
    # On CPU the "device" is RAM: the bounce buffers count against the budget like the slots.
    ram_extra = _C.stream_staging_bytes(chunk_bytes, num_staging) if device.type == "cpu" else 0
    if entries is None:
        entries, _ = collect_entries(model)
    for e in entries:
        if id(e.obj) in sources:
            e.source = sources[id(e.obj)]
        elif e.obj.device.type == "meta":
            raise ValueError(
                f"moestream.offload: '{e.names[0]}' has no data (meta tensor) and no source in the checkpoint"
            )
        else:
            e.source = Source(e.obj.dtype, tuple(e.obj.shape), tensor=e.obj.detach())

    # ---- units: the blocks, in order
    if blocks is None:
        _, block_list = find_blocks(model)
        block_mods = list(block_list)
    elif isinstance(blocks, str):
        block_mods = list(model.get_submodule(blocks))
    else:
        block_mods = list(blocks)
    if not block_mods:
        raise ValueError("moestream.offload: no blocks to stream")
    names = _module_names(model)
    for b in block_mods:
        if id(b) not in names:
            raise ValueError("moestream.offload: every block must be a submodule of the model")

    def owner_unit(e: _Entry, prefixes: dict[str, int]) -> int:
        """The unit holding every reference to e, or -1 (shared with outside, or outside)."""
        found = None
        for name in e.names:
            parts = name.split(".")
            hit = -1
            for k in range(1, len(parts)):
                ui = prefixes.get(".".join(parts[:k]))
                if ui is not None:
                    hit = ui
                    break
            if hit < 0 or (found is not None and found != hit):
                return -1
            found = hit
        return -1 if found is None else found

    params = [e for e in entries if e.is_param]
    unit_mods: list[nn.Module] = list(block_mods)
    prefixes = {names[id(m)]: ui for ui, m in enumerate(unit_mods)}
    for e in params:
        e.unit = owner_unit(e, prefixes)

    def unit_sizes(ents: list[_Entry], n: int) -> list[int]:
        sizes = [0] * n
        for e in ents:
            if e.unit >= 0:
                sizes[e.unit] = _round_up(sizes[e.unit], ALIGN) + e.source.nbytes
        return [_round_up(s, ALIGN) for s in sizes]

    sizes = unit_sizes(params, len(unit_mods))
    resident = sum(e.source.nbytes for e in entries if not (e.is_param and e.unit >= 0))
    slot_need = _round_up(max(sizes), _PAGE)
    if slot_need == 0:
        raise ValueError("moestream.offload: the blocks have no parameters to stream")

    if budget is not None and resident + ram_extra + slot_need > budget:
        # Too small to keep everything else resident: stream the largest leaf modules outside the
        # blocks (embedding, lm_head) as units of their own, in module order around the blocks.
        block_ids = {id(m) for b in block_mods for m in b.modules()}
        order_index = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        first_block = min(order_index[id(b)] for b in block_mods)
        cands = []
        for m in model.modules():
            if id(m) in block_ids or not m._parameters or any(True for _ in m.children()):
                continue
            own = [e for e in params if e.unit < 0 and any(o[0] is m for o in e.owners)]
            if own and all(all(o[0] is m for o in e.owners) for e in own):
                cands.append((sum(e.source.nbytes for e in own), m, own))
        cands.sort(key=lambda c: -c[0])
        best_need = resident + ram_extra + slot_need
        chosen = []
        res, slot = resident + ram_extra, slot_need
        for nbytes, m, own in cands:
            if res + slot <= budget:
                break
            chosen.append((m, own))
            res -= nbytes
            slot = max(slot, _round_up(nbytes, _PAGE))
            best_need = min(best_need, res + slot)
        if res + slot > budget:
            raise ValueError(
                f"moestream.offload: max_device_memory={fmt_bytes(budget)} is too small: one streamed layer needs "
                f"{fmt_bytes(slot_need)} and the resident weights need {fmt_bytes(resident)}"
                + (f" (+ {fmt_bytes(ram_extra)} of read buffers)" if ram_extra else "")
                + f", so at least {fmt_bytes(resident + ram_extra + slot_need)} is needed"
                + (
                    f" ({fmt_bytes(best_need)} when the embedding / output layers are streamed too)"
                    if best_need < resident + ram_extra + slot_need
                    else ""
                )
                + ", plus room for activations and the KV cache"
            )
        before = sorted(
            (m for m, _ in chosen if order_index[id(m)] < first_block), key=lambda m: order_index[id(m)]
        )
        after = sorted(
            (m for m, _ in chosen if order_index[id(m)] > first_block), key=lambda m: order_index[id(m)]
        )
        unit_mods = before + list(block_mods) + after
        prefixes = {names[id(m)]: ui for ui, m in enumerate(unit_mods)}
        for e in params:
            e.unit = owner_unit(e, prefixes)
        sizes = unit_sizes(params, len(unit_mods))
        resident = sum(e.source.nbytes for e in entries if not (e.is_param and e.unit >= 0))
        slot_need = _round_up(max(sizes), _PAGE)

    num_units = len(unit_mods)
    want_slots = min(prefetch + 1, num_units)
    if budget is None:
        num_slots = want_slots
    else:
        num_slots = min(want_slots, (budget - resident - ram_extra) // slot_need)
        if num_slots < want_slots:
            warnings.warn(
                f"moestream.offload: max_device_memory={fmt_bytes(budget)} holds {num_slots} slot(s) of "
                f"{fmt_bytes(slot_need)} next to {fmt_bytes(resident)} of resident weights; prefetch lowered "
                f"from {prefetch} to {num_slots - 1}",
                stacklevel=3,
            )
    slot_bytes = slot_need

    # ---- layout: every streamed tensor's offset in its unit's slot image
    units = [_Unit(names[id(m)], []) for m in unit_mods]
    for e in params:
        if e.unit >= 0:
            units[e.unit].entries.append(e)
    for u in units:
        # file order first (sequential reads, merged ranges), memory order otherwise
        u.entries.sort(
            key=lambda e: (e.source.pieces[0].path, e.source.pieces[0].offset) if e.source.pieces else ("", 0)
        )
        off = 0
        for e in u.entries:
            off = _round_up(off, ALIGN)
            e.offset = off
            off += e.source.nbytes
        u.nbytes = _round_up(off, ALIGN)

    state = OffloadState()
    state.device = device
    state.storage = storage
    state.prefetch = num_slots - 1
    state.budget = budget
    state.resident_bytes = resident
    state.ram_extra = ram_extra

    # ---- storage of the streamed bytes
    tmpdir = None
    if storage == "disk":
        need_write = any(e.source.pieces is None for u in units for e in u.entries)
        if need_write:
            if offload_dir is None:
                tmpdir = tempfile.mkdtemp(prefix="moestream-offload-")
                offload_dir = tmpdir
            os.makedirs(offload_dir, exist_ok=True)
            bar = _progress(sum(u.nbytes for u in units), "moestream: writing offload files", progress)
            for ui, u in enumerate(units):
                path = os.path.join(offload_dir, f"unit-{ui:05d}.safetensors")
                sio.write_safetensors(
                    path,
                    [(e.names[0], e.source.tensor) for e in u.entries],
                    metadata={"format": "moestream-offload", "unit": u.name},
                    on_tensor=bar.update if bar is not None else None,
                )
                infos, _ = sio.read_header(path)
                for e in u.entries:
                    info = infos[e.names[0]]
                    e.source = Source(
                        e.source.dtype, e.source.shape, pieces=[Piece(path, info.offset, info.nbytes, 0)]
                    )
            if bar is not None:
                bar.close()
            sio.fsync_dir(offload_dir)
        host_bytes = 0
    else:
        host_bytes = sum(_round_up(u.nbytes, _PAGE) for u in units)

    staging_offset = _round_up(host_bytes, _PAGE)
    pool_bytes = staging_offset + _C.stream_staging_bytes(chunk_bytes, num_staging)

    if pin is None:
        pin_mode = 2 if device.type == "cuda" else 0
    elif pin:
        pin_mode = 2 if device.type == "cuda" else 1
    else:
        pin_mode = 0
    pool = _C.HostPool(pool_bytes, pin_mode)

    def pin_pool() -> None:
        if pin_mode and pool_bytes and not pool.pin():
            warnings.warn(
                f"moestream.offload: could not page-lock {fmt_bytes(pool_bytes)} of host memory ({pool.pin_error}); "
                "using pageable memory instead (host-to-device copies will be slower)",
                stacklevel=4,
            )

    if storage == "disk":
        pin_pool()  # staging buffers only: nothing to fill
    streamer = _C.Streamer(
        pool,
        _engine_device(device),
        slot_bytes,
        num_slots,
        num_readers,
        chunk_bytes,
        staging_offset,
        num_staging,
        direct_io,
    )
    state.pool = pool
    state.streamer = streamer
    file_index: dict[str, int] = {}

    def fidx(path: str) -> int:
        if path not in file_index:
            file_index[path] = streamer.add_file(path)
            state.files.append(path)
        return file_index[path]

    # ---- resident tensors onto the device
    for e in entries:
        if e.is_param and e.unit >= 0:
            continue
        src = e.source
        if src.pieces is not None:
            t = torch.empty(src.shape, dtype=src.dtype)
            if src.nbytes:
                streamer.read_into(
                    t, [(p.dst, p.nbytes, fidx(p.path), p.offset, e.names[0]) for p in src.pieces]
                )
            _set_tensor(e, t.to(device))
        elif e.obj.device != device:
            _set_tensor(e, e.obj.detach().to(device))

    # ---- streamed tensors into the pool (cpu) or registered as file ranges (disk)
    cache: dict = {}
    pool_off = 0
    bar = _progress(host_bytes, "moestream: filling host memory", progress and storage == "cpu")
    for ui, u in enumerate(units):
        segs = []
        for e in u.entries:
            src = e.source
            if storage == "cpu":
                base = pool_off + e.offset
                if src.nbytes:
                    dst = pool.view(base, src.nbytes)
                    if src.pieces is not None:
                        streamer.read_into(
                            dst, [(p.dst, p.nbytes, fidx(p.path), p.offset, e.names[0]) for p in src.pieces]
                        )
                    else:
                        dst.view(src.dtype).view(src.shape).copy_(src.tensor)
                    del dst
                segs.append((e.offset, src.nbytes, -1, base, e.names[0]))
                if bar is not None:
                    bar.update(src.nbytes)
            else:
                for p in src.pieces:
                    segs.append((e.offset + p.dst, p.nbytes, fidx(p.path), p.offset, e.names[0]))
            e.placeholder = _placeholder(src.dtype, src.shape, device, cache)
            if e.is_param:
                # inference only: a streamed parameter is a view of a reused slot during its block's
                # forward, so it must not collect gradients
                e.obj.requires_grad_(False)
            e.source = Source(src.dtype, src.shape, pieces=src.pieces)  # drop the in-memory tensor
            _set_tensor(e, e.placeholder)
            u.params.append(e.obj)
            u.placeholders.append(e.placeholder)
            e.owners = []  # no module references from the state: deleting the model frees everything
        if storage == "cpu":
            pool_off += _round_up(u.nbytes, _PAGE)
        uid = streamer.add_unit(segs)
        assert uid == ui
    if bar is not None:
        bar.close()
    if storage == "cpu":
        pin_pool()  # after filling: the source tensors were freed as their bytes moved in

    # ---- prefetch order (cyclic: the last layers prefetch the first ones of the next forward)
    ahead_n = min(prefetch, num_slots - 1)
    for i, u in enumerate(units):
        seen = []
        for k in range(1, ahead_n + 1):
            j = (i + k) % num_units
            if j != i and j not in seen:
                seen.append(j)
        u.ahead = seen
    state.units = units
    for i, m in enumerate(unit_mods):
        state.handles.append(m.register_forward_pre_hook(functools.partial(state._pre, i)))
        state.handles.append(m.register_forward_hook(functools.partial(state._post, i), always_call=True))
    if tmpdir is not None:
        state._finalizer = weakref.finalize(state, shutil.rmtree, tmpdir, True)
    model._moestream_offload = state
    return state


def get_state(model: nn.Module) -> OffloadState:
    """The streaming state bound to an offloaded model (units, streamer); raises if it is not offloaded."""
    st = getattr(model, "_moestream_offload", None)
    if st is None:
        raise ValueError("moestream: this model is not offloaded (use ms.offload or ms.load_offloaded first)")
    return st


def offload_stats(model: nn.Module) -> dict:
    """Counters of an offloaded model: bytes read from storage and loaded into slots, acquires and
    slot hits, time waited, the slot ring and the memory it takes (``device_bytes``), the budget."""
    return get_state(model).stats()


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
    Inference only: streamed parameters are views into reused slots during their block's forward;
    they are set to requires_grad=False. Do not call ``model.to()`` after offloading.
    """
    dev = normalize_device(device)
    return _offload_impl(
        model,
        dev,
        max_device_memory,
        storage,
        offload_dir,
        prefetch,
        blocks,
        num_readers,
        chunk_bytes,
        pin,
        direct_io,
        progress,
    )


def _offload_impl(
    model,
    dev,
    budget,
    storage,
    offload_dir,
    prefetch,
    blocks,
    num_readers,
    chunk_bytes,
    pin,
    direct_io,
    progress,
):
    entries, _ = collect_entries(model)
    install(
        model,
        {},
        device=dev,
        max_device_memory=budget,
        storage=storage,
        offload_dir=offload_dir,
        prefetch=prefetch,
        blocks=blocks,
        num_readers=num_readers,
        chunk_bytes=chunk_bytes,
        pin=pin,
        direct_io=direct_io,
        progress=progress,
        entries=entries,
    )
    return model
