"""Suite ``model``: whole small transformers MoE models, patched with :func:`moestream.patch_moe`
versus transformers' own experts implementations, in the same run.

For each model (a Qwen3-MoE and a Mixtral with random weights, nothing downloaded: the families'
``"bench"`` size in :data:`moestream.testing.FAMILIES`, small but shaped like the real thing) and
each phase (``forward``: inference without autograd; ``train``: forward with the LM loss and
backward), the implementations, timed round-robin so that load changes on the machine hit them
alike:

- ``hf-eager``, ``hf-grouped_mm``: transformers with ``experts_implementation`` ``"eager"`` and
  ``"grouped_mm"`` (the baselines);
- ``hf-router+moestream``: ``"moestream"`` as transformers' experts implementation (transformers'
  router, moestream's expert path);
- ``moestream``: :func:`moestream.patch_moe`, the whole MoE block on moestream (fused router +
  expert path).

Rows: ``<model>_<phase>`` per dtype (tokens = batch x seq; the runner adds tokens/s and the speedups
against the two baselines), ``error`` = relative error of the logits against transformers eager at
the bench dtype, as a sanity gate. Sizes are the suite's own (not the layer shapes of ``--shape``);
``--shape tiny`` runs the ``"bench-tiny"`` size (seconds on a CPU). transformers is imported only
when the suite runs.
"""

from __future__ import annotations

import copy

import torch

import moestream as ms

from .. import testing
from .core import BenchConfig, Measured, Row, describe_failure, dtype_name, register_suite
from .timing import TimingPolicy, measure_round_robin

MODELS = ("qwen3_moe", "mixtral")  # families of moestream.testing.FAMILIES
# row impl -> transformers' experts implementation of the unpatched model (None: the patched model)
IMPLS = {
    "hf-eager": "eager",
    "hf-grouped_mm": "grouped_mm",
    "hf-router+moestream": "moestream",
    "moestream": None,
}
BASELINES = ("hf-eager", "hf-grouped_mm")
PHASES = ("forward", "train")


def model_sizes(cfg: BenchConfig) -> dict:
    """Size name, layers, batch and sequence length of this run."""
    if cfg.shape.name == "tiny":
        return {"size": "bench-tiny", "layers": 1, "batch": 1, "seq": 32}
    if cfg.device.type == "cuda":
        batch, seq = (4, 512) if cfg.quick else (8, 1024)
    else:
        batch, seq = (1, 128) if cfg.quick else (2, 256)
    # quick: one decoder layer (the training step's eager baseline writes every expert's full
    # weight gradient once per expert and takes seconds per layer on a CPU)
    return {"size": "bench", "layers": 1 if cfg.quick else 4, "batch": batch, "seq": seq}


def timing_policy(quick: bool) -> TimingPolicy:
    """Whole-model calls take 0.05..2 s: three repetitions in quick mode (the correctness check's
    call is their warm-up); otherwise up to 20 within 7.5 s per implementation (30 s per model
    phase)."""
    if quick:
        return TimingPolicy.fixed(3)
    return TimingPolicy(budget_s=7.5, warmup_s=1.0, min_reps=3, max_reps=20, slow_reps=3)


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


def _with_experts(model, implementation: str, fn):
    def run():
        model.set_experts_implementation(implementation)
        return fn()

    return run


def model_row(
    family: str, phase: str, impl: str, cfg: BenchConfig, dtype: torch.dtype, sizes: dict, shape: str
) -> Row:
    params = {"model": family, "phase": phase, **{k: sizes[k] for k in ("layers", "batch", "seq")}}
    return Row(
        suite="model",
        op=f"{family}_{phase}",
        impl=impl,
        role="baseline" if impl in BASELINES else "ours",
        shape=shape,
        tokens=sizes["batch"] * sizes["seq"],
        dtype=dtype_name(dtype),
        device=str(cfg.device),
        params=params,
    )


def _bench_model(family: str, cfg: BenchConfig, dtype: torch.dtype, sizes: dict, shape: str) -> list[Row]:
    model = testing.build_model(
        family, sizes["size"], dtype, attn_implementation="sdpa", layers=sizes["layers"]
    ).to(cfg.device)
    patched = copy.deepcopy(model)
    ms.patch_moe(patched)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (sizes["batch"], sizes["seq"]), generator=g).to(
        cfg.device
    )
    policy = timing_policy(cfg.quick)
    rows: list[Row] = []
    for phase in PHASES:
        model.train(phase == "train")
        patched.train(phase == "train")
        model.set_experts_implementation("eager")
        with torch.no_grad():
            ref = model(ids).logits.float()
        fns, by_impl = {}, {}
        for impl, experts in IMPLS.items():
            row = by_impl[impl] = model_row(family, phase, impl, cfg, dtype, sizes, shape)
            rows.append(row)
            fn = (
                _phase_fn(patched, ids, phase)
                if experts is None
                else _with_experts(model, experts, _phase_fn(model, ids, phase))
            )
            try:
                out = fn().detach().float()  # also the first warm-up call
                row.error = testing.rel_err(out, ref)
                fns[impl] = [fn]
            except Exception as e:  # noqa: BLE001  (e.g. grouped_mm unsupported for this dtype / device)
                row.status, row.reason = describe_failure(e, row.role)
        if fns:
            for impl, m in measure_round_robin(fns, cfg.device, policy, warmed=True).items():
                by_impl[impl].record(m)
    return rows


def run_model_suite(cfg: BenchConfig, dtype: torch.dtype) -> list[Row]:
    """The suite's rows at ``dtype``: every (model, phase, implementation)."""
    sizes = model_sizes(cfg)
    shape = cfg.shape.name if sizes["size"] == "bench-tiny" else "small-models"
    rows: list[Row] = []
    for family in MODELS:
        rows += _bench_model(family, cfg, dtype, sizes, shape)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@register_suite("model")
def model_suite(cfg: BenchConfig) -> list[Measured]:
    n_rows = len(MODELS) * len(PHASES) * len(IMPLS)
    return Measured.per_dtype(cfg, "model", run_model_suite, n_rows, tiny=cfg.shape.name == "tiny")
