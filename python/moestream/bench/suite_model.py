"""Suite ``model``: whole small transformers MoE models (a Qwen3-MoE and a Mixtral, random weights),
patched with moestream versus transformers' own experts implementations, forward and training step.

The measuring is :func:`moestream.integrations.bench_model.run_model_suite` (its own harness times
the implementations round-robin); this module turns its rows into the runner's rows: one
(model phase, implementation) row per dtype, with the median and quantiles, tokens/s, the relative
error of the logits against transformers eager, and the runner's speedups against the two
transformers baselines. transformers is imported only when the suite runs.

Sizes: the suite's own models (they are not the layer shapes of ``--shape``); with ``--shape tiny``
toy sizes (smoke tests, seconds on CPU).
"""

from __future__ import annotations

import torch

from .core import BenchConfig, Measured, Row, dtype_name, register_suite

# --shape tiny: the same models at toy sizes
TINY = dict(
    layers=1,
    batch=1,
    seq=32,
    overrides=dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
)

_IMPL_NAMES = {  # bench_model's labels -> short impl names for the table
    "transformers eager": "hf-eager",
    "transformers grouped_mm": "hf-grouped_mm",
    "transformers router + moestream experts": "hf-router+moestream",
    "moestream patch_moe": "moestream",
}


def rows_from_model_suite(out: list[dict], shape_name: str, dtype: torch.dtype, device: torch.device) -> list[Row]:
    """bench_model's row dicts -> runner rows (speedups are added by the runner)."""
    rows = []
    for d in out:
        model, _, phase = d["op"].partition(" ")
        params = {"model": model, "phase": phase}
        params.update({k: d[k] for k in ("layers", "batch", "seq") if k in d})
        row = Row(
            suite="model",
            op=d["op"].replace(" ", "_"),
            impl=_IMPL_NAMES.get(d["impl"], d["impl"]),
            role="baseline" if d.get("baseline") else "ours",
            shape=shape_name,
            tokens=int(d["tokens"]),
            dtype=dtype_name(dtype),
            device=str(device),
            params=params,
        )
        if d.get("median_ms") is None:
            row.status = "skipped"
            row.reason = d.get("reason") or "did not run"
            if row.role == "baseline":
                row.reason = row.reason.splitlines()[0][:300]
            else:
                row.status, row.reason = "error", row.reason.splitlines()[0][:300]
        else:
            row.status = "ok"
            row.median_ms = d["median_ms"]
            for k in ("p10_ms", "p25_ms", "p75_ms", "p90_ms"):
                setattr(row, k, d.get(k))
            row.reps = int(d.get("reps") or 0)
            row.sets = 1
            if row.p10_ms is not None and row.median_ms > 0:
                row.spread = (row.p90_ms - row.p10_ms) / (2 * row.median_ms)
            row.tokens_per_s = d.get("tokens_per_s")
            row.error = d.get("rel_err")
        rows.append(row)
    return rows


@register_suite("model")
def model_suite(cfg: BenchConfig) -> list[Measured]:
    tiny = cfg.shape.name == "tiny"

    def item(dt: torch.dtype) -> Measured:
        def run() -> list[Row]:
            from moestream.integrations.bench_model import run_model_suite

            kw = dict(TINY) if tiny else {}
            out = run_model_suite(str(cfg.device), dt, cfg.quick, **kw)
            return rows_from_model_suite(out, cfg.shape.name if tiny else "small-models", dt, cfg.device)

        return Measured(
            suite="model",
            label=f"model {dtype_name(dt)}",
            dtype=dt,
            device=cfg.device,
            run=run,
            expected_rows=16,
            params={"tiny": tiny},
        )

    return [item(dt) for dt in cfg.dtypes]
