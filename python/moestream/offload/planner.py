"""The offload planner: from the model's tensors (names and sizes only) and the options, decides what
stays resident, what is streamed in which unit, where each tensor sits in its slot and in host
memory, how many slots fit the budget and what each unit prefetches. Pure: no tensors, no files, no
engine; the materialiser carries the plan out.

A *unit* is what one slot holds: one repeated block (a decoder layer; for MoE models the whole layer
with all its experts), or, when the budget is too small to keep them resident, a large leaf module
outside the blocks (embedding, lm_head). Units run in a fixed cyclic order; before unit i runs,
units i+1 .. i+prefetch (wrapping around to the next forward) are already being loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import Resolved, fmt_bytes, round_up

# Byte alignment of every tensor in a slot (what cudaMalloc gives; vectorised kernels want 16).
ALIGN = 256
PAGE = 4096


@dataclass(frozen=True)
class TensorSpec:
    """One unique tensor of the model, as the planner sees it."""

    key: int  # the caller's index of the tensor
    names: tuple[str, ...]  # every name it is reachable under (tied weights have several)
    nbytes: int
    is_param: bool
    file_pos: tuple[str, int] | None = None  # (file, offset) of its first byte when it comes from a file
    owners: tuple[str, ...] = ()  # names of the modules holding it


@dataclass(frozen=True)
class ModelLayout:
    tensors: list[TensorSpec]
    blocks: list[str]  # module names of the repeated blocks, in order
    leaves_before: list[str] = field(default_factory=list)  # leaf modules with parameters outside the blocks
    leaves_after: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Placed:
    key: int
    offset: int  # byte offset in the slot image
    nbytes: int
    name: str


@dataclass
class UnitPlan:
    module: str  # the module whose forward binds this unit
    tensors: list[Placed]
    nbytes: int  # slot image size (ALIGN rounded)
    host_offset: int = 0  # storage "cpu": where the slot image sits in the host pool
    ahead: list[int] = field(default_factory=list)  # units to load while this one computes


@dataclass
class Plan:
    units: list[UnitPlan]
    resident: list[int]  # keys of the tensors that stay on the device
    resident_bytes: int
    slot_bytes: int
    num_slots: int
    prefetch: int  # effective: num_slots - 1
    host_bytes: int  # storage "cpu": the host pool holding every slot image
    num_staging: int  # staging buffers: file reads on CUDA, O_DIRECT bounce buffers on CPU
    staging_bytes: int
    ram_extra: int  # device "cpu": the staging buffers, counted in the RAM budget like the slots
    budget: int | None
    warnings: list[str] = field(default_factory=list)
    chunk_bytes: int = 4 << 20  # reads and copies: the options' chunk, smaller when the budget is small

    @property
    def streamed_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.num_slots * self.slot_bytes + self.ram_extra


def staging_plan(opts: Resolved) -> tuple[int, int]:
    """(number of staging buffers, their bytes) the engine will allocate for these options."""
    from .. import _C

    need = opts.storage == "disk" and (opts.device.type == "cuda" or opts.direct_io)
    if not need:
        return 0, 0
    # CUDA: enough buffers to keep every reader busy while earlier chunks cross the link. CPU: only
    # reads that are not block aligned use them (bounce buffers).
    n = max(4, 2 * opts.num_readers) if opts.device.type == "cuda" else opts.num_readers + 1
    return n, int(_C.stream_staging_bytes(opts.chunk_bytes, n))


# The smallest read chunk the planner picks to fit a small budget (each read then moves 64 KiB).
MIN_CHUNK = 64 << 10


def fit_staging(opts: Resolved, room: int) -> tuple[int, int, int]:
    """(buffers, chunk bytes, their bytes) of the largest read buffers within `room` bytes: the
    options' chunk halved down to MIN_CHUNK, then fewer buffers down to one (readers then wait for
    a bounce buffer; reads stay correct). The minimal buffer when even that does not fit."""
    from .. import _C

    n, _ = staging_plan(opts)
    chunk = opts.chunk_bytes
    floor = min(chunk, MIN_CHUNK)
    while True:
        nbytes = int(_C.stream_staging_bytes(chunk, n))
        if nbytes <= room or (chunk <= floor and n == 1):
            return n, chunk, nbytes
        if chunk > floor:
            chunk = max(floor, round_up(chunk // 2, PAGE))
        else:
            n -= 1


def _owner_unit(t: TensorSpec, prefixes: dict[str, int]) -> int:
    """The unit holding every name of t, or -1 (shared with outside, or outside)."""
    found = None
    for name in t.names:
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


def _assign(layout: ModelLayout, unit_modules: list[str]) -> tuple[dict[int, int], int, int]:
    """Tensor key -> unit, the resident bytes and the page-rounded slot size."""
    prefixes = {m: i for i, m in enumerate(unit_modules)}
    unit_of = {t.key: (_owner_unit(t, prefixes) if t.is_param else -1) for t in layout.tensors}
    sizes = [0] * len(unit_modules)
    for t in layout.tensors:
        u = unit_of[t.key]
        if u >= 0:
            sizes[u] = round_up(sizes[u], ALIGN) + t.nbytes
    sizes = [round_up(s, ALIGN) for s in sizes]
    resident = sum(t.nbytes for t in layout.tensors if unit_of[t.key] < 0)
    return unit_of, resident, round_up(max(sizes, default=0), PAGE)


def _leaves_to_stream(layout: ModelLayout, unit_of: dict[int, int], fixed: int, slot: int, budget: int):
    """Streams the largest leaf modules outside the blocks (embedding, lm_head) as units of their own
    until resident + slot fits the budget. Returns (chosen leaves, smallest need reached)."""
    cands = []
    for m in layout.leaves_before + layout.leaves_after:
        own = [t for t in layout.tensors if t.is_param and unit_of[t.key] < 0 and m in t.owners]
        if own and all(set(t.owners) == {m} for t in own):
            cands.append((sum(t.nbytes for t in own), m))
    cands.sort(key=lambda c: -c[0])
    chosen, best = [], fixed + slot
    for nbytes, m in cands:
        if fixed + slot <= budget:
            break
        chosen.append(m)
        fixed -= nbytes
        slot = max(slot, round_up(nbytes, PAGE))
        best = min(best, fixed + slot)
    return chosen, best, fixed + slot <= budget


def plan_offload(layout: ModelLayout, opts: Resolved) -> Plan:
    """The plan for streaming `layout`'s blocks under `opts`; ValueError when the budget is too small."""
    if not layout.blocks:
        raise ValueError("moestream.offload: no blocks to stream")
    num_staging, staging_bytes = staging_plan(opts)
    ram_extra = staging_bytes if opts.device.type == "cpu" else 0
    budget = opts.budget
    unit_modules = list(layout.blocks)
    unit_of, resident, slot_need = _assign(layout, unit_modules)
    if slot_need == 0:
        raise ValueError("moestream.offload: the blocks have no parameters to stream")
    chunk = opts.chunk_bytes
    if budget is not None and ram_extra:
        # read buffers counted in the budget take what the resident weights and two slots leave
        slots = min(2, opts.prefetch + 1, len(unit_modules))
        num_staging, chunk, staging_bytes = fit_staging(opts, budget - resident - slots * slot_need)
        ram_extra = staging_bytes

    if budget is not None and resident + ram_extra + slot_need > budget:
        chosen, best, fits = _leaves_to_stream(layout, unit_of, resident + ram_extra, slot_need, budget)
        if not fits:
            need = resident + ram_extra + slot_need
            raise ValueError(
                f"moestream.offload: max_device_memory={fmt_bytes(budget)} is too small: one streamed layer needs "
                f"{fmt_bytes(slot_need)} and the resident weights need {fmt_bytes(resident)}"
                + (f" (+ {fmt_bytes(ram_extra)} of read buffers at the least)" if ram_extra else "")
                + f", so at least {fmt_bytes(need)} is needed"
                + (
                    f" ({fmt_bytes(best)} when the embedding / output layers are streamed too)"
                    if best < need
                    else ""
                )
                + ", plus room for activations and the KV cache"
            )
        unit_modules = (
            [m for m in layout.leaves_before if m in chosen]
            + list(layout.blocks)
            + [m for m in layout.leaves_after if m in chosen]
        )
        unit_of, resident, slot_need = _assign(layout, unit_modules)

    warnings = []
    want = min(opts.prefetch + 1, len(unit_modules))
    num_slots = want if budget is None else min(want, (budget - resident - ram_extra) // slot_need)
    if num_slots < want:
        warnings.append(
            f"moestream.offload: max_device_memory={fmt_bytes(budget)} holds {num_slots} slot(s) of "
            f"{fmt_bytes(slot_need)} next to {fmt_bytes(resident)} of resident weights; prefetch lowered "
            f"from {opts.prefetch} to {num_slots - 1}"
        )

    # every streamed tensor's offset in its unit's slot image: file order first (sequential reads,
    # merged ranges), memory order otherwise
    units = []
    host_off = 0
    for ui, m in enumerate(unit_modules):
        ts = [t for t in layout.tensors if unit_of[t.key] == ui]
        ts.sort(key=lambda t: t.file_pos or ("", 0))
        placed, off = [], 0
        for t in ts:
            off = round_up(off, ALIGN)
            placed.append(Placed(t.key, off, t.nbytes, t.names[0]))
            off += t.nbytes
        u = UnitPlan(m, placed, round_up(off, ALIGN), host_offset=host_off)
        if opts.storage == "cpu":
            host_off += round_up(u.nbytes, PAGE)
        units.append(u)

    # prefetch order (cyclic: the last layers prefetch the first ones of the next forward)
    ahead_n = min(opts.prefetch, num_slots - 1)
    for i, u in enumerate(units):
        u.ahead = list(
            dict.fromkeys(j for j in ((i + k) % len(units) for k in range(1, ahead_n + 1)) if j != i)
        )

    return Plan(
        units=units,
        resident=[t.key for t in layout.tensors if unit_of[t.key] < 0],
        resident_bytes=resident,
        slot_bytes=slot_need,
        num_slots=num_slots,
        prefetch=num_slots - 1,
        host_bytes=host_off,
        num_staging=num_staging,
        staging_bytes=staging_bytes,
        ram_extra=ram_extra,
        budget=budget,
        warnings=warnings,
        chunk_bytes=chunk,
    )
