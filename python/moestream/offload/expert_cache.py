"""The expert cache of an offloaded MoE model at run time.

Each expert of each fused experts module is a unit of its own in a second streamer whose slots (one
expert each) are one contiguous allocation, so every slot's weights are one strided tensor
[num_slots, ...] that ``grouped_mm`` takes as it is: group s is the expert in slot s.

A call of an experts module (``experts(x [T, H], ids [T, k], weights [T, k])``) becomes:

1. the union of the experts the tokens selected; each one is a *hit* (it holds a slot: loaded, or
   loading after a prefetch) or a *miss*, and every one is pinned to its slot (``request``: missing
   ones are queued in expert order, nothing blocks);
2. the next experts module's experts are predicted by applying its router to this hidden state and
   queued behind this layer's misses (a hint: a wrong guess costs bandwidth, never correctness);
3. the rows of the experts whose slot is ready run first, while the misses are read; then each
   missing expert runs as soon as its load completes, with any others that completed meanwhile
   (waves of one grouped computation over the slots each);
4. the slots are released (they stay cached until evicted: LRU, or LFU) and the rows combined.

A selection larger than the cache runs in chunks of at most ``num_slots`` experts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, pipeline


@dataclass
class _Compute:
    """How an experts module computes, read from the module once."""

    w1: str
    w2: str
    b1: str | None
    b2: str | None
    transpose_b: bool
    act: object  # pipeline.Gate or a callable [N, 2I] -> [N, I]
    post: object = None
    quant: bool = False  # the weights are moestream.quant.PackedWeight (ops.QUANT_OPS)


@dataclass
class _Packed:
    """A PackedWeight's buffers as strided views of the expert slots ([slots, ...])."""

    qweight: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int
    owner: nn.Module | None = None  # the PackedWeight these are the buffers of (its `activations`)

    @property
    def activations(self) -> str:
        return getattr(self.owner, "activations", "auto")

    def index_select(self, sel: Tensor) -> _Packed:
        z = None if self.zero is None else self.zero.index_select(0, sel)
        return _Packed(
            self.qweight.index_select(0, sel),
            self.scale.index_select(0, sel),
            z,
            self.bits,
            self.group_size,
            self.owner,
        )


def compute_spec(module: nn.Module, dense: bool = False) -> _Compute:
    """The expert MLP of ``module``: ``ms.nn.GroupedExperts``, or a transformers experts module
    (``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate`` / ``act_fn``, post-expert norm)."""
    from ..nn.moe import GroupedExperts
    from ..quant import QuantizedGroupedExperts

    params = module._parameters
    if isinstance(module, (GroupedExperts, QuantizedGroupedExperts)):
        # moestream's own modules: a fused gate; packed weights are always [E, N, K]
        quant = isinstance(module, QuantizedGroupedExperts)
        has_bias = module.gate_up_proj_bias is not None
        return _Compute(
            "gate_up_proj",
            "down_proj",
            "gate_up_proj_bias" if has_bias else None,
            "down_proj_bias" if has_bias else None,
            True if quant else module.transpose_b,
            pipeline.Gate(module.activation, module.layout, module.alpha, module.limit),
            quant=quant,
        )
    if dense:
        # transformers' Llama 4: bmm(x, gate_up_proj [E, H, 2I]) -> up * act_fn(gate) -> bmm(down_proj [E, I, H])
        fn, dtype = module.act_fn, params["down_proj"].dtype

        def act(h: Tensor) -> Tensor:
            gate, up = h.chunk(2, dim=-1)
            return (up * fn(gate)).to(dtype)

        return _Compute("gate_up_proj", "down_proj", None, None, False, act)
    has_gate = getattr(module, "has_gate", True) and params.get("gate_up_proj") is not None
    has_bias = bool(getattr(module, "has_bias", False))
    w1 = "gate_up_proj" if has_gate else "up_proj"
    b1 = ("gate_up_proj_bias" if has_gate else "up_proj_bias") if has_bias else None
    alpha = float(getattr(module, "alpha", 1.702))
    limit = float(getattr(module, "limit", 7.0))
    act = None
    if has_gate:
        from ..integrations.transformers import _experts_gate  # a transformers module: it is installed

        gate = _experts_gate(module)
        if gate:
            act = pipeline.Gate(gate[0], gate[1], alpha, limit)
    if act is None:
        fn = module._apply_gate if has_gate else module.act_fn
        dtype = params["down_proj"].dtype
        act = lambda h: fn(h).to(dtype)
    post = module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None
    return _Compute(
        w1,
        "down_proj",
        b1,
        "down_proj_bias" if has_bias else None,
        not getattr(module, "is_transposed", False),
        act,
        post,
    )


