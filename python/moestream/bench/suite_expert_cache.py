"""Suite ``expert_cache``: decoding a Qwen3-MoE-shaped model that does not fit its memory budget with
moestream's expert cache (``experts="cache"``), against moestream's layer streaming
(``experts="layer"``), accelerate's offloading and the model in memory, all in the same run.

The checkpoint (random weights, :func:`moestream.testing.write_random_checkpoint`) is written once
per shape and dtype into a cache directory (``MOESTREAM_BENCH_CACHE``, default a folder in the
temporary directory) and reused by later runs. It comes in two routings, with the same experts:

- ``uniform``: the random router as written; random weights route almost uniformly;
- ``zipf(s)``: a labelled, *constructed* skew (real models route unevenly, random ones do not).
  Every token embedding gets a constant ``MASSIVE`` added in hidden coordinate 0 (a "massive
  activation", as real LLMs have), so the routers' input has a component of the same sign for every
  token; each router's column 0 is set so that expert e's logit gains ``gain * log p(e)``, with
  p(rank) proportional to 1 / rank^s over a random permutation of the experts per layer. How skewed
  the selections really are is measured, not assumed: ``top10_share`` (the fraction of selections
  going to the 10% most selected experts of each layer; 0.10 for perfectly uniform routing).

Decode steps feed random token ids (teacher forcing), not the greedy tokens: greedy decoding of a
random model falls into repeating a few tokens, whose identical routing would flatter any cache.
Batch 1 and batch 8 (8 sequences); the time is per decode step (prefill and warm-up excluded);
tokens/s = batch / step time. ``--quick`` runs layer streaming and accelerate, whose step time
hardly depends on the batch (they read every weight each step), at batch 1 only.

Per routing, batch and method one row ``decode_<routing>`` (tokens = batch). moestream's rows carry
the counters of the timed steps (``ms.offload_stats``): hit rate, bytes read per step and per token,
and the **floor**: the bytes that must be read per step over the measured link rate. For the cache:
the non-expert layer bytes streamed plus one expert's bytes for every expert a call used that the
cache did not hold before (misses, plus hits on experts that the next-layer prediction read for that
call: ``prefetch_load_hits``); ``cold_floor_ms`` is the same with every distinct expert selected read
(no cache; at batch 1, k/E of the experts). For layer streaming: the bytes it streams. The fraction
of ceiling is floor / time; a row faster than its floor is marked ``unreliable`` (the link was
measured low), never reported as a result. Targets (batch 1): cache >= 5x layer streaming, >= 10x
accelerate, time <= 1.3x the floor.

On CPU the weights are read from disk (O_DIRECT; the page cache is dropped before every step, so
accelerate's memory-mapped reads are cold too) against accelerate's ``disk_offload``; on a GPU from
pinned host memory over PCIe (``storage="cpu"``) against accelerate's ``cpu_offload``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import struct
import tempfile
import time
import warnings

import torch

import moestream as ms

from .. import _C, testing
from ..integrations import hf_models
from ..offload import get_state
from . import links
from .core import BenchConfig, Measured, Row, dtype_name, register_suite
from .shapes import Shape
from .timing import Measurement

SUITE = "expert_cache"
ZIPF_S = 1.0  # the Zipf exponent of the skewed routing
MASSIVE = 1.0  # added to hidden coordinate 0 of every token embedding (skewed routing only)
GAIN = 0.2  # logit gain per unit of log p(e) at the routers (skewed routing only)
BATCHES = (1, 8)
PROMPT = 8  # prompt tokens per sequence
CACHE_VERSION = 1  # bump when the checkpoint's construction changes

_QWEN3 = {
    "norm": True,
    "max_pos": 4096,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}


def cache_model(shape: Shape, device: torch.device, quick: bool) -> tuple[str, dict]:
    """-> (shape name of the rows, the model's sizes in :mod:`moestream.testing`'s generic names).
    ``--shape tiny``: a toy (seconds); otherwise the suite's own Qwen3-MoE-like shape (MoE shapes
    give nothing: the size must not fit the budget and still run in minutes)."""
    if shape.name == "tiny":
        s = {
            "hidden": 64,
            "inter": 32,
            "experts": 16,
            "k": 4,
            "layers": 6,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 16,
        }
        s["vocab"] = 256
        return "tiny", {**_QWEN3, **s, "max_pos": 256}
    if device.type == "cuda":  # ~ Qwen3-30B-A3B's layer (H 2048, I 768, 128 experts, top-8)
        s = {"hidden": 2048, "inter": 768, "experts": 128, "k": 8, "layers": 4 if quick else 16, "heads": 32}
        s["kv_heads"] = 4
        return "qwen3-moe-h2048-e128", {**_QWEN3, **s, "head_dim": 128, "vocab": 32768}
    s = {"hidden": 1024, "inter": 384, "experts": 64, "k": 8, "layers": 4 if quick else 6, "heads": 16}
    s["kv_heads"] = 4
    return "qwen3-moe-h1024-e64", {**_QWEN3, **s, "head_dim": 64, "vocab": 8192}


# ---------------------------------------------------------------------------------------------
# the checkpoints


def _cache_root() -> str:
    return os.environ.get("MOESTREAM_BENCH_CACHE") or os.path.join(
        tempfile.gettempdir(), "moestream-bench-cache"
    )


def _shards(d: str) -> tuple[list[str], list[str]]:
    """(layer shards in order, other shards) of a checkpoint written by write_random_checkpoint."""
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    paths = [os.path.join(d, f) for f in files]
    return paths[:-1], paths[-1:]  # the rest is written last (sorted after "layer*")


def _patch(path: str, name: str, fn) -> None:
    """Replaces tensor ``name`` of a safetensors file in place with ``fn(tensor)`` (same shape and
    dtype), without rewriting the rest of the file."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    with safe_open(path, "pt") as f:
        t = f.get_tensor(name)
    new = fn(t.clone()).to(t.dtype).contiguous()
    assert new.shape == t.shape
    raw = new.view(torch.uint8).numpy().tobytes()
    assert len(raw) == end - begin
    with open(path, "r+b") as f:
        f.seek(8 + n + begin)
        f.write(raw)


