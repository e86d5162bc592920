"""The ``ops`` suite: each moestream op against ``moestream.reference`` (and ``torch._grouped_mm``).

Rows, for every dtype and token count T (k slots, M = T*k routed rows):

- ``router_topk``: logits [T, E] -> weights, ids with the shape's routing variant; GB/s.
- ``permute``: x [T, H], ids [T, k] -> x_sorted [M, H], perm, offsets; GB/s.
- ``unpermute``: y_sorted [M, H], perm, weights -> y [T, H]; GB/s.
- ``grouped_mm``: the gate/up projection, a [M, H] x w_gate_up in the shape's transformers layout
  ([E, 2I, H], transpose_b=True; GPT-OSS stores [E, H, 2I]), without bias so that torch._grouped_mm
  computes the same thing; FLOP/s.
- ``gated_activation``: [M, 2I] -> [M, I] with the shape's kind and layout; GB/s.

Bytes counted are the minimum an implementation must read and write.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import moestream as ms

from .. import reference, testing
from . import oracle
from . import workloads as W
from .core import BenchConfig, Case, Check, Impl, Unavailable, Work, register_suite


def _case(
    cfg: BenchConfig,
    op: str,
    dtype: torch.dtype,
    T: int,
    make: Callable,
    ref: Callable,
    check: Callable,
    work: Callable,
    call: Callable,
    est_bytes: int,
    params: dict,
    extra: tuple[Impl, ...] = (),
) -> Case:
    """A case of ``op`` whose implementations are moestream's op and the reference's op of that
    name, each called as ``call(fn, inputs)``, then ``extra``."""
    ours, base = getattr(ms, op), getattr(reference, op)
    impls = [
        Impl("moestream", lambda c, i: lambda: call(ours, i)),
        Impl("reference", lambda c, i: lambda: call(base, i), role="baseline"),
        *extra,
    ]
    return Case("ops", op, cfg.shape, T, dtype, cfg.device, make, ref, check, work, impls, est_bytes, params)


def _rel_check(dtype: torch.dtype) -> Callable:
    tol = testing.bench_tolerance(dtype)
    return lambda out, r, inp: Check(testing.rel_err(out, r), tol)


# router_topk --------------------------------------------------------------------------------


def _router_case(cfg: BenchConfig, dtype: torch.dtype, T: int) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k = s.num_experts, s.top_k
    kw = s.routing_kwargs()

    def make(seed):
        g = W.generator(dev, seed)
        return {"logits": W.router_logits(s, T, dtype, dev, g), "bias": W.router_bias(s, dev, g)}

    def ref(inp):
        return oracle.router_topk64(inp["logits"], k, inp["bias"], **kw)

    def check(out, r, inp):
        w, ids = out
        w64, ids64 = r
        if tuple(ids.shape) != tuple(ids64.shape):
            return Check(1.0, 0.0, f"ids shape {tuple(ids.shape)} != {tuple(ids64.shape)}")
        bad = (ids.long() != ids64).any(dim=1)
        frac = float(bad.float().mean()) if T else 0.0
        if frac > oracle.ROUTER_ID_MISMATCH:
            return Check(frac, oracle.ROUTER_ID_MISMATCH, f"ids differ in {int(bad.sum())} of {T} rows")
        good = ~bad
        return Check(testing.rel_err(w[good], w64[good]), testing.bench_tolerance(w.dtype), "weights")

    def work(inp):
        nbytes = T * E * W.itemsize(dtype) + T * k * (4 + 8) + (E * 4 if s.router_bias else 0)
        return Work(bytes=nbytes, kind="memory")

    def call(f, i):
        return f(i["logits"], k, bias=i["bias"], **kw)

    est = T * E * (W.itemsize(dtype) + 8) + T * k * 32
    params = {"T": T, "E": E, "k": k, "routing": s.routing_desc()}
    return _case(cfg, "router_topk", dtype, T, make, ref, check, work, call, est, params)


# permute / unpermute ------------------------------------------------------------------------


def _permute_case(cfg: BenchConfig, dtype: torch.dtype, T: int) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k, H = s.num_experts, s.top_k, s.hidden
    M, el = T * k, W.itemsize(dtype)

    def make(seed):
        g = W.generator(dev, seed)
        _, ids = W.routing(s, T, dev, g)
        return {"x": W.randn((T, H), dtype, dev, g), "ids": ids}

    def ref(inp):
        # pure data movement: compared exactly with the reference in the input's dtype
        return reference.permute(inp["x"], inp["ids"], E)

    def check(out, r, inp):
        fr = max(testing.mismatch_fraction(o, e) for o, e in zip(out, r))
        return Check(fr, 0.0, "x_sorted / perm / offsets must match exactly")

    def work(inp):
        return Work(bytes=T * H * el + M * 8 + M * H * el + M * 8 + E * 8, kind="memory")

    def call(f, i):
        return f(i["x"], i["ids"], E)

    est = (T + 2 * M) * H * el + M * 32
    params = {"T": T, "M": M, "H": H}
    return _case(cfg, "permute", dtype, T, make, ref, check, work, call, est, params)


def _unpermute_case(cfg: BenchConfig, dtype: torch.dtype, T: int) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k, H = s.num_experts, s.top_k, s.hidden
    M, el = T * k, W.itemsize(dtype)

    def make(seed):
        g = W.generator(dev, seed)
        weights, ids = W.routing(s, T, dev, g)
        _, perm, _ = reference.permute(torch.empty(T, 1, device=dev), ids, E)
        return {"y_sorted": W.randn((M, H), dtype, dev, g), "perm": perm, "weights": weights}

    def ref(inp):
        return oracle.unpermute64(inp["y_sorted"], inp["perm"], inp["weights"])

    def work(inp):
        return Work(bytes=M * H * el + M * (8 + 4) + T * H * el, kind="memory")

    def call(f, i):
        return f(i["y_sorted"], i["perm"], i["weights"])

    check = _rel_check(dtype)
    est = M * H * el + T * H * (8 + el) + M * 32
    params = {"T": T, "M": M, "H": H}
    return _case(cfg, "unpermute", dtype, T, make, ref, check, work, call, est, params)


# grouped_mm ---------------------------------------------------------------------------------


def _torch_grouped_mm(case: Case, i: dict):
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
    tb = case.shape.transpose_b
    a, b = i["a"], i["b"]
    b_kn = b.transpose(-2, -1) if tb else b  # torch._grouped_mm wants [E, K, N] (any strides it supports)
    offs = i["offsets"].to(torch.int32)
    return lambda: fn(a, b_kn, offs=offs)


def _grouped_mm_case(cfg: BenchConfig, dtype: torch.dtype, T: int) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k, H, N = s.num_experts, s.top_k, s.hidden, 2 * s.intermediate
    M, el = T * k, W.itemsize(dtype)
    tb = s.transpose_b

    def make(seed):
        g = W.generator(dev, seed)
        _, ids = W.routing(s, T, dev, g)
        return {
            "a": W.randn((M, H), dtype, dev, g),
            "b": W.gate_up_weight(s, dtype, dev, g),
            "offsets": W.offsets_from_ids(ids, E),
        }

    def ref(inp):
        return oracle.grouped_mm64(inp["a"], inp["b"], inp["offsets"], tb)

    def work(inp):
        counts = torch.diff(inp["offsets"], prepend=inp["offsets"].new_zeros(1))
        hit = int((counts > 0).sum())
        wbytes = hit * H * N * el
        return Work(
            flops=2.0 * M * H * N,
            bytes=M * H * el + M * N * el + wbytes + E * 8,
            weight_bytes=wbytes,
            kind="matmul",
        )

    def call(f, i):
        return f(i["a"], i["b"], i["offsets"], tb)

    check = _rel_check(dtype)
    est = E * H * N * el + M * H * el + M * N * (el + 8)
    params = {"T": T, "M": M, "K": H, "N": N, "E": E, "transpose_b": tb}
    extra = (Impl("torch._grouped_mm", _torch_grouped_mm, role="baseline"),)
    return _case(cfg, "grouped_mm", dtype, T, make, ref, check, work, call, est, params, extra)


# gated_activation ---------------------------------------------------------------------------


def _activation_case(cfg: BenchConfig, dtype: torch.dtype, T: int) -> Case:
    s, dev = cfg.shape, cfg.device
    k, I = s.top_k, s.intermediate
    M, el = T * k, W.itemsize(dtype)
    args = (s.kind, s.layout, s.alpha, s.limit)

    def make(seed):
        g = W.generator(dev, seed)
        # scale 3: some gate/up values pass GPT-OSS's clamp limit (7), so the clamp is exercised
        return {"x": W.randn((M, 2 * I), dtype, dev, g, 3.0)}

    def ref(inp):
        return oracle.gated_activation64(inp["x"], *args)

    def work(inp):
        return Work(bytes=M * 2 * I * el + M * I * el, kind="memory")

    def call(f, i):
        return f(i["x"], *args)

    check = _rel_check(dtype)
    est = M * 3 * I * el + M * I * 8
    params = {"T": T, "M": M, "I": I, "kind": s.kind, "layout": s.layout}
    return _case(cfg, "gated_activation", dtype, T, make, ref, check, work, call, est, params)


OPS = {
    "router_topk": _router_case,
    "permute": _permute_case,
    "unpermute": _unpermute_case,
    "grouped_mm": _grouped_mm_case,
    "gated_activation": _activation_case,
}


@register_suite("ops")
def ops_suite(cfg: BenchConfig) -> list[Case]:
    W.require_moe(cfg.shape, "ops")
    return [make(cfg, dt, T) for make in OPS.values() for dt in cfg.dtypes for T in cfg.tokens]