@dataclass
class ExpertGroupState:
    """One experts module in the cache: its units, the layout of an expert in a slot, its weights
    as strided views of every slot, and its router (for predicting its experts)."""

    name: str
    first_unit: int
    num_experts: int
    top_k: int
    specs: dict[str, tuple[int, torch.dtype, tuple[int, ...]]]  # attr -> (slot offset, dtype, expert shape)
    params: list[nn.Parameter]
    compute: _Compute | None = None
    experts: pipeline.Experts | None = None  # the slots' weights
    router: weakref.ref | None = None
    dtype: torch.dtype = torch.float32
    original_forward: object = None


@dataclass
class CacheCounters:
    lookups: int = 0  # distinct experts looked up per call (a batch's union), summed over calls
    selections: int = 0  # (token, expert) selections
    hits: int = 0
    misses: int = 0
    predicted: int = 0  # experts predicted for the next experts module
    predicted_used: int = 0  # ... that it then selected
    predicted_lookups: int = 0  # lookups of calls that had a prediction
    # predicted experts that were not cached when predicted (the prediction read them), and those of
    # them that the call then selected: hits, but read for that call (a cache of what was used before
    # would have missed them), so misses + prefetch_load_hits are the experts read for the calls
    prefetch_loads: int = 0
    prefetch_load_hits: int = 0
    calls: int = 0

    def as_dict(self) -> dict:
        n = self.hits + self.misses
        return {
            "expert_lookups": self.lookups,
            "expert_selections": self.selections,
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "expert_hit_rate": self.hits / n if n else 0.0,
            "expert_calls": self.calls,
            "prefetch_predicted": self.predicted,
            "prefetch_correct": self.predicted_used,
            # precision: how often a predicted expert was then selected; recall: how much of the
            # selection was predicted
            "prefetch_precision": self.predicted_used / self.predicted if self.predicted else 0.0,
            "prefetch_recall": self.predicted_used / self.predicted_lookups
            if self.predicted_lookups
            else 0.0,
            "prefetch_loads": self.prefetch_loads,
            "prefetch_load_hits": self.prefetch_load_hits,
        }