def zipf_probs(num_experts: int, s: float, seed: int) -> torch.Tensor:
    """p(e) proportional to 1 / rank(e)^s, the ranks a random permutation of the experts."""
    ranks = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)) + 1
    p = ranks.double() ** -s
    return p / p.sum()


def _skew(d: str, sizes: dict) -> None:
    layers, rest = _shards(d)

    def embed(t):
        t[:, 0] += MASSIVE
        return t

    _patch(rest[0], "model.embed_tokens.weight", embed)
    for i, path in enumerate(layers):
        logp = zipf_probs(sizes["experts"], ZIPF_S, seed=1000 + i).log()

        def router(t, logp=logp):
            # the router's input has coordinate 0 of about MASSIVE / rms(hidden) after the norm:
            # scaled so that the logit offsets are about GAIN * log p(e)
            t[:, 0] = (GAIN * (logp - logp.mean()) / math.sqrt(sizes["hidden"])).to(t.dtype)
            return t

        _patch(path, f"model.layers.{i}.mlp.gate.weight", router)


def checkpoints(sizes: dict, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, str], float]:
    """{routing label: checkpoint dir}, and the seconds spent writing them (0 when cached)."""
    key = "-".join(f"{k}{sizes[k]}" for k in ("hidden", "inter", "experts", "k", "layers", "heads", "vocab"))
    root = os.path.join(_cache_root(), f"qwen3moe-{key}-{dtype_name(dtype)}-v{CACHE_VERSION}")
    zipf = f"zipf(s={ZIPF_S:g})"
    dirs = {"uniform": os.path.join(root, "uniform"), zipf: os.path.join(root, f"zipf{ZIPF_S:g}")}
    if all(os.path.exists(os.path.join(p, "complete")) for p in dirs.values()):
        return dirs, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    tmp = dirs["uniform"] + ".tmp"
    testing.write_random_checkpoint(tmp, "qwen3_moe", sizes, dtype, device)
    shutil.copytree(tmp, dirs[zipf] + ".tmp")
    _skew(dirs[zipf] + ".tmp", sizes)
    for p in dirs.values():
        os.rename(p + ".tmp", p)
        open(os.path.join(p, "complete"), "w").close()
    if hasattr(os, "sync"):
        os.sync()  # the write-back would otherwise share the disk with the reads measured next
    return dirs, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# rows


