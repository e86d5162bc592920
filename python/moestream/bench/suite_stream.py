"""Suite ``stream``: weight streaming of a dense Llama-shaped model against the link it streams over
and against accelerate, in the same run.

It writes a random checkpoint (one shard per layer, :func:`moestream.testing.write_random_checkpoint`)
and measures, per dtype:

- ``link``: the raw bandwidth of the link the weights cross (role ``ceiling``): cold reads of the
  layer shards (``disk O_DIRECT`` and ``disk buffered``, page cache dropped before every read) after
  the checkpoint is flushed to disk, and on a GPU pinned host-to-device copies (``h2d pinned``). On
  CPU the disk is measured before, between and after our rows and the best judges them: on a virtual
  disk the first reads after writing the checkpoint ran at 1.0 GB/s, the same reads minutes later at
  2.3 GB/s;
- ``streamer``: the bandwidth the engine sustains streaming every layer through its slots with no
  compute (one timed call = one round through all layers), its fraction of the link as the fraction
  of ceiling (target on GPU: >= 0.85);
- ``decode``: time per decoded token (batch 1, KV cache; tokens = 1) for moestream and for
  accelerate's ``cpu_offload`` (GPU) / ``disk_offload`` (CPU) on the same checkpoint (the baseline,
  so the speedup is the runner's usual one; target on GPU: >= 1.5x); moestream's fraction of ceiling
  is floor / time, the floor being the bytes streamed per token over the link bandwidth (target on
  GPU: time <= 1.15x the floor);
- ``device_memory`` (GPU): peak allocated during decode as a fraction of the max_device_memory budget.

Model: ``--shape llama-3-8b`` / ``llama-3-70b`` (dense shapes) give the sizes, the number of layers is
the suite's (fewer in quick mode and on CPU); ``--shape tiny`` a toy Llama of the tiny shape's sizes
(smoke tests); MoE shapes use the suite's reference model, Llama-3-8B. transformers and accelerate
are imported only when the suite runs.

The streaming engine is reached through the public ``moestream.offload.get_state(model)`` (the
streamer and its units) and ``ms.offload_stats(model)`` (counters) only.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import warnings

import torch

import moestream as ms

from .. import _C, testing
from ..integrations import hf_models
from ..offload import get_state
from . import links
from .core import BenchConfig, Measured, Row, register_suite
from .shapes import Shape, get_shape
from .timing import Measurement, TimingPolicy, measure, synchronize

READERS, CHUNK = links.READERS, links.CHUNK
_drop_page_cache, _files_under, _gbps = links.drop_page_cache, links.files_under, links.gbps
_disk_gbps, _pinned_h2d_gbps = links.disk_gbps, links.pinned_h2d_gbps
# Llama 3's settings besides the sizes of a shape
_LLAMA3 = {"max_pos": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def _layers(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 8 if quick else 32
    return 4 if quick else 8


def stream_model(shape: Shape, device: torch.device, quick: bool) -> tuple[str, str, dict]:
    """-> (shape name of the rows, model name of the rows' params, the Llama's sizes in
    :mod:`moestream.testing`'s generic names)."""
    if shape.name == "tiny":
        # more layers than the 3 slots of the suite's budget, so that layers are streamed
        layers, model = max(6, shape.num_layers), "custom"
        sizes = {**shape.model_sizes(), "inter": 2 * shape.hidden, "max_pos": 256}
    else:
        layers, model = _layers(device, quick), "custom"
        if shape.is_moe or shape.name == "llama-3-8b":
            shape, model = get_shape("llama-3-8b"), "llama3-8b"
        sizes = shape.model_sizes()
    return shape.name, f"{model}/{layers}L", {**_LLAMA3, **sizes, "layers": layers}


# ---------------------------------------------------------------------------------------------
# rows


class StreamRows(links.SuiteRows):
    """Makes the suite's rows: shape, dtype and device of the run, and the params every row has."""

    suite = "stream"

    def __init__(self, shape: str, dtype: torch.dtype, device: torch.device, **params) -> None:
        super().__init__(shape, dtype, device, **params)
        self.gpu = device.type == "cuda"

    def streamer(self, storage: str, gbps: float, note: str) -> Row:
        """Judged against the link by :func:`judge`."""
        r = self.row(
            "streamer", f"moestream ({storage})", note=note, target_fraction=0.85 if self.gpu else None
        )
        r.gbps = gbps
        r.bound = r.ceiling = "link"
        return r

    def decode(self, m: Measurement, bytes_per_token: int, **params) -> Row:
        """moestream's time per token; judged against the link by :func:`judge`."""
        r = self.row(
            "decode",
            tokens=1,
            bytes_per_token=bytes_per_token,
            target_ratio=1.15 if self.gpu else None,
            note="batch 1, KV cache, median over steps",
            **params,
        )
        r.record(m)
        r.bytes = float(bytes_per_token)
        r.gbps = bytes_per_token / (m.median_ms * 1e-3) / 1e9
        r.bound = r.ceiling = "link"
        return r

    def baseline(self, impl: str, m: Measurement) -> Row:
        r = self.row("decode", impl, "baseline", tokens=1, target_speedup=1.5 if self.gpu else None)
        r.record(m)
        return r

    def device_memory(self, peak: int, budget: int, weights_bytes: int) -> Row:
        r = self.row(
            "device_memory",
            peak_bytes=peak,
            budget_bytes=budget,
            weights_bytes=weights_bytes,
            within_budget=peak <= budget,
            note="peak allocated during decode (weights, KV cache, activations) vs max_device_memory",
        )
        r.bytes = float(peak)
        r.ceiling = "budget"
        r.ceiling_fraction = peak / budget if budget else None
        if peak > budget:
            r.status, r.reason = "error", "peak device memory above max_device_memory"
        return r


def judge(rows: list[Row], link_gbps: float) -> None:
    """The streamer rows' fraction of the link, and the decode rows' floor (bytes streamed per token
    over the link bandwidth; 0 when every layer is resident) and fraction of ceiling floor / time."""
    for r in rows:
        if r.op == "streamer":
            r.params["link_gbps"] = link_gbps
            r.ceiling_fraction = r.gbps / link_gbps
        elif r.op == "decode" and r.role == "ours":
            floor_ms = r.params["bytes_per_token"] / (link_gbps * 1e9) * 1e3
            r.params["floor_ms"] = floor_ms
            if floor_ms > 0:
                r.params["ratio_to_floor"] = r.median_ms / floor_ms
                r.ceiling_fraction = floor_ms / r.median_ms


# ---------------------------------------------------------------------------------------------
# measurements


def _streamer_gbps(model, device: torch.device, rounds: int, before=None) -> float:
    """Every unit through the slots, ``rounds`` timed rounds with no compute in between; the bytes
    of a round are the bytes loaded over all rounds (warm-up included) per round."""
    st = get_state(model)
    s, units = st.streamer, st.units

    def one_round():
        for i, u in enumerate(units):
            s.acquire(i, u.ahead)
            s.release(i)

    synchronize(device)
    s.synchronize()
    b0 = ms.offload_stats(model)["bytes_loaded"]
    m = measure([one_round], device, TimingPolicy.fixed(rounds), before=before)
    s.synchronize()  # the prefetches issued for a next round are not counted
    loaded = ms.offload_stats(model)["bytes_loaded"] - b0 - sum(units[j].nbytes for j in units[-1].ahead)
    return _gbps(max(loaded, 0) / (rounds + 1), m)


def _decode(
    model, device: torch.device, vocab: int, steps: int, prompt: int = 16, before=None
) -> Measurement:
    """The time per decoded token: a prompt, then one warm-up and ``steps`` timed greedy steps of
    batch 1 with the KV cache (``steps + 2`` forwards in all)."""
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    return links.decode(model, device, ids, steps, before=before)


def run_stream_suite(cfg: BenchConfig, dtype: torch.dtype) -> list[Row]:
    """The suite's rows at ``dtype`` (see the module docstring)."""
    dev = cfg.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = dev.type == "cuda"
    shape_name, model_name, sizes = stream_model(cfg.shape, dev, cfg.quick)
    steps = 4 if cfg.quick else 16
    work = tempfile.mkdtemp(prefix="moestream-bench-stream-", dir=os.environ.get("MOESTREAM_BENCH_DIR"))
    try:
        ckpt = os.path.join(work, "ckpt")
        os.makedirs(ckpt)
        t0 = time.perf_counter()
        layer_files, other_files = testing.write_random_checkpoint(ckpt, "llama", sizes, dtype, dev)
        ckpt_bytes = sum(os.path.getsize(f) for f in layer_files + other_files)
        if hasattr(os, "sync"):
            os.sync()  # the checkpoint's write-back would otherwise share the disk with the reads below
        make = StreamRows(
            shape_name,
            dtype,
            cfg.device,
            model=model_name,
            checkpoint_bytes=ckpt_bytes,
            setup_seconds=time.perf_counter() - t0,
        )

        # ---- link (on CPU measured again between and after our rows; the best judges them)
        disk_runs = [_disk_gbps(layer_files, direct=True)]
        rows = [
            make.link(
                "disk O_DIRECT",
                disk_runs[0],
                f"cold O_DIRECT reads of the layer shards, {READERS} threads, {CHUNK >> 20} MiB pieces",
            ),
            make.link(
                "disk buffered",
                _disk_gbps(layer_files, direct=False),
                "cold reads through the page cache (for comparison)",
            ),
        ]
        if gpu:
            link = _pinned_h2d_gbps(dev, 1 << 30)
            rows.append(make.link("h2d pinned", link, "1 GiB pinned host-to-device copy"))
            storage = "cpu"
        else:
            link = disk_runs[0]
            storage = "disk"

        # ---- ours. The budget: resident weights + 3 layer slots (prefetch 2) + 64 MiB for the KV
        # cache and activations (shard sizes: the tensors plus a header of a few KiB)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        rest = sum(os.path.getsize(f) for f in other_files)
        budget = rest + 3 * (max(os.path.getsize(f) for f in layer_files) + (1 << 20)) + (64 << 20)
        if not gpu:
            budget += _C.stream_staging_bytes(CHUNK, READERS + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ms.load_offloaded(
                ckpt, device=dev, max_device_memory=budget, storage=storage, prefetch=2, num_readers=READERS
            )
        s0 = ms.offload_stats(model)
        per_token = s0["streamed_bytes"] if s0["num_slots"] < s0["units"] else 0
        drop = (lambda: _drop_page_cache(layer_files)) if storage == "disk" else None
        streamer = _streamer_gbps(model, dev, rounds=2 if cfg.quick else 4, before=drop)
        ours = [make.streamer(storage, streamer, "all layers through the slots, no compute")]
        if not gpu:
            disk_runs.append(_disk_gbps(layer_files, direct=True))
        else:
            torch.cuda.reset_peak_memory_stats(dev)
        l0 = ms.offload_stats(model)["bytes_loaded"]
        m = _decode(model, dev, sizes["vocab"], steps, before=drop)
        loaded_per_forward = (ms.offload_stats(model)["bytes_loaded"] - l0) / (steps + 2)
        ours.append(
            make.decode(
                m,
                per_token,
                loaded_bytes_per_forward=loaded_per_forward,
                storage=storage,
                num_slots=int(s0["num_slots"]),
            )
        )
        if gpu:
            ours.append(
                make.device_memory(torch.cuda.max_memory_allocated(dev), budget, int(s0["device_bytes"]))
            )
        del model
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        else:
            disk_runs.append(_disk_gbps(layer_files, direct=True))
            rows[0].params["measurements_gbps"] = disk_runs
            rows[0].gbps = link = max(disk_runs)
        judge(ours, link)
        rows += ours

        # ---- on a GPU, also disk -> pinned staging -> device
        if gpu and not cfg.quick:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ms.load_offloaded(ckpt, device=dev, storage="disk", prefetch=2, num_readers=READERS)
            sd = _streamer_gbps(model, dev, rounds=2, before=lambda: _drop_page_cache(layer_files))
            disk_row = make.streamer("disk", sd, "disk -> pinned staging -> device")
            judge([disk_row], min(rows[0].gbps, link))
            rows.append(disk_row)
            del model
            gc.collect()
            torch.cuda.empty_cache()

        # ---- baseline: accelerate on the same checkpoint
        base, name = hf_models.accelerate_offloaded(
            ckpt, dtype, dev, os.path.join(work, "accelerate-offload")
        )
        bfiles = _files_under(os.path.join(work, "accelerate-offload"))
        bdrop = (lambda: _drop_page_cache(bfiles)) if bfiles else None
        bm = _decode(base, dev, sizes["vocab"], max(2, steps // 2), before=bdrop)
        rows.append(make.baseline(name, bm))
        del base
        gc.collect()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


@register_suite("stream")
def stream_suite(cfg: BenchConfig) -> list[Measured]:
    return Measured.per_dtype(cfg, "stream", run_stream_suite, expected_rows=6)