@dataclass
class ExpertCache:
    streamer: object  # moestream._C.Streamer with contiguous slots, one expert per slot
    groups: list[ExpertGroupState] = field(default_factory=list)
    prefetch: bool = True
    # copy each wave's experts out of the slots before computing: CUDA's grouped_mm makes strided
    # weights contiguous (all slots); the CPU kernel reads the strided slot views in place
    gather: bool = False
    counters: CacheCounters = field(default_factory=CacheCounters)
    _predicted: dict[int, set[int]] = field(default_factory=dict)
    _prefetch_loaded: dict[int, set[int]] = field(
        default_factory=dict
    )  # group -> experts the prediction read

    # -- binding ------------------------------------------------------------------------------------
    def bind(self, modules: list[nn.Module], routers: list[nn.Module | None], dense: list[bool]) -> None:
        """Builds the slot views and replaces each experts module's forward with the cached one."""
        arr = self.streamer.slot_array()
        S, slot_bytes = self.streamer.num_slots, self.streamer.slot_bytes
        for gi, (g, m, r, d) in enumerate(zip(self.groups, modules, routers, dense)):
            g.compute = compute_spec(m, d)
            views = {}
            for attr, (off, dtype, shape) in g.specs.items():
                per_slot = slot_bytes // dtype.itemsize
                inner = torch.empty(shape, device="meta").stride() if shape else ()
                with torch.inference_mode(False):
                    views[attr] = arr.view(dtype).as_strided(
                        (S, *shape), (per_slot, *inner), off // dtype.itemsize
                    )
            c = g.compute
            if c.quant:
                # PackedWeight stand-ins whose buffers are the slots' (what QUANT_OPS' grouped_mm reads)
                w1, w2 = (
                    _Packed(
                        views[f"{w}.qweight"],
                        views[f"{w}.scale"],
                        views.get(f"{w}.zero"),
                        getattr(m, w).bits,
                        getattr(m, w).group_size,
                        getattr(m, w),
                    )
                    for w in (c.w1, c.w2)
                )
                g.dtype = m.gate_up_proj.dtype
            else:
                w1, w2 = views[c.w1], views[c.w2]
                g.dtype = w1.dtype
            g.experts = pipeline.Experts(
                w1,
                w2,
                views.get(c.b1) if c.b1 else None,
                views.get(c.b2) if c.b2 else None,
                c.transpose_b,
            )
            g.router = None if r is None else weakref.ref(r)
            g.original_forward = m.__dict__.get("forward")
            m.forward = (_CachedDenseForward if d else _CachedForward)(self, gi)

    def unbind(self, modules: list[nn.Module | None]) -> None:
        for g, m in zip(self.groups, modules):
            if m is None:
                continue
            if g.original_forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = g.original_forward

    # -- the cached expert path ---------------------------------------------------------------------
    def run(self, gi: int, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        g = self.groups[gi]
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
            raise RuntimeError(
                "moestream.offload: the experts of an offloaded model are cached slots (inference only); "
                "run it under torch.no_grad() or torch.inference_mode()"
            )
        out_dtype = x.dtype
        xs = x.reshape(-1, x.shape[-1]).to(g.dtype)
        ids = ids.reshape(xs.shape[0], -1)
        weights = weights.reshape(ids.shape)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= g.num_experts):
            raise ValueError(
                f"moestream.offload: {g.name}: expert ids must be in [0, {g.num_experts}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        need = torch.unique(ids).tolist()
        c = self.counters
        c.calls += 1
        c.lookups += len(need)
        c.selections += ids.numel()
        pred = self._predicted.pop(gi, None)
        loaded_ahead = self._prefetch_loaded.pop(gi, set())
        if pred is not None:
            c.predicted_used += len(pred.intersection(need))
            c.predicted_lookups += len(need)
        rows, perm, offsets = ops.permute(xs, ids, g.num_experts)
        ends = [0, *offsets.tolist()]
        y = torch.empty_like(rows)
        S = self.streamer.num_slots
        chunks = [need[i : i + S] for i in range(0, len(need), S)] or [[]]
        for ci, chunk in enumerate(chunks):
            self._run_chunk(g, gi, chunk, rows, ends, y, xs if ci == len(chunks) - 1 else None, loaded_ahead)
        return ops.unpermute(y, perm, weights).to(out_dtype).reshape(x.shape)

    def run_dense(self, gi: int, routed_in: Tensor) -> Tensor:
        """The dense form (routed_in [E * T, H], row e * T + t = token t's input to expert e, zero
        where t did not select e): only the nonzero rows run, each through its expert; the zero
        rows' outputs are zero (no biases, act(0) * 0 = 0) as in the dense product."""
        g = self.groups[gi]
        E, H = g.num_experts, routed_in.shape[-1]
        x3 = routed_in.reshape(E, -1, H)
        e_idx, t_idx = (x3 != 0).any(-1).nonzero(as_tuple=True)
        out = torch.zeros_like(x3)
        if e_idx.numel():
            rows = x3[e_idx, t_idx]
            ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
            out[e_idx, t_idx] = self.run(gi, rows, e_idx[:, None], ones).to(out.dtype)
        return out.view(-1, H)

    def _run_chunk(self, g, gi, chunk, rows, ends, y, x_for_prediction, loaded_ahead=frozenset()) -> None:
        st, c = self.streamer, self.counters
        units = {e: g.first_unit + e for e in chunk}
        cached = [e for e in chunk if st.is_cached(units[e])]
        c.hits += len(cached)
        c.prefetch_load_hits += sum(1 for e in cached if e in loaded_ahead)
        c.misses += len(chunk) - len(cached)
        pinned, slot = [], {}
        try:
            for e in chunk:  # hits refresh their recency; misses are queued in expert order
                slot[e] = st.request(units[e])
                pinned.append(units[e])
            if x_for_prediction is not None and self.prefetch:
                self._predict(gi + 1, x_for_prediction)
            pending = [e for e in chunk if not st.is_ready(units[e])]
            todo = [e for e in chunk if e not in set(pending)]
            while True:
                for e in todo:
                    try:
                        st.wait(units[e])  # counts the acquire; blocks for the first of a wave only
                    except BaseException:
                        pinned.remove(units[e])  # a failed load unpins its unit
                        raise
                self._compute(g, todo, slot, rows, ends, y)
                if not pending:
                    break
                # the next wave: the oldest pending load, and every other one completed by then
                todo = [pending.pop(0)]
                try:
                    st.wait(units[todo[0]])
                except BaseException:
                    pinned.remove(units[todo[0]])
                    raise
                done = {e for e in pending if st.is_ready(units[e])}
                todo += [e for e in pending if e in done]
                pending = [e for e in pending if e not in done]
        finally:
            for u in pinned:
                st.release(u)

    def _compute(self, g: ExpertGroupState, es: list[int], slot: dict, rows: Tensor, ends: list, y: Tensor):
        es = sorted((e for e in es if ends[e + 1] > ends[e]), key=lambda e: slot[e])
        if not es:
            return
        idx = []
        for e in es:
            idx.extend(range(ends[e], ends[e + 1]))
        dev = rows.device
        lengths = [ends[e + 1] - ends[e] for e in es]
        quant = g.compute.quant
        if self.gather or quant:
            # the wave's experts copied out of their slots into one [W, ...] stack (device-to-device,
            # small next to the link that filled them): for kernels that want contiguous weights
            # (CUDA's grouped_mm, qgrouped_mm)
            sel = torch.tensor([slot[e] for e in es], dtype=torch.int64, device=dev)
            experts = g.experts.map(
                lambda t: t.index_select(sel) if isinstance(t, _Packed) else t.index_select(0, sel)
            )
            counts = lengths
        else:
            # every slot is a group; the slots of other experts get no rows
            experts = g.experts
            counts = [0] * self.streamer.num_slots
            for e, n in zip(es, lengths):
                counts[slot[e]] = n
        act, post = g.compute.act, g.compute.post
        whole = len(idx) == rows.shape[0] and idx == list(range(rows.shape[0]))
        index = None if whole else torch.tensor(idx, dtype=torch.int64, device=dev)
        if self._fused(g, dev):
            # the fused expert kernel over the slots: each row routed to its expert's slot with weight 1
            # (it reads each slot's strided weights in place; measured 2x the grouped_mm path at decode)
            sid = torch.tensor([slot[e] for e, n in zip(es, lengths) for _ in range(n)], dtype=torch.int64)
            ones = torch.ones(len(idx), 1, dtype=torch.float32)
            x_w = rows if whole else rows.index_select(0, index)
            ex = g.experts
            y_w = ops.moe_experts(
                x_w,
                sid[:, None],
                ones,
                ex.w_gate_up,
                ex.w_down,
                ex.b_gate_up,
                ex.b_down,
                act.kind,
                act.layout,
                ex.transpose_b,
                act.alpha,
                act.limit,
            )
            if whole:
                y.copy_(y_w)
            else:
                y.index_copy_(0, index, y_w.to(y.dtype))
            return
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(dev)
        op_set = ops.QUANT_OPS if quant else ops.OPS
        if whole:
            y.copy_(pipeline.expert_mlp(op_set, rows, offs, experts, act, post))
            return
        y_w = pipeline.expert_mlp(op_set, rows.index_select(0, index), offs, experts, act, post)
        y.index_copy_(0, index, y_w.to(y.dtype))

    def _fused(self, g: ExpertGroupState, dev: torch.device) -> bool:
        """Whether the fused CPU kernel can run this group on its slots in place: a fused gate, no
        post-expert norm, biases (if any) already in the accumulation dtype (else each call would
        convert every slot's biases)."""
        c = g.compute
        if (
            self.gather
            or c.quant
            or dev.type != "cpu"
            or not isinstance(c.act, pipeline.Gate)
            or c.post is not None
        ):
            return False
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        return all(b is None or b.dtype == acc for b in (g.experts.b_gate_up, g.experts.b_down))

    def _predict(self, gj: int, x: Tensor) -> None:
        """Queues the experts module gj's predicted experts: its router applied to x."""
        if gj >= len(self.groups):
            return
        g = self.groups[gj]
        router = g.router() if g.router is not None else None
        if router is None:
            return
        w = router._parameters.get("weight")
        if w is None or w.device.type == "meta" or w.shape[-1] != x.shape[-1]:
            return
        b = router._parameters.get("bias")
        scores = F.linear(x.to(w.dtype), w, b).float()
        corr = getattr(router, "e_score_correction_bias", None)
        if isinstance(corr, Tensor) and corr.shape == (g.num_experts,):
            scores = torch.sigmoid(scores) + corr.float()
        k = min(g.top_k, g.num_experts)
        pred = set(torch.topk(scores, k, dim=-1).indices.unique().tolist())
        self._predicted[gj] = pred
        self.counters.predicted += len(pred)
        st = self.streamer
        loaded = set()
        for e in sorted(pred):
            if not st.is_cached(g.first_unit + e):
                loaded.add(e)
            st.prefetch(g.first_unit + e)
        self._prefetch_loaded[gj] = loaded
        self.counters.prefetch_loads += len(loaded)

    def stats(self) -> dict:
        s = self.counters.as_dict()
        es = self.streamer.stats()
        s.update(
            expert_slots=int(es["num_slots"]),
            expert_slot_bytes=int(es["slot_bytes"]),
            expert_loads=int(es["loads"]),
            expert_evictions=int(es["evictions"]),
            expert_bytes_read=int(es["bytes_read"]),
            expert_bytes_loaded=int(es["bytes_loaded"]),
            expert_wait_seconds=float(es["wait_seconds"]),
        )
        return s

    def reset(self) -> None:
        self.counters = CacheCounters()
        self._predicted.clear()
        self._prefetch_loaded.clear()
        self.streamer.reset_stats()


class _CachedForward:
    """The forward an experts module gets while its model is offloaded with an expert cache."""

    def __init__(self, cache: ExpertCache, index: int) -> None:
        self._cache = weakref.ref(cache)
        self._index = index

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args, **kwargs):
        cache = self._cache()
        if cache is None:
            raise RuntimeError("moestream.offload: the expert cache of this module was freed")
        return cache.run(self._index, hidden_states, top_k_index, top_k_weights)


class _CachedDenseForward(_CachedForward):
    def __call__(self, hidden_states: Tensor, *args, **kwargs):
        cache = self._cache()
        if cache is None:
            raise RuntimeError("moestream.offload: the expert cache of this module was freed")
        return cache.run_dense(self._index, hidden_states)
