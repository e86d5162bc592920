"""The ``moe`` suite: the whole expert path (``moestream.moe_experts``).

- ``experts_fwd``: inference forward (no autograd; the fused native op).
- ``experts_fwd_bwd``: forward and backward of sum(out * grad_out) with respect to the tokens, the
  routing weights, the expert weights (and biases); moestream composes its ops here.

Baselines measured in the same run: ``reference`` (``moestream.reference.moe_experts_loop``, the
usual Python loop over experts), and transformers' own experts module of the shape's model family
with ``config._experts_implementation`` = ``eager`` (``hf-eager``) and ``grouped_mm``
(``hf-grouped_mm``), holding the same weights. Routing weights are given in the tokens' dtype, as
transformers' routers hand them to the experts.

FLOPs: 2 * T * k * 3 * H * I for the forward (two GEMMs per routed row), three times that for
forward+backward. Forward rows also count the expert-weight bytes read (experts that receive
tokens): a decode row is judged against the memory bandwidth when reading those weights takes the
machine longer than the math.
"""

from __future__ import annotations

import torch

import moestream as ms

from .. import reference, testing
from . import oracle
from . import workloads as W
from .core import BenchConfig, Case, Check, Impl, Work, register_suite

_GRAD_NAMES = ("x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down")


def _make_inputs(cfg: BenchConfig, dtype: torch.dtype, T: int, backward: bool):
    s, dev = cfg.shape, cfg.device

    def make(seed):
        g = W.generator(dev, seed)
        rw, ids = W.routing(s, T, dev, g)
        b1, b2 = W.expert_biases(s, dtype, dev, g)
        inp = {
            "x": W.randn((T, s.hidden), dtype, dev, g),
            "ids": ids,
            "weights": rw.to(dtype),
            "w_gate_up": W.gate_up_weight(s, dtype, dev, g),
            "w_down": W.down_weight(s, dtype, dev, g),
            "b_gate_up": b1,
            "b_down": b2,
        }
        if backward:
            inp["grad_out"] = W.randn((T, s.hidden), dtype, dev, g)
            for n in _GRAD_NAMES:
                if inp[n] is not None:
                    inp[n].requires_grad_(True)
        return inp

    return make


def _args(inp: dict) -> tuple:
    return (
        inp["x"],
        inp["ids"],
        inp["weights"],
        inp["w_gate_up"],
        inp["w_down"],
        inp["b_gate_up"],
        inp["b_down"],
    )


