"""The ``quant`` suite: the expert path on compressed weights (:mod:`moestream.quant`).

One case per scheme (``experts_int8``, ``experts_int4``; group 64, or 32 where 64 does not divide
the shape; symmetric) and token count: the
random expert weights of the shape are quantized, and

- ``moestream`` runs :class:`moestream.quant.QuantizedGroupedExperts` on the packed weights
  (``qgrouped_mm`` -> gated activation -> ``qgrouped_mm``) with the default activations ("auto":
  int8 activations for bfloat16 / float16, the AVX-512 VNNI kernels);
- ``moestream_float`` the same with ``activations="float"`` (weight-only: the activations as they
  are), where that differs from the default (bfloat16 / float16 cases);
- the baseline ``dense`` runs ``ms.moe_experts`` (the fused CPU kernel) on the same weights
  dequantized to the case's dtype (bfloat16: the uncompressed model), so both compute the same
  function and the float64 reference of the dequantized weights checks both.

Each row counts the weight bytes it reads (experts that receive tokens): packed codes + scales for
``moestream``, dense weights for ``dense``, so ``weight_gbps`` and the fraction of the measured memory
bandwidth are each row's own; the speedup is dense time / compressed time.
"""

from __future__ import annotations

import torch

import moestream as ms

from .. import quant as Q
from .. import reference, testing
from . import oracle
from . import workloads as W
from .core import BenchConfig, Case, Check, Impl, SuiteSkip, Work, register_suite


def _group_size(H: int, I: int) -> int:
    # 64 (the documented default) where it divides both input dimensions, else 32 (the tiny shape)
    for g in (64, 32):
        if H % g == 0 and I % g == 0:
            return g
    raise SuiteSkip(f"hidden {H} and intermediate {I} are not multiples of 32: no group size fits")


def _make_inputs(cfg: BenchConfig, dtype: torch.dtype, T: int, scheme: Q.QuantScheme):
    s, dev = cfg.shape, cfg.device

    def make(seed):
        g = W.generator(dev, seed)
        rw, ids = W.routing(s, T, dev, g)
        w1 = W.gate_up_weight(s, torch.float32, dev, g)
        w2 = W.down_weight(s, torch.float32, dev, g)
        transposed = not s.transpose_b  # the packed format is [E, N, K]
        # quantized from the weights in the case's dtype: the compressed model of a model in that
        # dtype computes in it (float32 weights here sent bfloat16 rows through the float32 kernels)
        p1 = Q.PackedWeight.from_weight(w1.to(dtype), scheme, transposed=transposed)
        p2 = Q.PackedWeight.from_weight(w2.to(dtype), scheme, transposed=transposed)
        d1, d2 = p1.dequantize(dtype), p2.dequantize(dtype)
        if transposed:
            d1, d2 = d1.transpose(1, 2).contiguous(), d2.transpose(1, 2).contiguous()
        experts = Q.QuantizedGroupedExperts(
            p1, p2, activation=s.kind, layout=s.layout, alpha=s.alpha, limit=s.limit
        )
        return {
            "x": W.randn((T, s.hidden), dtype, dev, g),
            "ids": ids,
            "weights": rw.to(dtype),
            "w_gate_up": d1,
            "w_down": d2,
            "experts": experts,
            "packed_bytes": sum(t.numel() * t.element_size() for t in experts.buffers()) // s.num_experts,
        }

    return make


def _case(cfg: BenchConfig, dtype: torch.dtype, T: int, scheme: Q.QuantScheme) -> Case:
    s, dev = cfg.shape, cfg.device
    E, k, H, I = s.num_experts, s.top_k, s.hidden, s.intermediate
    kw = W.experts_kwargs(cfg.shape)
    tol = testing.bench_tolerance(dtype)
    el = W.itemsize(dtype)

    def args(inp):
        return (inp["x"], inp["ids"], inp["weights"], inp["w_gate_up"], inp["w_down"], None, None)

    def ref(inp):
        return {"out": oracle.moe_experts64(*args(inp), **kw)}

    def check(out, r, inp):
        err, which = testing.worst_rel_err({"out": out}, r)
        return Check(err, tol, which)

    def work_of(per_expert):
        def work(inp):
            wbytes = W.experts_hit(inp["ids"], E) * per_expert(inp)
            return Work(
                flops=float(reference.dense_flops(T, H, I, k)),
                bytes=2 * T * H * el + T * k * (8 + el) + wbytes,
                weight_bytes=wbytes,
                kind="matmul",
            )

        return work

    dense_work = work_of(lambda inp: W.expert_param_bytes(s, dtype))
    packed_work = work_of(lambda inp: inp["packed_bytes"])

    def ours_with(activations):
        def prepare(case, inp):
            m, x, ids, rw = inp["experts"], inp["x"], inp["ids"], inp["weights"]
            w1, w2 = m.gate_up_proj, m.down_proj

            def run():
                # the module is shared by both implementations: each call sets its own mode
                w1.activations = w2.activations = activations
                with torch.no_grad():
                    return m(x, ids, rw)

            return run

        return prepare

    def dense(case, inp):
        def run():
            with torch.no_grad():
                return ms.moe_experts(*args(inp), **kw)

        return run

    wb = E * W.expert_param_bytes(s, dtype)
    return Case(
        "quant",
        f"experts_{scheme.name}",
        s,
        T,
        dtype,
        dev,
        _make_inputs(cfg, dtype, T, scheme),
        ref,
        check,
        dense_work,
        [Impl("moestream", ours_with("auto"), work=packed_work)]
        + ([Impl("moestream_float", ours_with("float"), work=packed_work)] if dtype != torch.float32 else [])
        + [Impl("dense", dense, role="baseline")],
        est_bytes=2 * wb + E * 3 * H * I * 4 + 3 * T * H * 8,
        params={
            "T": T,
            "H": H,
            "I": I,
            "E": E,
            "k": k,
            "scheme": scheme.name,
            "group_size": scheme.group_size,
        },
    )


@register_suite("quant")
def quant_suite(cfg: BenchConfig) -> list[Case]:
    W.require_moe(cfg.shape, "quant")
    if cfg.device.type != "cpu":
        raise SuiteSkip("the compressed-weight kernels are CPU-only so far (CUDA dequantises, unmeasured)")
    group = _group_size(cfg.shape.hidden, cfg.shape.intermediate)
    return [
        _case(cfg, dt, T, Q.QuantScheme(name, group))
        for name in ("int8", "int4")
        for dt in cfg.dtypes
        for T in cfg.tokens
    ]
