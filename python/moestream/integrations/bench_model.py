"""Bench suite ``model``: whole small transformers MoE models, patched with :func:`moestream.patch_moe`
versus transformers' own experts implementations, in the same run.

For each model (a small Qwen3-MoE and a small Mixtral, random weights from a config, nothing
downloaded) and each phase (``forward``: inference without autograd; ``train``: forward with the
LM loss and backward) it times:

- transformers with ``experts_implementation`` ``"eager"`` and ``"grouped_mm"`` (the baselines; the
  faster one is "transformers' best");
- ``"moestream"`` as transformers' experts implementation (transformers' router, moestream experts);
- ``patch_moe``: the whole MoE block on moestream (fused router + expert path).

Rows: ``op`` (model and phase), ``impl``, ``tokens`` per call, ``median_ms``, ``tokens_per_s`` and
``speedup`` against transformers' best in the same run, plus ``rel_err`` of the logits against
transformers eager at the bench dtype, as a sanity gate.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["run_model_suite", "MODELS"]

# small but shaped like the real thing (expert width / hidden ratio, experts, k)
MODELS = {
    "qwen3_moe": dict(
        config="Qwen3MoeConfig",
        model="Qwen3MoeForCausalLM",
        kwargs=dict(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1536,
            moe_intermediate_size=192,
            num_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "mixtral": dict(
        config="MixtralConfig",
        model="MixtralForCausalLM",
        kwargs=dict(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1792,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
        ),
    ),
}

BASELINES = ("eager", "grouped_mm")


def _build(name: str, layers: int, device: str, dtype: torch.dtype, overrides: dict | None = None):
    import transformers

    spec = MODELS[name]
    kwargs = dict(spec["kwargs"])
    kwargs.update({k: v for k, v in (overrides or {}).items() if k in kwargs})
    cfg = getattr(transformers, spec["config"])(
        num_hidden_layers=layers, max_position_embeddings=4096, initializer_range=0.05, **kwargs
    )
    torch.manual_seed(0)
    model = getattr(transformers, spec["model"])._from_config(
        cfg, attn_implementation="sdpa", experts_implementation="eager", dtype=dtype
    )
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, device: str, warmup: int, reps: int, budget_s: float) -> dict[str, float]:
    """Median wall time in ms of each closure in ``fns``, timed round-robin (one call of each per
    round) so that load changes on the machine hit every implementation alike."""
    return {k: statistics.median(v) for k, v in _times_interleaved(fns, device, warmup, reps, budget_s).items()}


def _times_interleaved(
    fns: dict, device: str, warmup: int, reps: int, budget_s: float
) -> dict[str, list[float]]:
    """The wall times in ms of every timed call of each closure (see :func:`_time_interleaved`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times[k]) >= 3:
            break
    return {k: [t * 1e3 for t in v] for k, v in times.items()}


def _quantiles(ms: list[float]) -> dict:
    xs = sorted(ms)

    def q(f: float) -> float:
        pos = (len(xs) - 1) * f
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"p10_ms": q(0.1), "p25_ms": q(0.25), "p75_ms": q(0.75), "p90_ms": q(0.9), "reps": len(xs)}


def _phase_fn(model, ids, phase: str):
    if phase == "forward":

        def run():
            with torch.no_grad():
                return model(ids).logits

    else:

        def run():
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=ids)
            out.loss.backward()
            return out.logits

    return run