def _fwd(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _fwd_bwd(fn, inp: dict, leaves: dict):
    """Forward, backward with the input set's grad_out; returns the output and the gradients.
    ``leaves`` maps gradient names to the tensors whose .grad is read (None: not differentiated)."""

    def run():
        for t in leaves.values():
            if t is not None:
                t.grad = None
        with torch.enable_grad():
            out = fn()
            out.backward(inp["grad_out"])
        res = {"out": out.detach()}
        for n, t in leaves.items():
            if t is not None:
                res[f"grad_{n}"] = t.grad
        return res

    return run


def _own_leaves(inp: dict) -> dict:
    return {n: inp[n] for n in _GRAD_NAMES}


def _moestream(backward: bool, kw: dict):
    def prepare(case: Case, inp: dict):
        fn = lambda: ms.moe_experts(*_args(inp), **kw)
        return _fwd_bwd(fn, inp, _own_leaves(inp)) if backward else _fwd(fn)

    return prepare


def _reference(backward: bool, kw: dict):
    def prepare(case: Case, inp: dict):
        fn = lambda: reference.moe_experts_loop(*_args(inp), **kw)
        return _fwd_bwd(fn, inp, _own_leaves(inp)) if backward else _fwd(fn)

    return prepare


def _hf_unavailable(case: Case) -> str | None:
    """Why transformers' experts module of the shape's family cannot be a baseline here."""
    if not case.shape.hf_family:
        return f"no transformers experts module for shape {case.shape.name}"
    return testing.experts_unavailable(case.shape.hf_family)


def _transformers(implementation: str, backward: bool):
    """transformers' experts module of the shape's family (``config._experts_implementation`` =
    ``implementation``), built on the meta device and given the input set's weights (same storage),
    in the family's own layout: [E, 2I, H] / [E, H, I] (Qwen3-MoE, Mixtral, DeepSeek-V3;
    ``shape.transpose_b``), [E, H, 2I] / [E, I, H] plus biases (GPT-OSS)."""

    def prepare(case: Case, inp: dict):
        weights = {
            "gate_up_proj": inp["w_gate_up"],
            "down_proj": inp["w_down"],
            "gate_up_proj_bias": inp["b_gate_up"],
            "down_proj_bias": inp["b_down"],
        }
        sizes = {**case.shape.expert_sizes(), "layers": 1}
        mod = testing.build_experts(
            case.shape.hf_family, sizes, implementation, weights, requires_grad=backward
        )
        x, ids, rw = inp["x"], inp["ids"], inp["weights"]
        fn = lambda: mod(x, ids, rw)
        if not backward:
            return _fwd(fn)
        leaves = {
            "x": x,
            "weights": rw,
            "w_gate_up": mod.gate_up_proj,
            "w_down": mod.down_proj,
            "b_gate_up": getattr(mod, "gate_up_proj_bias", None) if inp["b_gate_up"] is not None else None,
            "b_down": getattr(mod, "down_proj_bias", None) if inp["b_down"] is not None else None,
        }
        return _fwd_bwd(fn, inp, leaves)

    return prepare


def _experts_case(cfg: BenchConfig, dtype: torch.dtype, T: int, backward: bool) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k, H, I = s.num_experts, s.top_k, s.hidden, s.intermediate
    kw = W.experts_kwargs(cfg.shape)
    tol = testing.bench_tolerance(dtype)

    def ref(inp):
        if backward:
            return oracle.moe_experts_grads64(*_args(inp), inp["grad_out"], **kw)
        return {"out": oracle.moe_experts64(*_args(inp), **kw)}

    def check(out, r, inp):
        outs = out if isinstance(out, dict) else {"out": out}
        err, which = testing.worst_rel_err(outs, r)
        return Check(err, tol, which)

    def work(inp):
        el = W.itemsize(dtype)
        fwd_flops = float(reference.dense_flops(T, H, I, k))
        if backward:
            return Work(flops=3 * fwd_flops, kind="matmul")
        wbytes = W.experts_hit(inp["ids"], E) * W.expert_param_bytes(s, dtype)
        return Work(
            flops=fwd_flops,
            bytes=2 * T * H * el + T * k * (8 + el) + wbytes,
            weight_bytes=wbytes,
            kind="matmul",
        )

    impls = [
        Impl("moestream", _moestream(backward, kw)),
        Impl("reference", _reference(backward, kw), role="baseline"),
        Impl("hf-eager", _transformers("eager", backward), role="baseline", requires=_hf_unavailable),
        Impl(
            "hf-grouped_mm", _transformers("grouped_mm", backward), role="baseline", requires=_hf_unavailable
        ),
    ]
    el = W.itemsize(dtype)
    wb = E * W.expert_param_bytes(s, dtype)
    # one set + the float64 reference (+ gradients of everything, in float64, for the backward)
    est = wb + 3 * T * H * el + (T * H * 8 if not backward else wb * (1 + 8 // el) + 3 * T * H * 8)
    return Case(
        "moe",
        "experts_fwd_bwd" if backward else "experts_fwd",
        s,
        T,
        dtype,
        dev,
        _make_inputs(cfg, dtype, T, backward),
        ref,
        check,
        work,
        impls,
        est_bytes=est,
        params={"T": T, "H": H, "I": I, "E": E, "k": k, "kind": s.kind, "layout": s.layout},
    )


@register_suite("moe")
def moe_suite(cfg: BenchConfig) -> list[Case]:
    W.require_moe(cfg.shape, "moe")
    return [
        _experts_case(cfg, dt, T, backward)
        for backward in (False, True)
        for dt in cfg.dtypes
        for T in cfg.tokens
    ]