class CacheRows(links.SuiteRows):
    suite = SUITE

    def decode(self, routing: str, batch: int, impl: str, role: str, m: Measurement, **params) -> Row:
        r = self.row(
            f"decode_{routing.split('(')[0]}", impl, role, batch, routing=routing, batch=batch, **params
        )
        r.record(m)
        r.tokens_per_s = batch / (m.median_ms * 1e-3)
        if "bytes_per_step" in params:
            r.bytes = float(params["bytes_per_step"])
            r.gbps = r.bytes / (m.median_ms * 1e-3) / 1e9
        return r


def judge(rows: list[Row], link_gbps: float) -> None:
    """Floor (bytes that must be read per step over the link), fraction of ceiling floor / time,
    the cold floor for the cache rows; rows faster than their floor are marked unreliable."""
    for r in rows:
        p = r.params
        if r.op == "link" or "floor_bytes_per_step" not in p:
            continue
        p["link_gbps"] = link_gbps
        floor_ms = p["floor_bytes_per_step"] / (link_gbps * 1e9) * 1e3
        p["floor_ms"] = floor_ms
        p["floor_tokens_per_s"] = r.tokens / (floor_ms * 1e-3) if floor_ms > 0 else None
        if "cold_floor_bytes_per_step" in p:
            p["cold_floor_ms"] = p["cold_floor_bytes_per_step"] / (link_gbps * 1e9) * 1e3
        if floor_ms <= 0 or r.status != "ok":
            continue
        r.bound = r.ceiling = "link"
        p["ratio_to_floor"] = r.median_ms / floor_ms
        r.ceiling_fraction = floor_ms / r.median_ms
        if r.ceiling_fraction > 1.0:
            r.status = "unreliable"
            r.reason = (
                f"faster than its floor ({r.median_ms:.3g} ms < {floor_ms:.3g} ms at {link_gbps:.3g} GB/s): "
                "the link was measured low or bytes went uncounted; not a result"
            )


# ---------------------------------------------------------------------------------------------
# measurements


