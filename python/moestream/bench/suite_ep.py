"""Suite ``ep``: expert parallelism at world size 2 (two CPU processes on gloo; on CUDA, NCCL needs
two GPUs) against one process on the same total batch.

One MoE layer of the shape (``moestream.nn.MoE``: router + experts, the shape's E, k, H, I), a
training step (forward and backward of sum(out * grad_out)) on T tokens in total:

- ``ep/train_step`` ``single-process``: one process, all experts, T tokens (the baseline);
- ``ep/train_step`` ``moestream-ep2``: two processes, E / 2 experts each, T / 2 tokens each, the
  tokens exchanged by all-to-all (``moestream.parallelize_experts``); the time is rank 0's step,
  every step started together (a barrier, not timed);
- ``ep/a2a_bytes`` ``moestream-ep2``: the bytes of rows the forward all-to-alls (dispatch and
  combine) sent between the ranks per step, summed over both ranks (the ``ExpertParallel``
  counters), against the theoretical T * k * H * bytes * (W - 1) / W per direction under uniform
  routing (``params.theoretical_bytes`` for both directions, ``params.ratio`` = measured /
  theoretical). The backward moves as many bytes again.

Both processes share the machine's cores with each other, so on a CPU the step time mostly
measures the exchange's overhead, not a speedup. The NCCL path is not exercised on a machine
without two GPUs (the suite then runs on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

import moestream as ms

from .. import testing
from .core import BenchConfig, Measured, Row, SuiteSkip, Unavailable, dtype_name, register_suite
from .timing import Measurement, TimingPolicy, measure

WORLD = 2


def _tokens(cfg: BenchConfig) -> list[int]:
    return [max(WORLD, T - T % WORLD) for T in cfg.tokens]


def _policy(quick: bool) -> TimingPolicy:
    return TimingPolicy.fixed(3 if quick else 10)  # both ranks must run the same number of steps


def _layer(cfg: BenchConfig, dtype: torch.dtype, device) -> ms.nn.MoE:
    s = cfg.shape
    torch.manual_seed(0)
    return ms.nn.MoE(
        s.hidden, s.intermediate, s.num_experts, s.top_k, "qwen3_moe", device=device, dtype=dtype
    )


def _step_fn(model, x, go):
    def step():
        model.zero_grad(set_to_none=True)
        (model(x) * go).sum().backward()

    return step


def _inputs(cfg, dtype, T, device, rank=0, world=1):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, cfg.shape.hidden, generator=g).to(device, dtype)
    go = torch.randn(T, cfg.shape.hidden, generator=g).to(device, dtype)
    n = T // world
    return x[rank * n : (rank + 1) * n].requires_grad_(True), go[rank * n : (rank + 1) * n]


def _row(cfg, dtype, T, op, impl, role) -> Row:
    s = cfg.shape
    return Row(
        suite="ep",
        op=op,
        impl=impl,
        role=role,
        shape=s.name,
        tokens=T,
        dtype=dtype_name(dtype),
        device=str(cfg.device),
        params={"world": WORLD, "experts": s.num_experts, "k": s.top_k, "hidden": s.hidden},
    )


def run_ep_suite(cfg: BenchConfig, dtype: torch.dtype) -> list[Row]:
    s = cfg.shape
    tokens = _tokens(cfg)
    rows: list[Row] = []
    # the baseline: one process, the whole batch
    model = _layer(cfg, dtype, cfg.device)
    base = {}
    for T in tokens:
        x, go = _inputs(cfg, dtype, T, cfg.device)
        row = _row(cfg, dtype, T, "train_step", "single-process", "baseline")
        row.flops = 3 * 2 * T * s.top_k * 3 * s.hidden * s.intermediate
        row.record(measure([_step_fn(model, x, go)], cfg.device, _policy(cfg.quick)))
        base[T] = row
    # world 2: two worker processes
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"shape": s.name, "dtype": dtype_name(dtype), "tokens": tokens, "quick": cfg.quick}
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // WORLD)))
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "moestream.bench.suite_ep", json.dumps(spec), str(r), tmp],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(WORLD)
        ]
        logs = [p.communicate(timeout=1800)[0] for p in procs]
        out = os.path.join(tmp, "rank0.json")
        if any(p.returncode for p in procs) or not os.path.exists(out):
            raise RuntimeError("ep suite worker failed:\n" + "\n".join(log[-2000:] for log in logs))
        with open(out) as f:
            result = json.load(f)
    for T in tokens:
        r = result[str(T)]
        step = _row(cfg, dtype, T, "train_step", "moestream-ep2", "ours")
        step.flops = base[T].flops
        step.record(Measurement(r["times_ms"]))
        step.error = r["error"]
        step.tol = 1e-4
        elt = torch.tensor([], dtype=dtype).element_size()
        theory = 2 * T * s.top_k * s.hidden * elt * (WORLD - 1) / WORLD
        b = _row(cfg, dtype, T, "a2a_bytes", "moestream-ep2", "ours")
        b.status = "ok"
        b.bytes = float(r["bytes_per_step"])
        b.params.update(measured_bytes=b.bytes, theoretical_bytes=theory, ratio=round(b.bytes / theory, 4))
        rows += [base[T], step, b]
    return rows


def _worker(spec: dict, rank: int, tmp: str) -> None:
    """One rank of the world-2 run: the same layer, sharded; rank 0 writes its times and counters."""
    import torch.distributed as dist

    from .shapes import SHAPES

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    cfg = BenchConfig(shape=SHAPES[spec["shape"]], device="cpu", dtypes=[], tokens=spec["tokens"])
    dtype = getattr(torch, spec["dtype"])
    full = _layer(cfg, dtype, "cpu")
    model = _layer(cfg, dtype, "cpu")
    ms.parallelize_experts(model)
    ep = model.submodule("experts").placement
    result = {}
    for T in spec["tokens"]:
        x, go = _inputs(cfg, dtype, T, "cpu", rank, WORLD)
        # correctness gate: this rank's rows against the unsharded layer
        with torch.no_grad():
            err = testing.rel_err(model(x), full(x))
        ep.reset_counters()
        with torch.no_grad():
            model(x)
        sent = torch.tensor([ep.bytes_sent], dtype=torch.float64)
        dist.all_reduce(sent)
        step = _step_fn(model, x, go)
        m = measure([step], torch.device("cpu"), _policy(spec["quick"]), before=dist.barrier)
        result[str(T)] = {"times_ms": m.times_ms, "bytes_per_step": float(sent), "error": err}
    if rank == 0:
        with open(os.path.join(tmp, "rank0.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@register_suite("ep", help="expert parallelism: world 2 (processes, gloo) vs one process")
def ep_suite(cfg: BenchConfig) -> list[Measured]:
    s = cfg.shape
    if not s.num_experts:
        raise SuiteSkip(f"shape {s.name} is dense")
    if s.num_experts % WORLD:
        raise SuiteSkip(f"shape {s.name}: {s.num_experts} experts do not split over {WORLD} ranks")
    if cfg.device.type != "cpu":
        raise SuiteSkip("the ep suite runs its ranks as CPU processes on gloo (NCCL needs one GPU per rank)")
    if not torch.distributed.is_available():
        raise Unavailable("torch.distributed is not available")
    if cfg.ops and not {"train_step", "a2a_bytes"} & set(cfg.ops):
        return []  # (the rows would all be filtered out: do not start the processes)
    return Measured.per_dtype(cfg, "ep", run_ep_suite, expected_rows=3 * len(cfg.tokens))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