def run_model_suite(
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = False,
    *,
    layers: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    overrides: dict | None = None,
    models: tuple[str, ...] | None = None,
) -> list[dict]:
    """Time the ``model`` suite; returns one row per (model, phase, implementation).

    ``layers``, ``batch``, ``seq`` replace the defaults of the run kind; ``overrides`` replaces
    config sizes of every model that has them (e.g. ``hidden_size``, ``moe_intermediate_size``,
    ``vocab_size``: smoke tests use toy sizes); ``models`` picks some of :data:`MODELS`."""
    import transformers  # noqa: F401  (the suite needs transformers; the caller turns ImportError into a skip)

    device = str(device)
    gpu = device.startswith("cuda")
    d_batch, d_seq = (1, 128) if quick and not gpu else (2, 256) if not gpu else (4, 512) if quick else (8, 1024)
    layers = layers or (2 if quick else 4)
    batch, seq = batch or d_batch, seq or d_seq
    reps, warmup, budget = (3, 1, 5.0) if quick else (20, 3, 30.0)
    rows: list[dict] = []
    for name in models or tuple(MODELS):
        rows += _bench_model(name, layers, batch, seq, device, dtype, (warmup, reps, budget), overrides)
        if gpu:
            torch.cuda.empty_cache()
    for r in rows:
        r.update(
            device=torch.cuda.get_device_name() if gpu else "cpu", dtype=str(dtype).replace("torch.", "")
        )
    return rows


def _bench_model(
    name: str, layers: int, batch: int, seq: int, device: str, dtype: torch.dtype, timing, overrides=None
) -> list[dict]:
    import copy

    import moestream as ms

    model = _build(name, layers, device, dtype, overrides)
    patched = copy.deepcopy(model)
    ms.patch_moe(patched)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    tokens = batch * seq
    rows: list[dict] = []

    def with_impl(impl: str, fn):
        def run():
            model.set_experts_implementation(impl)
            return fn()

        return run

    for phase in ("forward", "train"):
        model.train(phase == "train")
        patched.train(phase == "train")
        model.set_experts_implementation("eager")
        with torch.no_grad():
            ref = model(ids).logits.float()
        fns, errs = {}, {}
        for impl in (*BASELINES, "moestream", "patch_moe"):
            fn = (
                _phase_fn(patched, ids, phase)
                if impl == "patch_moe"
                else with_impl(impl, _phase_fn(model, ids, phase))
            )
            try:
                out = fn().detach().float()  # also the first warm-up call
                errs[impl] = ((out - ref).norm() / ref.norm()).item()
                fns[impl] = fn
            except Exception as e:  # e.g. grouped_mm unsupported for this dtype / device
                rows.append(
                    _row(
                        name, phase, impl, tokens, None, None, reason=f"{type(e).__name__}: {e}",
                        layers=layers, batch=batch, seq=seq,
                    )
                )
        times = _times_interleaved(fns, device, *timing)
        results = {k: statistics.median(v) for k, v in times.items()}
        best = min((results[b] for b in BASELINES if b in results), default=None)
        for impl, t in results.items():
            rows.append(
                _row(
                    name, phase, impl, tokens, t, best, rel_err=errs[impl], **_quantiles(times[impl]),
                    layers=layers, batch=batch, seq=seq,
                )
            )
    return rows


def _row(
    model: str, phase: str, impl: str, tokens: int, ms_: float | None, best: float | None, **extra
) -> dict:
    label = {
        "eager": "transformers eager",
        "grouped_mm": "transformers grouped_mm",
        "moestream": "transformers router + moestream experts",
        "patch_moe": "moestream patch_moe",
    }[impl]
    row = {
        "op": f"{model} {phase}",
        "impl": label,
        "tokens": tokens,
        "median_ms": ms_,
        "tokens_per_s": None if ms_ is None else tokens / (ms_ / 1e3),
        "speedup": None if (ms_ is None or best is None) else best / ms_,
        "baseline": impl in BASELINES,
    }
    row.update(extra)
    return row


def _main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="moestream bench suite 'model' (standalone)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run_model_suite(a.device, getattr(torch, a.dtype), a.quick)
    for r in rows:
        if r["median_ms"] is None:
            print(f"{r['op']:<20} {r['impl']:<42} skipped: {r.get('reason')}")
        else:
            sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            print(
                f"{r['op']:<20} {r['impl']:<42} {r['median_ms']:9.2f} ms {r['tokens_per_s']:12.0f} tok/s {sp:>7}"
                f"  err {r['rel_err']:.1e}"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    _main()