class _Selections:
    """Counts the experts each router selects (forward hooks on the routers)."""

    def __init__(self, model, num_experts: int) -> None:
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.counts = torch.zeros(len(self.routers), num_experts, dtype=torch.int64)
        self.on = False
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        def hook(mod, args, out):
            if self.on:
                self.counts[i] += torch.bincount(out[2].reshape(-1).cpu(), minlength=self.counts.shape[1])

        return hook

    def start(self) -> None:
        self.counts.zero_()
        self.on = True

    def top10_share(self) -> float:
        """Fraction of the selections that go to each layer's 10% most selected experts."""
        n = max(1, math.ceil(0.1 * self.counts.shape[1]))
        top = self.counts.sort(dim=1, descending=True).values[:, :n].sum()
        return float(top / self.counts.sum().clamp(min=1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _inputs(vocab: int, batch: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, PROMPT), generator=g), torch.randint(
        3, vocab, (steps, batch), generator=g
    )


def run_expert_cache_suite(cfg: BenchConfig, dtype: torch.dtype) -> list[Row]:
    """The suite's rows at ``dtype`` (see the module docstring)."""
    dev = cfg.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = dev.type == "cuda"
    shape_name, sizes = cache_model(cfg.shape, dev, cfg.quick)
    steps = 4 if cfg.quick else 16
    warmup = 2 if cfg.quick else 6
    base_steps = 2 if cfg.quick else 4  # the slow methods (layer streaming, accelerate)
    # --quick: the slow methods read every weight each step, so their step time hardly depends on
    # the batch (0.9 s at batch 1 and 8 for layer streaming, 2.6 s / 3.2 s for accelerate on a
    # 2-core CPU): batch 1 only, and no warm-up step beyond the timing loop's own one
    # (--shape tiny takes seconds: every row kept)
    trim = cfg.quick and cfg.shape.name != "tiny"
    base_batches = BATCHES[:1] if trim else BATCHES
    base_warmup = 0 if trim else 1
    dirs, setup_s = checkpoints(sizes, dtype, dev)
    ckpt0 = dirs["uniform"]
    layer_files, other_files = _shards(ckpt0)
    rest = sum(os.path.getsize(f) for f in other_files)
    layer = max(os.path.getsize(f) for f in layer_files)
    ckpt_bytes = rest + sum(os.path.getsize(f) for f in layer_files)
    # The budget: the resident weights + 2 layers (experts included; 2 / layers of the experts) and
    # the read buffers. Layer streaming then gets 2 layer slots (prefetch 1); the cache the same bytes
    # as 3 small layer slots (attention) and as many expert slots as fit.
    # On CPU each mode's read buffers come on top (the planner counts them in the RAM budget; the
    # cache's expert streamer has its own), so both get the same bytes for weights.
    budget = rest + 2 * (layer + (16 << 10))
    staging = 0 if gpu else _C.stream_staging_bytes(links.CHUNK, links.READERS + 1)
    budgets = {"cache": budget + 2 * staging, "layer": budget + staging}
    make = CacheRows(
        shape_name,
        dtype,
        cfg.device,
        model=f"qwen3_moe/{sizes['layers']}L H{sizes['hidden']} I{sizes['inter']} E{sizes['experts']} k{sizes['k']}",
        checkpoint_bytes=ckpt_bytes,
        weight_budget_bytes=budget,
        setup_seconds=round(setup_s, 1),
    )
    storage = "cpu" if gpu else "disk"
    E, L = sizes["experts"], sizes["layers"]

    # ---- link: sequential pieces and expert-sized pieces (the cache reads one expert's slices)
    expert_piece = max(4096, (sizes["hidden"] * sizes["inter"] * torch.finfo(dtype).bits // 8) // 4096 * 4096)
    disk_runs = [links.disk_gbps(layer_files, direct=True)]
    link_rows = [
        make.link(
            "disk O_DIRECT",
            0.0,
            f"cold O_DIRECT reads of the layer shards, {links.READERS} threads, 4 MiB pieces",
        ),
        make.link(
            "disk O_DIRECT expert-sized",
            links.disk_gbps(layer_files, direct=True, chunk=expert_piece, reps=1),
            f"the same in {expert_piece >> 10} KiB pieces (one expert's down_proj; for comparison)",
        ),
    ]
    if gpu:
        link = links.pinned_h2d_gbps(dev, 1 << 30)
        link_rows.append(make.link("h2d pinned", link, "1 GiB pinned host-to-device copy"))

    rows: list[Row] = []
    for routing, ckpt in dirs.items():
        lf = _shards(ckpt)[0]
        drop = None if gpu else (lambda lf=lf: links.drop_page_cache(lf))
        feeds = {B: _inputs(sizes["vocab"], B, warmup + steps + 1, seed=B) for B in BATCHES}

        # ---- ours: the expert cache, then layer streaming, on the same budget
        for mode in ("cache", "layer"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ms.load_offloaded(
                    ckpt,
                    device=dev,
                    max_device_memory=budgets[mode],
                    storage=storage,
                    prefetch=2,
                    num_readers=links.READERS,
                    experts=mode,
                )
            st = get_state(model)
            sel = _Selections(model, E) if mode == "cache" else None
            n = steps if mode == "cache" else base_steps
            for B in BATCHES if mode == "cache" else base_batches:
                prompt, feed = feeds[B]

                def reset(st=st, sel=sel):
                    st.synchronize()
                    st.reset_stats()
                    if sel is not None:
                        sel.start()

                m = links.decode(
                    model,
                    dev,
                    prompt,
                    n,
                    feed=feed,
                    warmup=warmup if mode == "cache" else base_warmup,
                    before=drop,
                    after_warmup=reset,
                )
                s = ms.offload_stats(model)
                calls = n + 1  # the timed steps and measure's own warm-up step
                layer_b = s.get("layer_bytes_read", s["bytes_read"]) / calls
                params = {
                    "storage": storage,
                    "bytes_per_step": s["bytes_read"] / calls,
                    "bytes_per_token": s["bytes_read"] / calls / B,
                    "layer_bytes_per_step": layer_b,
                    "num_slots": int(s["num_slots"]),
                    "device_bytes": int(s["device_bytes"]),
                }
                if mode == "cache":
                    plan = st.plan.experts
                    eb = sum(t.nbytes for t in plan.groups[0].tensors)
                    must = s["expert_misses"] + s["prefetch_load_hits"]
                    look = max(1, s["expert_lookups"])
                    params.update(
                        expert_slots=int(s["expert_slots"]),
                        expert_slot_fraction=s["expert_slots"] / (E * L),
                        expert_bytes=eb,
                        hit_rate=s["expert_hit_rate"],
                        # hits on experts the cache held before the call (prefetched ones not counted)
                        cached_hit_rate=(s["expert_hits"] - s["prefetch_load_hits"]) / look,
                        lookups_per_step=s["expert_lookups"] / calls,
                        selections_per_step=s["expert_selections"] / calls,
                        experts_read_per_step=must / calls,
                        expert_bytes_per_step=s["expert_bytes_read"] / calls,
                        prefetch_precision=s["prefetch_precision"],
                        prefetch_recall=s["prefetch_recall"],
                        top10_share=sel.top10_share(),
                        floor_bytes_per_step=layer_b + must * eb / calls,
                        cold_floor_bytes_per_step=layer_b + s["expert_lookups"] * eb / calls,
                    )
                    impl, role = "moestream experts=cache", "ours"
                else:
                    params.update(floor_bytes_per_step=s["bytes_read"] / calls)
                    impl, role = "moestream experts=layer", "baseline"
                params["note"] = (
                    f"batch {B}, random ids fed (teacher forcing), median of {n} steps after warm-up"
                )
                rows.append(make.decode(routing, B, impl, role, m, **params))
            if sel is not None:
                sel.remove()
            del model, st
            gc.collect()
        if not gpu and not cfg.quick:  # (quick: the link measured at the start and the end only)
            disk_runs.append(links.disk_gbps(layer_files, direct=True))

        # ---- baselines: accelerate on the same checkpoint, and the model in memory
        work = tempfile.mkdtemp(prefix="moestream-bench-xcache-", dir=os.environ.get("MOESTREAM_BENCH_DIR"))
        try:
            off = os.path.join(work, "accelerate-offload")
            base, name = hf_models.accelerate_offloaded(ckpt, dtype, dev, off)
            bfiles = links.files_under(off)
            bdrop = (lambda f=bfiles: links.drop_page_cache(f)) if bfiles else None
            for B in base_batches:
                prompt, feed = feeds[B]
                bm = links.decode(base, dev, prompt, base_steps, feed=feed, warmup=base_warmup, before=bdrop)
                rows.append(make.decode(routing, B, name, "baseline", bm, note=f"batch {B}"))
            del base
            gc.collect()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        mem = hf_models.load_causal_lm(ckpt, dtype, dev)
        for B in BATCHES:
            prompt, feed = feeds[B]
            mm = links.decode(mem, dev, prompt, steps, feed=feed, warmup=warmup)
            rows.append(
                make.decode(
                    routing,
                    B,
                    "transformers in memory",
                    "baseline",
                    mm,
                    note=f"batch {B}, every weight in memory (no budget)",
                    experts_implementation=getattr(mem.config, "_experts_implementation", None),
                )
            )
        del mem
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    if not gpu:
        disk_runs.append(links.disk_gbps(layer_files, direct=True))
        link = max(disk_runs)  # the best judges: a disk measured low would flatter every row
        link_rows[0].params["measurements_gbps"] = disk_runs
    link_rows[0].gbps = max(disk_runs)
    judge(rows, link)
    return link_rows + rows


@register_suite(SUITE, help="decoding an offloaded MoE model through the expert cache vs layer streaming")
def expert_cache_suite(cfg: BenchConfig) -> list[Measured]:
    trim = cfg.quick and cfg.shape.name != "tiny"
    per_routing = 2 * 2 + (1 if trim else 2) * 2  # cache, memory; layer, accelerate
    return Measured.per_dtype(cfg, SUITE, run_expert_cache_suite, expected_rows=2 + 2 * per_routing)
