"""The offload planner: from the model's tensors (names and sizes only) and the options, decides what
stays resident, what is streamed in which unit, where each tensor sits in its slot and in host
memory, how many slots fit the budget and what each unit prefetches. Pure: no tensors, no files, no
engine; the materialiser carries the plan out.

A *unit* is what one slot holds: one repeated block (a decoder layer), or, when the budget is too
small to keep them resident, a large leaf module outside the blocks (embedding, lm_head). Units run
in a fixed cyclic order; before unit i runs, units i+1 .. i+prefetch (wrapping around to the next
forward) are already being loaded.

MoE blocks with ``experts="cache"`` (the default when the blocks hold fused experts modules): the
experts are not part of their layer's unit. Each expert is a unit of its own in an *expert cache*,
a second ring of slots (one expert each) filled on demand with the experts the router selected and
kept while they are used (LRU or LFU); the routers stay resident so the next layer's experts can be
predicted and prefetched. ``experts="layer"``: the whole layer, experts included, is one unit.
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
class ExpertGroupSpec:
    """One fused experts module: E experts whose weights are the tensors ``keys`` of shape [E, ...]."""

    module: str
    block: int  # index in ModelLayout.blocks
    keys: tuple[int, ...]
    num_experts: int
    top_k: int
    router_keys: tuple[int, ...] = ()  # kept resident (expert prediction)


@dataclass(frozen=True)
class ModelLayout:
    tensors: list[TensorSpec]
    blocks: list[str]  # module names of the repeated blocks, in order
    leaves_before: list[str] = field(default_factory=list)  # leaf modules with parameters outside the blocks
    leaves_after: list[str] = field(default_factory=list)
    expert_groups: list[ExpertGroupSpec] = field(default_factory=list)


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
class ExpertGroupPlan:
    module: str
    first_unit: int  # the expert streamer's unit of expert 0 (expert e is first_unit + e)
    num_experts: int
    top_k: int
    tensors: list[Placed]  # one expert's slice of each fused tensor: offset in the expert slot, bytes
    host_offsets: list[int] = field(default_factory=list)  # storage "cpu": each fused tensor in the pool


@dataclass
class ExpertPlan:
    groups: list[ExpertGroupPlan]
    slot_bytes: int  # one expert (the largest), PAGE rounded
    num_slots: int
    min_slots: int  # the largest top_k: one layer's selection of one token must fit

    @property
    def expert_bytes(self) -> int:
        """Bytes of every expert of every group (what layer streaming would read per forward)."""
        return sum(g.num_experts * sum(t.nbytes for t in g.tensors) for g in self.groups)


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
    experts: ExpertPlan | None = None
    chunk_bytes: int = 4 << 20  # reads and copies: the options' chunk, smaller when the budget is small

    @property
    def streamed_bytes(self) -> int:
        return sum(u.nbytes for u in self.units) + (self.experts.expert_bytes if self.experts else 0)

    @property
    def cache_bytes(self) -> int:
        return self.experts.num_slots * self.experts.slot_bytes if self.experts else 0

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.num_slots * self.slot_bytes + self.cache_bytes + self.ram_extra


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


EXPERT = -2  # unit_of value of a tensor held by the expert cache


def _assign(
    layout: ModelLayout, unit_modules: list[str], cached: dict[int, int] | None = None
) -> tuple[dict[int, int], int, int]:
    """Tensor key -> unit (EXPERT for the expert cache's, -1 resident), the resident bytes and the
    page-rounded slot size. `cached` maps keys to EXPERT (experts) or -1 (routers)."""
    prefixes = {m: i for i, m in enumerate(unit_modules)}
    cached = cached or {}
    unit_of = {
        t.key: cached.get(t.key, _owner_unit(t, prefixes) if t.is_param else -1) for t in layout.tensors
    }
    sizes = [0] * len(unit_modules)
    for t in layout.tensors:
        u = unit_of[t.key]
        if u >= 0:
            sizes[u] = round_up(sizes[u], ALIGN) + t.nbytes
    sizes = [round_up(s, ALIGN) for s in sizes]
    resident = sum(t.nbytes for t in layout.tensors if unit_of[t.key] == -1)
    return unit_of, resident, round_up(max(sizes, default=0), PAGE)


def _leaves_to_stream(layout: ModelLayout, unit_of: dict[int, int], fixed: int, slot: int, budget: int):
    """Streams the largest leaf modules outside the blocks (embedding, lm_head) as units of their own
    until resident + slot fits the budget. Returns (chosen leaves, smallest need reached)."""
    cands = []
    for m in layout.leaves_before + layout.leaves_after:
        own = [t for t in layout.tensors if t.is_param and unit_of[t.key] == -1 and m in t.owners]
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


def _expert_mode(layout: ModelLayout, opts: Resolved) -> bool:
    if opts.experts == "layer":
        return False
    if opts.experts == "cache" and not layout.expert_groups:
        raise ValueError(
            "moestream.offload: experts='cache' needs blocks with fused experts modules (parameters "
            "gate_up_proj / down_proj of shape [E, ...] called as experts(x, ids, weights)); this model has none"
        )
    return bool(layout.expert_groups)


def _expert_slot(layout: ModelLayout) -> tuple[list[ExpertGroupPlan], int, dict[int, int]]:
    """Each group's per-expert slot image, the expert slot size and the cache's keys (experts ->
    EXPERT, routers -> resident)."""
    by_key = {t.key: t for t in layout.tensors}
    groups, cached, unit, slot = [], {}, 0, 0
    for g in layout.expert_groups:
        placed, off = [], 0
        for k in g.keys:
            t = by_key[k]
            if t.nbytes % g.num_experts:
                raise ValueError(
                    f"moestream.offload: '{t.names[0]}' has {t.nbytes} bytes, not a multiple of its "
                    f"{g.num_experts} experts"
                )
            off = round_up(off, ALIGN)
            placed.append(Placed(k, off, t.nbytes // g.num_experts, t.names[0]))
            off += t.nbytes // g.num_experts
            cached[k] = EXPERT
        for k in g.router_keys:
            cached.setdefault(k, -1)
        groups.append(ExpertGroupPlan(g.module, unit, g.num_experts, g.top_k, placed))
        unit += g.num_experts
        slot = max(slot, off)
    return groups, round_up(max(slot, 1), PAGE), cached


def plan_offload(layout: ModelLayout, opts: Resolved) -> Plan:
    """The plan for streaming `layout`'s blocks under `opts`; ValueError when the budget is too small."""
    if not layout.blocks:
        raise ValueError("moestream.offload: no blocks to stream")
    egroups, eslot, cached = _expert_slot(layout) if _expert_mode(layout, opts) else ([], 0, {})
    num_staging, staging_bytes = staging_plan(opts)
    staging_bytes *= 2 if egroups else 1  # the expert streamer has its own
    ram_extra = staging_bytes if opts.device.type == "cpu" else 0
    budget = opts.budget
    unit_modules = list(layout.blocks)
    emin = max((g.top_k for g in egroups), default=0)
    if opts.expert_slots is not None and egroups:
        if opts.expert_slots < emin:
            raise ValueError(
                f"moestream.offload: expert_slots={opts.expert_slots} is below top_k={emin}: the cache must "
                "hold the experts one token selects in one layer"
            )
        emin = opts.expert_slots
    ecache_min = emin * eslot  # the smallest expert cache: one token's k experts of one layer
    unit_of, resident, slot_need = _assign(layout, unit_modules, cached)
    if slot_need == 0 and egroups:
        slot_need = PAGE  # blocks that are only experts and routers: empty layer units, one small slot
    if slot_need == 0:
        raise ValueError("moestream.offload: the blocks have no parameters to stream")
    chunk = opts.chunk_bytes
    if budget is not None and ram_extra:
        # read buffers counted in the budget take what the resident weights and two slots leave
        slots = min(2, opts.prefetch + 1, len(unit_modules))
        streamers = 2 if egroups else 1  # the expert streamer has buffers of its own
        room = (budget - resident - slots * slot_need - ecache_min) // streamers
        num_staging, chunk, staging_bytes = fit_staging(opts, room)
        staging_bytes *= streamers
        ram_extra = staging_bytes

    fixed = resident + ram_extra + ecache_min
    if budget is not None and fixed + slot_need > budget:
        chosen, best, fits = _leaves_to_stream(layout, unit_of, fixed, slot_need, budget)
        if not fits:
            need = fixed + slot_need
            raise ValueError(
                f"moestream.offload: max_device_memory={fmt_bytes(budget)} is too small: one streamed layer needs "
                f"{fmt_bytes(slot_need)} and the resident weights need {fmt_bytes(resident)}"
                + (
                    f", the expert cache at least {emin} experts of {fmt_bytes(eslot)} "
                    f"({fmt_bytes(ecache_min)}: the k experts one token selects in one layer)"
                    if egroups
                    else ""
                )
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
        unit_of, resident, slot_need = _assign(layout, unit_modules, cached)

    warnings = []
    want = min(opts.prefetch + 1, len(unit_modules))
    num_slots = (
        want if budget is None else min(want, (budget - resident - ram_extra - ecache_min) // slot_need)
    )
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

    experts = None
    if egroups:
        total = sum(g.num_experts for g in egroups)
        if opts.expert_slots is not None:
            n = opts.expert_slots
        elif budget is None:
            # the memory layer streaming would give the experts: one layer's experts per layer slot
            n = max(g.num_experts for g in egroups) * num_slots
        else:
            n = (budget - resident - ram_extra - num_slots * slot_need) // eslot
        n = max(emin, min(n, total))
        experts = ExpertPlan(egroups, eslot, n, emin)
        if opts.storage == "cpu":
            by_key = {t.key: t for t in layout.tensors}
            for g in egroups:
                for t in g.tensors:
                    g.host_offsets.append(host_off)
                    host_off += round_up(by_key[t.key].nbytes, PAGE)

    # prefetch order (cyclic: the last layers prefetch the first ones of the next forward)
    ahead_n = min(opts.prefetch, num_slots - 1)
    for i, u in enumerate(units):
        u.ahead = list(
            dict.fromkeys(j for j in ((i + k) % len(units) for k in range(1, ahead_n + 1)) if j != i)
        )

    return Plan(
        units=units,
        resident=[t.key for t in layout.tensors if unit_of[t.key] == -1],
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
        experts=experts,
        chunk_bytes=chunk,
    )
