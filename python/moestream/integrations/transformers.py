"""Hugging Face transformers integration.

- :func:`patch_moe` swaps, in place, every supported sparse MoE block of a transformers model for a
  :class:`moestream.nn.MoE` built around the *same* Parameter objects (no copy, no extra memory,
  identical ``state_dict()`` keys, so ``save_pretrained`` / ``from_pretrained`` round-trip);
  :func:`unpatch_moe` puts the original blocks back.
- The patched blocks' experts follow transformers' choice of experts implementation:
  :func:`patch_moe` sets ``config._experts_implementation = "moestream"`` (moestream's fused path);
  a later ``model.set_experts_implementation("eager" | "grouped_mm" | ...)`` makes them run that
  implementation from transformers' registry on the same parameters (the router stays moestream's);
  :func:`unpatch_moe` restores the previous setting.
- Importing this module registers ``"moestream"`` in transformers' experts registry, so
  ``model.set_experts_implementation("moestream")`` (or ``from_pretrained(...,
  experts_implementation="moestream")``) runs transformers' own experts modules on moestream's ops
  while keeping transformers' router.

Supported families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4 (text), DBRX
and JetMoE (its MLP experts; its mixture-of-attention experts stay transformers').

How transformers keeps working on a patched model: its output recorders (``output_router_logits``)
attach hooks to modules by ``isinstance`` against the original router / block classes, and its
weight initialisation dispatches the same way. Each replacement module is therefore given a class
that derives from both the moestream module (first, so its ``forward`` runs) and the transformers
class it replaces; its router returns the logits at the position the recorder reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import transformers.activations as _hf_act
import transformers.integrations.moe as _hf_moe
from torch import Tensor, nn

from .. import ops, pipeline
from ..nn.moe import GroupedExperts, MoE, Router, Routing

__all__ = ["SUPPORTED_FAMILIES", "moestream_experts_forward", "patch_moe", "register", "unpatch_moe"]


# ----------------------------------------------------------------------------------------------
# gate (activation) detection: which fused kind reproduces a module's gate exactly
#
# Read from the module first: transformers' default gate (``act_fn(gate) * up`` on the two halves)
# with an ``act_fn`` of a class known to compute silu / exact gelu, or GPT-OSS's own gate. Only other
# gates are probed numerically, on a fixed input built on the CPU: patch_moe also runs inside
# transformers' init context (meta default device, torch.linspace patched), where tensors made on
# the ambient device hold no data.


class _AmbiguousGateError(ValueError):
    """The numerical probe of a gate matched more than one fused kind."""


def _act_kind(act: object) -> str | None:
    """The fused kind, ``"swiglu"`` / ``"geglu"``, when ``act`` is an activation module whose exact
    class (a subclass could override ``forward``) computes silu / exact (erf) gelu; else None."""
    if act is None or "forward" in vars(act):
        return None
    cls = type(act)
    if cls is nn.SiLU or cls is getattr(_hf_act, "SiLUActivation", None):
        return "swiglu"
    if cls is nn.GELU:
        return "geglu" if act.approximate == "none" else None
    if cls is getattr(_hf_act, "GELUActivation", None):
        fn = act.act
        # its two forms: torch's gelu, or the erf formula written out
        if fn is nn.functional.gelu or getattr(fn, "__func__", None) is _hf_act.GELUActivation._gelu_python:
            return "geglu"
    return None


def _gpt_oss_gate() -> Callable | None:
    mod = sys.modules.get("transformers.models.gpt_oss.modeling_gpt_oss")
    cls = getattr(mod, "GptOssExperts", None)
    return getattr(cls, "_apply_gate", None)


def _structural_gate(module: nn.Module) -> tuple[str, str] | None:
    """The (kind, layout) of ``module``'s gate read from what the module is, or None when only a
    probe can tell (a gate or activation transformers does not define)."""
    if "_apply_gate" in vars(module):  # replaced on the instance
        return None
    fn = getattr(type(module), "_apply_gate", None)
    if fn is None or fn is _hf_moe._default_apply_gate:
        # act_fn(gate) * up on the two halves (Llama 4's forward, written out, is the same)
        kind = _act_kind(getattr(module, "act_fn", None))
        return (kind, "concat") if kind else None
    if fn is _gpt_oss_gate():
        return "gptoss", "interleaved"
    return None


def _probe_input() -> Tensor:
    # Values on both sides of GPT-OSS's clamp limit, gate and up columns different in both layouts
    # (a fixed permutation: 13 is prime to 32). Every tensor is made on the CPU explicitly, with no
    # random numbers, so the probe is the same whatever the default device or RNG state.
    cpu = torch.device("cpu")
    x = torch.arange(3 * 32, dtype=torch.float32, device=cpu) * (24.0 / 95.0) - 12.0
    perm = (torch.arange(32, device=cpu) * 13) % 32
    return x.reshape(3, 32)[:, perm].contiguous()


def _try_gate(gate_fn: Callable[[Tensor], Tensor], x: Tensor) -> object:
    try:
        with torch.no_grad():
            return gate_fn(x)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
        return None  # a gate that cannot run on the probe: no fused kind for it


def _match_gate(gate_fn: Callable[[Tensor], Tensor], alpha: float, limit: float) -> tuple[str, str] | None:
    """The (kind, layout) of :func:`moestream.gated_activation` that equals ``gate_fn`` on a probe,
    or None when none does (the caller then runs ``gate_fn`` itself, or refuses). Raises
    :class:`_AmbiguousGateError` when several do."""
    # in float64 where the gate allows it: a formula that is exact in theory but cancels in float32
    # (1 + erf(x / sqrt 2) for very negative x) still matches, while tanh-approximated gelu does not
    for dtype in (torch.float64, torch.float32):
        x = _probe_input().to(dtype)
        want = _try_gate(gate_fn, x)
        if want is not None:
            break
    if not isinstance(want, Tensor) or want.shape != (3, 16) or want.device != x.device:
        return None
    if not bool(torch.isfinite(want).all()):
        return None
    from ..reference import gated_activation as ref

    matches = []
    for kind in ("swiglu", "geglu", "gptoss"):
        for layout in ("concat", "interleaved"):
            got = ref(x, kind, layout, alpha, limit)
            if torch.allclose(got, want.to(got.dtype), rtol=1e-5, atol=1e-6):
                matches.append((kind, layout))
    if len(matches) > 1:
        raise _AmbiguousGateError(
            f"moestream: the numerical probe of the gate {gate_fn!r} matches several activations "
            f"({', '.join(f'{k}/{lay}' for k, lay in matches)}); cannot tell which one it computes"
        )
    return matches[0] if matches else None


def _act_gate(act_fn: Callable, up_first: bool = False) -> Callable[[Tensor], Tensor]:
    def gate(x: Tensor) -> Tensor:
        g, u = x.chunk(2, dim=-1)
        return u * act_fn(g) if up_first else act_fn(g) * u

    return gate


@torch.compiler.disable
def _detect_experts_gate(module: nn.Module) -> tuple[str, str] | tuple[()]:
    match = _structural_gate(module)
    if match is None:
        alpha = float(getattr(module, "alpha", 1.702))
        limit = float(getattr(module, "limit", 7.0))
        try:
            match = _match_gate(module._apply_gate, alpha, limit)
        except _AmbiguousGateError:
            match = None  # the module's own gate runs: slower, never wrong
    result = match if match is not None else ()
    module.__dict__["_moestream_gate"] = result
    return result


def _experts_gate(module: nn.Module) -> tuple[str, str] | tuple[()]:
    cached = module.__dict__.get("_moestream_gate")
    return cached if cached is not None else _detect_experts_gate(module)


# ----------------------------------------------------------------------------------------------
# the "moestream" experts implementation (transformers' router, moestream's expert path)


def moestream_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """transformers experts forward ``(self, hidden_states [T, H], top_k_index [T, k], top_k_weights
    [T, k]) -> [T, H]`` on moestream's ops. Honours the module's ``is_transposed``, ``has_bias``,
    ``has_gate``, ``is_concatenated`` (interleaved gate/up), its ``act_fn`` / ``_apply_gate`` (run
    fused when a moestream activation reproduces it exactly, else called as is) and
    ``has_post_expert_norm``."""
    if getattr(self, "_is_expert_parallel", False):
        # expert-parallel sentinels (ids >= num_experts) are transformers' business
        return _hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transpose_b = not getattr(self, "is_transposed", False)
    post_norm = getattr(self, "has_post_expert_norm", False)
    w1 = self.gate_up_proj if has_gate else self.up_proj
    b1 = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    w2 = self.down_proj
    b2 = self.down_proj_bias if has_bias else None
    alpha = float(getattr(self, "alpha", 1.702))
    limit = float(getattr(self, "limit", 7.0))
    x = hidden_states.to(w1.dtype)
    gate = _experts_gate(self) if has_gate else ()
    if gate and not post_norm:
        out = ops.moe_experts(
            x, top_k_index, top_k_weights, w1, w2, b1, b2, gate[0], gate[1], transpose_b, alpha, limit
        )
    else:
        # the pipeline with the module's own activation (or a fused gate) and post-expert norm
        if gate:
            act = pipeline.Gate(gate[0], gate[1], alpha, limit)
        else:
            fn = self._apply_gate if has_gate else self.act_fn
            act = lambda h: fn(h).to(w2.dtype)
        experts = pipeline.Experts(w1, w2, b1, b2, transpose_b)
        post = self.post_expert_norm if post_norm else None
        out = pipeline.run(ops.OPS, x, top_k_index, top_k_weights, experts, act, post=post)
    return out.to(hidden_states.dtype)


def register() -> None:
    """Register ``"moestream"`` in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``."""
    _hf_moe.ExpertsInterface.register("moestream", moestream_experts_forward)


register()


# ----------------------------------------------------------------------------------------------
# classes that are both the moestream module and the transformers class they replace

_COMPAT: dict[tuple[type, type], type] = {}


def _new_compat(ours: type, theirs: type) -> nn.Module:
    return object.__new__(_compat_class(ours, theirs))


def _compat_reduce_ex(self, protocol):
    cls = type(self)
    return (_new_compat, (cls._moestream_class, cls._transformers_class), self.__dict__.copy())


def _compat_class(ours: type, theirs: type) -> type:
    cls = _COMPAT.get((ours, theirs))
    if cls is None:
        name = f"Moestream{theirs.__name__}"
        ns = {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"moestream's {ours.__name__} standing in for transformers' {theirs.__name__}.",
            "_moestream_class": ours,
            "_transformers_class": theirs,
            # picklable (torch.save(model)) and deep-copyable without the class being importable by name
            "__reduce_ex__": _compat_reduce_ex,
        }
        cls = type(name, (ours, theirs), ns)
        _COMPAT[(ours, theirs)] = cls
    return cls


def _experts_implementation(module: nn.Module) -> str | None:
    """The name in transformers' experts registry that ``module`` (a patched experts module) is to
    run: its config's ``_experts_implementation`` when the module it replaces dispatches through the
    registry (``@use_experts_implementation``; Llama 4's does not), else None."""
    if not getattr(module, "_moestream_dispatches", False):
        return None
    return getattr(getattr(module, "config", None), "_experts_implementation", None)


class _PatchedExperts(GroupedExperts):
    """:class:`GroupedExperts` standing in for a transformers experts module, honouring transformers'
    choice of experts implementation: ``"moestream"`` (what :func:`patch_moe` sets) runs moestream's
    fused path; any other name (``model.set_experts_implementation("eager" | "grouped_mm" | ...)``)
    runs transformers' own dispatch on the same parameters, as the replaced module would."""

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        impl = _experts_implementation(self)
        if impl is None or impl == "moestream":
            return GroupedExperts.forward(self, x, ids, weights)
        return type(self)._transformers_class.forward(self, x, ids, weights)


def _adopt_attributes(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst`` the plain attributes and (parameter-free) submodules of ``src`` that it lacks:
    what transformers' experts functions read (``config``, ``has_gate``, ``is_transposed``,
    ``act_fn``, ...). Parameters and buffers are not touched (``_build`` shares those)."""
    for key, value in vars(src).items():
        if key not in vars(dst):
            dst.__dict__[key] = value
    for name, mod in src._modules.items():
        if name not in dst._modules and mod is not None and not any(True for _ in mod.parameters()):
            dst._modules[name] = mod


class _Llama4RouterOutput(Router):
    """Router whose outputs are ordered like transformers' ``Llama4Router``: (weights, logits, ids);
    its output recorder reads index 1."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, weights, ids = Router.forward(self, x)
        return weights, logits, ids


class _Llama4MoE(MoE):
    """MoE reading the router outputs in :class:`_Llama4RouterOutput`'s order."""

    def _route(self, router: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weights, logits, ids = router(x)
        return logits, weights, ids


# ----------------------------------------------------------------------------------------------
# families


@dataclass(frozen=True)
class _Family:
    name: str
    module: str  # transformers module defining the block
    block: str  # sparse MoE block class name
    router: str  # attribute names inside the block
    shared: str | None = None
    shared_gate: str | None = None
    return_router: str | None = None  # what the block returns next to the hidden states
    # submodules replaced next to the block (their hooks and init flags follow them; None: the
    # router and the experts); the others are kept as they are, the same objects
    replaced: tuple[str, ...] | None = None
    note: str = ""  # what the README's table says next to "yes"


SUPPORTED_FAMILIES: tuple[_Family, ...] = (
    _Family("mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "gate"),
    _Family(
        "qwen2_moe",
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "gate",
        shared="shared_expert",
        shared_gate="shared_expert_gate",
    ),
    _Family(
        "qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate"
    ),
    _Family("olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "gate"),
    _Family(
        "deepseek_v3",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3MoE",
        "gate",
        shared="shared_experts",
    ),
    _Family(
        "gpt_oss",
        "transformers.models.gpt_oss.modeling_gpt_oss",
        "GptOssMLP",
        "router",
        return_router="weights",
    ),
    _Family(
        "llama4",
        "transformers.models.llama4.modeling_llama4",
        "Llama4TextMoe",
        "router",
        shared="shared_expert",
        return_router="logits",
    ),
    # (DBRX's router only computes the logits, the block routes: the router is kept as it is)
    _Family("dbrx", "transformers.models.dbrx.modeling_dbrx", "DbrxFFN", "router", replaced=("experts",)),
    _Family(
        "jetmoe",
        "transformers.models.jetmoe.modeling_jetmoe",
        "JetMoeMoE",
        "router",
        replaced=("router",),
        note="MLP experts only: the attention experts, JetMoeMoA, stay transformers'",
    ),
)

_FAMILY_TITLES = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "olmoe": "OLMoE",
    "deepseek_v3": "DeepSeek-V3",
    "gpt_oss": "GPT-OSS",
    "llama4": "Llama 4",
    "dbrx": "DBRX",
    "jetmoe": "JetMoE",
}


def _routing(fam: _Family, router: nn.Module) -> Routing:
    if fam.name == "mixtral":
        return Routing.preset("mixtral")
    if fam.name in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return Routing.preset(fam.name, normalize=bool(router.norm_topk_prob))
    if fam.name == "deepseek_v3":
        return Routing.preset(
            "deepseek_v3",
            normalize=bool(router.norm_topk_prob),
            scale=float(router.routed_scaling_factor),
            num_groups=int(router.num_group),
            topk_groups=int(router.topk_group),
        )
    return Routing.preset(fam.name)


def _experts_spec(fam: _Family, experts: nn.Module) -> dict:
    """GroupedExperts arguments reproducing transformers' experts module ``experts``."""
    alpha, limit = 1.702, 7.0
    if fam.name == "gpt_oss":
        alpha, limit = float(experts.alpha), float(experts.limit)
        spec = {"weight_layout": "in_out", "bias": True, "alpha": alpha, "limit": limit}
    elif fam.name == "llama4":
        spec = {"weight_layout": "in_out", "bias": False}
    else:
        spec = {"weight_layout": "out_in", "bias": False}
    gate = _structural_gate(experts)
    if gate is None:
        # (Llama 4's experts have no _apply_gate: their forward computes up * act_fn(gate))
        gate_fn = getattr(experts, "_apply_gate", None) or _act_gate(experts.act_fn, up_first=True)
        gate = _match_gate(gate_fn, alpha, limit)
    if gate is None:
        act = getattr(experts, "act_fn", None)
        raise ValueError(
            f"moestream.patch_moe: the experts of this {_FAMILY_TITLES[fam.name]} block use an activation that "
            f"moestream does not implement ({act!r}); supported: silu (SwiGLU), exact gelu (GeGLU), GPT-OSS's gate"
        )
    E, a, b = experts.gate_up_proj.shape
    two_i = a if spec["weight_layout"] == "out_in" else b
    spec.update(activation=gate[0], layout=gate[1], num_experts=E, intermediate_size=two_i // 2)
    return spec


def _set_tensor(module: nn.Module, name: str, value: Tensor | None) -> None:
    if name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


# ----------------------------------------------------------------------------------------------
# DBRX and JetMoE: MoE blocks whose weights are not laid out as a fused experts module
#
# nn.GroupedExperts cannot hold their weights under their state_dict keys (DBRX: gate, up and down
# as three [E * I, H] parameters of ``experts.mlp``; JetMoE: ``input_linear.weight`` [E, 2I, H] and
# ``output_linear.weight`` [E, H, I] next to the router, a bias [H] after the combine), so their
# replacements keep the submodules that hold the weights (the same objects) and only run other
# code: a copy of the block, and of the one submodule whose forward changes, of a class deriving
# from the moestream implementation below and from the transformers class it replaces.


def _copy_as(module: nn.Module, cls: type) -> nn.Module:
    """A new module of class ``cls`` holding ``module``'s attributes, parameters, buffers, submodules
    and hooks (the same objects; the containers are copies, so registering on one leaves the other
    alone)."""
    new = cls.__new__(cls)
    for key, value in vars(module).items():
        new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    return new


class _ActKind:
    """The fused kind reproducing a holder's activation module, read once per module object: a
    later replacement of the activation is seen (identity check, also under torch.compile) and then
    read again. None: no fused kind does, the module itself runs (exact, unfused)."""

    def __init__(self, act: object):
        self.act = act
        self.kind = _act_kind(act)

    def of(self, act: object) -> str | None:
        if act is not self.act:
            self.act, self.kind = act, _act_kind(act)
        return self.kind


def _dbrx_route(logits: Tensor, k: int, p: float | None) -> tuple[Tensor, Tensor]:
    """DBRX's routing: softmax over E in the logits' dtype, top-k, weights divided by their p-norm
    (``moe_normalize_expert_weights``; None: not normalised) -> (weights [T, k] in the logits'
    dtype, ids [T, k])."""
    if logits.dtype == torch.float32:
        # router_topk computes in float32: the same probabilities, the same selection; its
        # normalisation (sum + 1e-20) is the 1-norm (the sum of k probabilities is >= k / E, far
        # above where 1e-20 could change a float32 sum)
        weights, ids = ops.router_topk(logits, k, "softmax", normalize=p is not None and p == 1)
        if p is not None and p != 1:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        return weights, ids
    # bfloat16 / float16: transformers selects on probabilities rounded to the logits' dtype, where
    # ties are common (router_topk would select on float32 ones and break them otherwise); float64:
    # router_topk would compute in float32. Both: transformers' own computation, on T x E values.
    probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
    weights, ids = torch.topk(probs, k, dim=-1)
    if p is not None:
        weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
    return weights, ids


class _DbrxExperts(nn.Module):
    """DBRX's experts (``mlp.w1`` gate, ``mlp.v1`` up, ``mlp.w2`` down, each [E * I, H], i.e. [E, I, H]
    per expert) on moestream's ops: permute -> grouped_mm (gate) and grouped_mm (up) -> gated
    activation -> grouped_mm (down) -> weighted unpermute. ``moe_experts`` takes gate and up as one
    [E, 2I, H] tensor; joining DBRX's two would copy two thirds of the experts' weights at every
    call (or keep a second copy), so gate and up are two grouped matmuls on the same rows: the same
    FLOPs, only the [T * k, 2I] activation input is joined.

    ``forward(hidden_states [..., H], top_k_index [T, k], top_k_weights [T, k])`` -> [B, -1, H] with
    B = hidden_states.shape[0], as transformers' ``DbrxExperts``."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        mlp = self.mlp
        H, I, E = self.hidden_size, self.ffn_hidden_size, self.num_experts
        x = hidden_states.reshape(-1, H)
        w1, v1, w2 = (w.view(E, I, H) for w in (mlp.w1, mlp.v1, mlp.w2))
        rows, perm, offsets = ops.permute(x, top_k_index, E)
        gate = ops.grouped_mm(rows, w1, offsets, True)
        up = ops.grouped_mm(rows, v1, offsets, True)
        kind = self._moestream_act.of(mlp.activation_fn)
        if kind is not None:
            h = ops.gated_activation(torch.cat([gate, up], dim=-1), kind, "concat")
        else:
            h = mlp.activation_fn(gate) * up
        y = ops.grouped_mm(h, w2, offsets, False)  # w2 is [I, H] per expert: x @ w2, no transpose
        out = ops.unpermute(y, perm, top_k_weights)
        return out.view(hidden_states.shape[0], -1, H)


class _DbrxFFN(nn.Module):
    """DBRX's MoE block: transformers' router (its logits, and its in-place jitter of the input in
    training), DBRX's routing (:func:`_dbrx_route`), the experts of :class:`_DbrxExperts`."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = self.router(hidden_states)
        weights, ids = _dbrx_route(logits, int(self.top_k), self.moe_normalize_expert_weights)
        return self.experts(hidden_states, ids, weights)


class _JetMoeRouter(nn.Module):
    """JetMoE's top-k gating: float32 logits, top-k on them, softmax over the k, weights in the
    input's dtype (:func:`moestream.router_topk` for float32 / float64 models). Returns ``(weights [T, k], ids [T, k], None, None,
    logits [T, E] float32)``: the logits at index 4, where transformers' output recorder reads them;
    the places of transformers' sorted-token bookkeeping (which needs a host sync, and which
    moestream's permute replaces) hold None."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, None, None, Tensor]:
        logits = self.layer(hidden_states).float()
        k = int(self.top_k)
        if hidden_states.dtype in (torch.float32, torch.float64):
            weights, ids = ops.router_topk(logits, k, "softmax", True)
        else:
            # logits of a bfloat16 / float16 linear hold that dtype's few values: ties at the k-th
            # place are common (1 token in 512 at E = 8, H = 1024, measured), and router_topk breaks
            # them to the lower id where torch.topk may not. transformers' own computation (on
            # T x E values) picks the same experts as transformers.
            top, ids = logits.topk(k, dim=1)
            weights = torch.softmax(top, dim=1)
        return weights.type_as(hidden_states), ids, None, None, logits


class _JetMoeMoE(nn.Module):
    """JetMoE's MoE MLP: :class:`_JetMoeRouter`, then the experts (``input_linear.weight`` [E, 2I, H],
    ``output_linear.weight`` [E, H, I], transformers' layout) through :func:`moestream.moe_experts`,
    then the block's bias [H]."""

    def forward(self, layer_input: Tensor) -> Tensor:
        bsz, length, emb = layer_input.size()
        x = layer_input.reshape(-1, emb)
        weights, ids, _, _, _ = self.router(x)
        w1, w2 = self.input_linear.weight, self.output_linear.weight
        kind = self._moestream_act.of(self.activation)
        if kind is not None:
            y = ops.moe_experts(x, ids, weights, w1, w2, None, None, kind, "concat", True)
        else:  # an activation without a fused kind: the module's own, between moestream's matmuls
            act = _act_gate(self.activation)
            y = pipeline.run(ops.OPS, x, ids, weights, pipeline.Experts(w1, w2, transpose_b=True), act)
        return y.view(bsz, length, emb) + self.bias


def _build_dbrx(block: nn.Module) -> nn.Module:
    new = _copy_as(block, _compat_class(_DbrxFFN, type(block)))
    experts = _copy_as(block.experts, _compat_class(_DbrxExperts, type(block.experts)))
    experts.__dict__["_moestream_act"] = _ActKind(block.experts.mlp.activation_fn)
    new._modules["experts"] = experts
    return new


def _build_jetmoe(block: nn.Module) -> nn.Module:
    new = _copy_as(block, _compat_class(_JetMoeMoE, type(block)))
    new.__dict__["_moestream_act"] = _ActKind(block.activation)
    new._modules["router"] = _copy_as(block.router, _compat_class(_JetMoeRouter, type(block.router)))
    return new


_OWN_BUILDERS: dict[str, Callable[[nn.Module], nn.Module]] = {"dbrx": _build_dbrx, "jetmoe": _build_jetmoe}


def _build(fam: _Family, block: nn.Module) -> nn.Module:
    """A MoE equivalent to ``block`` that owns ``block``'s own Parameter / buffer / shared modules
    (DBRX, JetMoE: a copy of the block running moestream's code, :data:`_OWN_BUILDERS`)."""
    own = _OWN_BUILDERS.get(fam.name)
    if own is not None:
        new = own(block)
        _check_same_tensors(block, new)
        return new
    hf_router = getattr(block, fam.router)
    hf_experts = block.experts
    spec = _experts_spec(fam, hf_experts)
    H = hf_router.weight.shape[1]
    routing = _routing(fam, hf_router)
    names = {"router": fam.router}
    if fam.shared:
        names["shared_expert"] = fam.shared
    if fam.shared_gate:
        names["shared_expert_gate"] = fam.shared_gate
    moe = MoE(
        H,
        spec["intermediate_size"],
        spec["num_experts"],
        int(hf_router.top_k),
        routing,
        shared_expert=getattr(block, fam.shared) if fam.shared else None,
        shared_expert_gate=fam.shared_gate is not None,
        activation=spec["activation"],
        layout=spec["layout"],
        weight_layout=spec["weight_layout"],
        expert_bias=spec["bias"],
        alpha=spec.get("alpha", 1.702),
        limit=spec.get("limit", 7.0),
        jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0),
        return_router=fam.return_router,
        module_names=names,
        device="meta",  # placeholders only: every tensor is replaced by the block's own below
    )
    router = moe.submodule("router")
    for name in ("weight", "bias", "e_score_correction_bias"):
        if getattr(router, name, None) is not None:
            _set_tensor(router, name, getattr(hf_router, name))
    experts = moe.submodule("experts")
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        if getattr(experts, name, None) is not None:
            _set_tensor(experts, name, getattr(hf_experts, name))
    if fam.shared_gate:
        setattr(moe, fam.shared_gate, getattr(block, fam.shared_gate))
    # classes that transformers' isinstance checks (output recorders, weight init) recognise
    if fam.name == "llama4":
        router.__class__ = _compat_class(_Llama4RouterOutput, type(hf_router))
        moe.__class__ = _compat_class(_Llama4MoE, type(block))
    else:
        router.__class__ = _compat_class(Router, type(hf_router))
        moe.__class__ = _compat_class(MoE, type(block))
    experts.__class__ = _compat_class(_PatchedExperts, type(hf_experts))
    # transformers' experts functions run on the replacement too (set_experts_implementation)
    experts.__dict__["_moestream_dispatches"] = "is_transposed" in vars(hf_experts) and hasattr(
        hf_experts, "config"
    )
    _adopt_attributes(experts, hf_experts)
    if isinstance(router, nn.Linear):  # Llama4Router is an nn.Linear: keep what tools read from one
        router.in_features, router.out_features = hf_router.in_features, hf_router.out_features
    # registration order of the original, so state_dict() lists the keys in the same order
    _match_order(moe, block)
    _match_order(router, hf_router)
    _match_order(experts, hf_experts)
    moe.train(block.training)
    _check_same_tensors(block, moe)
    return moe


def _match_order(dst: nn.Module, src: nn.Module) -> None:
    for attr in ("_parameters", "_buffers", "_modules"):
        mine, theirs = dst.__dict__[attr], src.__dict__[attr]
        order = [k for k in theirs if k in mine] + [k for k in mine if k not in theirs]
        dst.__dict__[attr] = {k: mine[k] for k in order}


def _check_same_tensors(orig: nn.Module, new: nn.Module) -> None:
    """The replacement must hold exactly the original's tensors under the original's names."""
    for kind, get in (("parameter", nn.Module.named_parameters), ("buffer", nn.Module.named_buffers)):
        a, b = dict(get(orig)), dict(get(new))
        if a.keys() != b.keys() or any(a[k] is not b[k] for k in a):
            raise RuntimeError(
                f"moestream.patch_moe: internal error, the replacement of {type(orig).__name__} does not hold the "
                f"same {kind}s (original {sorted(a)}, replacement {sorted(b)})"
            )
    a = list(orig.state_dict(keep_vars=True))
    b = list(new.state_dict(keep_vars=True))
    if a != b:
        raise RuntimeError(f"moestream.patch_moe: internal error, state_dict keys differ: {a} != {b}")


# MoE routing uses a fused op, but the blocks stay routable by transformers' own hooks
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Forward (pre-)hooks registered on ``src`` (e.g. transformers' output recorders installed before
    patching) also fire on ``dst``."""
    for attr in _HOOK_DICTS:
        s, d = getattr(src, attr, None), getattr(dst, attr, None)
        if s is None or d is None:
            continue
        for key, value in s.items():
            if key not in d:
                d[key] = value


def _copy_init_flag(src: nn.Module, dst: nn.Module) -> None:
    """transformers marks modules it has initialised (``_is_hf_initialized``) and skips them in later
    ``init_weights`` passes (each nested model's post_init runs one): the replacement of an
    initialised module is initialised too, or its weights would be drawn again."""
    if "_is_hf_initialized" in vars(src):
        dst.__dict__["_is_hf_initialized"] = src.__dict__["_is_hf_initialized"]


def _pairs(fam: _Family, orig: nn.Module, new: nn.Module) -> Iterable[tuple[nn.Module, nn.Module]]:
    yield orig, new
    for name in (fam.router, "experts") if fam.replaced is None else fam.replaced:
        yield getattr(orig, name), getattr(new, name)


def _has_accelerate_hook(module: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def _peft_wrapper(block: nn.Module) -> tuple[str, str] | None:
    """(name, class) of a submodule of `block` that peft wrapped (its tuner layers keep the wrapped
    module as ``base_layer``), or None: the family's attributes (act_fn, weights) are then hidden."""
    for name, m in block.named_modules():
        if type(m).__module__.split(".")[0] == "peft" or isinstance(
            getattr(m, "base_layer", None), nn.Module
        ):
            return name or type(block).__name__, type(m).__name__
    return None


def _loaded_families(only: Iterable[str] | None) -> list[tuple[_Family, type]]:
    wanted = None if only is None else {only} if isinstance(only, str) else set(only)  # one name, or several
    if wanted is not None:
        unknown = wanted - {f.name for f in SUPPORTED_FAMILIES}
        if unknown:
            raise ValueError(
                f"moestream.patch_moe: unknown families {sorted(unknown)}; supported: {_supported_names()}"
            )
    found = []
    for fam in SUPPORTED_FAMILIES:
        if wanted is not None and fam.name not in wanted:
            continue
        # a model of this family can only exist if its modeling module was imported
        mod = sys.modules.get(fam.module)
        cls = getattr(mod, fam.block, None) if mod is not None else None
        if cls is not None:
            found.append((fam, cls))
    return found


def _supported_names() -> str:
    return ", ".join(f"{_FAMILY_TITLES[f.name]} ({f.name}: {f.block})" for f in SUPPORTED_FAMILIES)


def _is_patched(module: nn.Module) -> bool:
    return "_moestream_original" in module.__dict__


def patch_moe(model: nn.Module, *, families: Iterable[str] | None = None) -> int:
    """Replace, in place, every supported sparse MoE block in ``model`` by a :class:`moestream.nn.MoE`
    that shares the block's Parameter objects (no copy, no extra memory; ``state_dict()`` keys and
    ``save_pretrained`` output unchanged). Returns the number of blocks replaced.

    Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4, DBRX and JetMoE
    (``families`` restricts to some of ``"mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
    "deepseek_v3", "gpt_oss", "llama4", "dbrx", "jetmoe"``). Blocks already patched are left alone.
    Raises ``ValueError`` when the model has no block to patch. Undo with :func:`unpatch_moe`.

    DBRX (``DbrxFFN``) and JetMoE (``JetMoeMoE``) keep their own modules: the block and its experts
    module (DBRX) or router (JetMoE) become moestream classes holding the same submodules and
    weights; transformers' DBRX router module (it only computes the logits) stays as it is.
    JetMoE's mixture-of-attention experts (``JetMoeMoA``, split around the attention) are not
    replaced. Their experts' activation, when no fused kernel computes it, runs as the module's
    own between moestream's matmuls (exact, unfused) instead of being refused.

    The config the experts read gets ``_experts_implementation = "moestream"``; a later
    ``model.set_experts_implementation(name)`` is honoured by the patched experts (Llama 4's experts
    do not dispatch by name in transformers either). Works on models being built on the meta device
    (e.g. from each model's ``post_init``): nothing is computed on the default device.
    """
    fams = _loaded_families(families)
    targets: list[tuple[nn.Module, str, nn.Module, _Family]] = []
    already = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if _is_patched(child):
                already += 1
                continue
            for fam, cls in fams:
                if type(child) is cls:
                    targets.append((parent, name, child, fam))
                    break
    if not targets:
        if already:
            return 0
        raise ValueError(
            f"moestream.patch_moe: found no MoE block to patch in {type(model).__name__}. Supported transformers "
            f"families: {_supported_names()}."
        )
    for parent, name, block, fam in targets:
        if _has_accelerate_hook(block):
            raise NotImplementedError(
                f"moestream.patch_moe: {type(block).__name__} carries accelerate hooks (device_map / offloading); "
                "patch the model before dispatching it"
            )
        wrapped = _peft_wrapper(block)
        if wrapped is not None:
            raise NotImplementedError(
                f"moestream.patch_moe: '{wrapped[0]}' of {type(block).__name__} is wrapped by peft's "
                f"{wrapped[1]} (adapters such as LoRA applied before patch_moe); call patch_moe before adding "
                "adapters, or merge them first (merge_and_unload)"
            )
    built = [(parent, name, block, fam, _build(fam, block)) for parent, name, block, fam in targets]
    for parent, name, block, fam, moe in built:
        for src, dst in _pairs(fam, block, moe):
            _copy_hooks(src, dst)
            _copy_init_flag(src, dst)
        moe.__dict__["_moestream_original"] = (block, fam)
        setattr(parent, name, moe)
    # the patched experts run moestream: say so where transformers keeps the choice, so that
    # model.set_experts_implementation(...) afterwards is honoured (and unpatch_moe restores it)
    for _, _, _, _, moe in built:
        cfg = _dispatch_config(moe)
        if cfg is not None:
            moe.__dict__["_moestream_prev_experts_impl"] = cfg._experts_implementation
    for _, _, _, _, moe in built:
        cfg = _dispatch_config(moe)
        if cfg is not None:
            cfg._experts_implementation = "moestream"
    return len(built)


def _dispatch_config(moe: nn.Module):
    """The transformers config whose ``_experts_implementation`` the experts of a patched block read
    (None for experts that do not dispatch through transformers' registry)."""
    if not isinstance(moe, MoE):  # DBRX, JetMoE: their experts never read it, patched or not
        return None
    experts = moe.submodule("experts")
    if not experts.__dict__.get("_moestream_dispatches", False):
        return None
    return experts.__dict__.get("config")


def unpatch_moe(model: nn.Module) -> int:
    """Put back the transformers blocks that :func:`patch_moe` replaced, holding the patched modules'
    current tensors (so training, ``.to()`` or dtype changes made meanwhile are kept). Returns how many
    blocks were restored."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _is_patched(child)
    ]
    for parent, name, moe in targets:
        block, fam = moe.__dict__["_moestream_original"]
        cfg = _dispatch_config(moe)
        prev = moe.__dict__.get("_moestream_prev_experts_impl")
        if cfg is not None and prev is not None and cfg._experts_implementation == "moestream":
            cfg._experts_implementation = prev  # unless changed meanwhile (set_experts_implementation)
        for pname, p in moe.named_parameters():
            _set_path(block, pname, p)
        for bname, b in moe.named_buffers():
            _set_path(block, bname, b)
        for src, dst in _pairs(fam, block, moe):
            _copy_hooks(dst, src)
            _copy_init_flag(dst, src)
        block.train(moe.training)
        setattr(parent, name, block)
    return len(targets)


def _set_path(root: nn.Module, path: str, value: Tensor) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p)
    if leaf in mod._buffers:
        mod._buffers[leaf] = value
    elif leaf in mod._parameters:
        mod._parameters[leaf] = value
    else:
        setattr(mod, leaf, value)


# ----------------------------------------------------------------------------------------------
# expert parallelism: "moestream" in transformers' EP registry too (transformers 5.x)

from . import expert_parallel as _expert_parallel

_expert_parallel.register()
