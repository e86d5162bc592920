"""Suite ``stream``: weight streaming of a dense Llama-shaped model against the link it streams over
and against accelerate, in the same run.

The measuring is :func:`moestream.offload.bench_stream.run_stream_suite` (it writes a random
checkpoint, measures the link, the streamer's bandwidth, the time per decoded token against its
floor and accelerate's offloading on the same checkpoint); this module turns its measurements into
the runner's rows, per dtype:

- ``link``: the raw bandwidth of the link (role ``ceiling``): cold disk reads (O_DIRECT and
  buffered) and, on a GPU, pinned host-to-device copies;
- ``streamer``: moestream's streaming bandwidth with no compute, its fraction of the link as the
  fraction of ceiling;
- ``decode``: time per decoded token (batch 1, KV cache; tokens = 1) for moestream and for
  accelerate (the baseline, so the speedup is the runner's usual one); moestream's fraction of
  ceiling is floor / time, the floor being the bytes streamed per token over the link bandwidth;
- ``device_memory`` (GPU): peak allocated during decode as a fraction of the budget.

Model: ``--shape llama-3-8b`` / ``llama-3-70b`` (dense shapes) give the sizes, the number of layers
is the streaming suite's (fewer in quick mode and on CPU); ``--shape tiny`` a toy Llama of the tiny
shape's sizes (smoke tests); MoE shapes use the suite's reference model, Llama-3-8B.
transformers and accelerate are imported only when the suite runs.
"""

from __future__ import annotations

import torch

from .core import BenchConfig, Measured, Row, dtype_name, register_suite
from .shapes import Shape


def stream_model(shape: Shape, device: torch.device, quick: bool) -> tuple[str, dict | str | None]:
    """-> (name for the rows, the ``shape`` argument of run_stream_suite)."""
    from moestream.offload.bench_stream import _layers

    if shape.name == "tiny":
        return shape.name, {
            "vocab_size": shape.vocab_size,
            "hidden_size": shape.hidden,
            "intermediate_size": 2 * shape.hidden,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            # more layers than the 3 slots the suite's budget holds, so that layers are streamed
            "num_hidden_layers": max(6, shape.num_layers),
            "max_position_embeddings": 256,
        }
    if shape.is_moe or shape.name == "llama-3-8b":
        return "llama-3-8b", None
    return shape.name, {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "num_hidden_layers": _layers(device.type, quick),
    }


_LINK_NAMES = {
    "link_disk_read": "disk O_DIRECT",
    "link_disk_read_buffered": "disk buffered",
    "link_h2d_pinned": "h2d pinned",
}
_KEEP = (
    "note",
    "storage",
    "num_slots",
    "link_gbps",
    "target_fraction",
    "floor_ms",
    "ratio_to_floor",
    "target_ratio",
    "bytes_per_token",
    "loaded_bytes_per_forward",
    "target_speedup",
    "budget_bytes",
    "weights_bytes",
    "within_budget",
    "checkpoint_bytes",
    "setup_seconds",
)


def rows_from_stream_suite(out: list[dict], shape_name: str, dtype: torch.dtype, device: torch.device) -> list[Row]:
    """bench_stream's measurement dicts -> runner rows (speedups are added by the runner)."""
    rows = []
    for d in out:
        name = d["name"]
        params = {"model": d.get("shape")}
        params.update({k: d[k] for k in _KEEP if d.get(k) is not None})
        row = Row(
            suite="stream",
            op=name,
            impl="moestream",
            role="ours",
            shape=shape_name,
            tokens=0,
            dtype=dtype_name(dtype),
            device=str(device),
            status="ok",
            params=params,
        )
        if name in _LINK_NAMES:
            row.op, row.impl, row.role = "link", _LINK_NAMES[name], "ceiling"
            row.gbps = d["gbps"]
        elif name.startswith("streamer_"):
            row.op, row.impl = "streamer", f"moestream ({name[len('streamer_'):]})"
            row.gbps = d["gbps"]
            row.bound, row.ceiling, row.ceiling_fraction = "link", "link", d.get("fraction_of_link")
        elif name in ("decode", "decode_baseline"):
            row.op, row.tokens = "decode", 1
            row.median_ms = d["median_ms"]
            for k in ("p10_ms", "p25_ms", "p75_ms", "p90_ms"):
                setattr(row, k, d.get(k))
            row.reps, row.sets = int(d.get("reps") or 0), 1
            if row.p10_ms is not None and row.median_ms > 0:
                row.spread = (row.p90_ms - row.p10_ms) / (2 * row.median_ms)
            if name == "decode":
                row.gbps = d.get("gbps")
                row.bytes = float(d.get("bytes_per_token") or 0)
                row.bound, row.ceiling = "link", "link"
                if d.get("floor_ms"):
                    row.ceiling_fraction = d["floor_ms"] / d["median_ms"]
            else:
                row.impl, row.role = d["baseline"], "baseline"
        elif name == "device_memory":
            row.bytes = float(d["peak_bytes"])
            row.ceiling = "budget"
            row.ceiling_fraction = d["peak_bytes"] / d["budget_bytes"] if d.get("budget_bytes") else None
            row.params["peak_bytes"] = d["peak_bytes"]
            if not d.get("within_budget", True):
                row.status, row.reason = "error", "peak device memory above max_device_memory"
        rows.append(row)
    return rows


@register_suite("stream")
def stream_suite(cfg: BenchConfig) -> list[Measured]:
    def item(dt: torch.dtype) -> Measured:
        def run() -> list[Row]:
            from moestream.offload.bench_stream import run_stream_suite

            name, shape_arg = stream_model(cfg.shape, cfg.device, cfg.quick)
            out = run_stream_suite(str(cfg.device), dt, shape_arg, cfg.quick)
            return rows_from_stream_suite(out, name, dt, cfg.device)

        return Measured(
            suite="stream",
            label=f"stream {dtype_name(dt)}",
            dtype=dt,
            device=cfg.device,
            run=run,
            expected_rows=6,
        )

    return [item(dt) for dt in cfg.dtypes]
