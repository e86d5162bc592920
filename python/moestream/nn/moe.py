"""Drop-in MoE modules built on moestream's ops: :class:`Router`, :class:`GroupedExperts`,
:class:`SharedExpert` and :class:`MoE`.

Parameter names follow transformers 5.x (``gate.weight``, ``experts.gate_up_proj``,
``experts.down_proj``, ``shared_expert.gate_proj.weight`` ...) so that a model whose MoE blocks were
swapped for these modules keeps its ``state_dict()`` keys.

Shapes: T tokens, H hidden size, E experts, I expert intermediate size, k experts per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, pipeline

__all__ = ["ROUTING_PRESETS", "GroupedExperts", "MoE", "Router", "Routing", "SharedExpert"]

_ACTIVATIONS = ("swiglu", "geglu", "gptoss")
_LAYOUTS = ("concat", "interleaved")
_WEIGHT_LAYOUTS = ("out_in", "in_out")


@dataclass(frozen=True)
class Routing:
    """How a router turns logits [T, E] into k (weight, expert) pairs per token.

    - ``score``: ``"softmax"`` or ``"sigmoid"``.
    - ``topk_first``: select the k experts on the raw logits, then score only those k (softmax over
      the k for GPT-OSS, sigmoid for Llama 4). Otherwise score all E, then select.
    - ``normalize``: divide the k weights by their sum (+1e-20). ``scale``: multiply them afterwards.
    - ``num_groups`` / ``topk_groups``: group-limited selection (DeepSeek-V3): groups are ranked by the
      sum of their top-2 scores and the experts of the best ``topk_groups`` groups are picked first
      (a k beyond them continues with the other groups' experts, lowest ids first, as transformers).
    - ``router_bias``: the router's linear layer has a bias (GPT-OSS).
    - ``correction_bias``: an ``e_score_correction_bias`` buffer [E] added to the scores for
      selection only (DeepSeek-V3; trained outside autograd).
    - ``logits_fp32``: compute the logits in float32 (float64 for float64 inputs) whatever the model
      dtype (DeepSeek-V3).
    - ``weights_dtype``: ``"float32"`` keeps the routing weights in float32 (Mixtral, DeepSeek-V3);
      ``"logits"`` casts them to the logits' dtype (Qwen2/3-MoE, OLMoE, GPT-OSS, Llama 4).
    - ``weight_on_input``: the routing weight multiplies the expert's input instead of its output
      (Llama 4).
    """

    score: str = "softmax"
    topk_first: bool = False
    normalize: bool = False
    scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    router_bias: bool = False
    correction_bias: bool = False
    logits_fp32: bool = False
    weights_dtype: str = "float32"
    weight_on_input: bool = False

    def __post_init__(self):
        if self.score not in ops.SCORES:
            raise ValueError(f"Routing.score must be one of {ops.SCORES}, got {self.score!r}")
        if self.weights_dtype not in ("float32", "logits"):
            raise ValueError(
                f"Routing.weights_dtype must be 'float32' or 'logits', got {self.weights_dtype!r}"
            )
        if self.num_groups < 1 or not (1 <= self.topk_groups <= self.num_groups):
            raise ValueError(
                f"Routing needs num_groups >= 1 and 1 <= topk_groups <= num_groups, got "
                f"num_groups={self.num_groups}, topk_groups={self.topk_groups}"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> Routing:
        """One of :data:`ROUTING_PRESETS` (``"mixtral"``, ``"qwen2_moe"``, ``"qwen3_moe"``, ``"olmoe"``,
        ``"deepseek_v3"``, ``"gpt_oss"``, ``"llama4"``), with fields overridden by keyword."""
        if name not in ROUTING_PRESETS:
            raise ValueError(f"unknown routing preset {name!r}; known: {sorted(ROUTING_PRESETS)}")
        return dataclasses.replace(ROUTING_PRESETS[name], **overrides)


#: The routing of each supported model family, as transformers 5.x computes it. Qwen2/3-MoE and
#: OLMoE renormalise only when the config's ``norm_topk_prob`` is set (override ``normalize``);
#: DeepSeek-V3's groups and scaling come from its config (override ``num_groups``, ``topk_groups``,
#: ``scale``).
ROUTING_PRESETS: dict[str, Routing] = {
    "mixtral": Routing(score="softmax", normalize=True),
    "qwen2_moe": Routing(score="softmax", weights_dtype="logits"),
    "qwen3_moe": Routing(score="softmax", weights_dtype="logits"),
    "olmoe": Routing(score="softmax", weights_dtype="logits"),
    "deepseek_v3": Routing(score="sigmoid", normalize=True, correction_bias=True, logits_fp32=True),
    "gpt_oss": Routing(score="softmax", topk_first=True, router_bias=True, weights_dtype="logits"),
    "llama4": Routing(score="sigmoid", topk_first=True, weights_dtype="logits", weight_on_input=True),
}


def _factory(device, dtype) -> dict:
    return {"device": device, "dtype": dtype}


class Router(nn.Module):
    """Linear router + fused top-k gating (:func:`moestream.router_topk`).

    Parameters: ``weight`` [E, H]; ``bias`` [E] when ``routing.router_bias`` (else ``None``); buffer
    ``e_score_correction_bias`` [E] float32 when ``routing.correction_bias``.

    ``forward(x [..., H]) -> (logits [T, E], weights [T, k], ids [T, k] int64)`` with T the number of
    tokens in x; the logits come first, as in transformers' routers, so output recorders that read
    index 0 get the logits.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        routing: Routing | str = "mixtral",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        routing = Routing.preset(routing) if isinstance(routing, str) else routing
        if not 1 <= k <= num_experts:
            raise ValueError(f"Router: k must be in [1, num_experts={num_experts}], got k={k}")
        if num_experts % routing.num_groups != 0:
            raise ValueError(f"Router: num_groups={routing.num_groups} must divide num_experts={num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = k
        self.routing = routing
        fk = _factory(device, dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **fk))
        if routing.router_bias:
            self.bias = nn.Parameter(torch.empty(num_experts, **fk))
        else:
            self.register_parameter("bias", None)
        if routing.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.e_score_correction_bias = None
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    def logits(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.hidden_size)
        if self.routing.logits_fp32 and x.dtype != torch.float64:  # (float64 stays float64: gradcheck)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.routing
        logits = self.logits(x)
        weights, ids = ops.router_topk(
            logits,
            self.top_k,
            r.score,
            r.topk_first,
            self.e_score_correction_bias,
            r.num_groups,
            r.topk_groups,
            r.normalize,
            r.scale,
        )
        if r.weights_dtype == "logits":
            weights = weights.to(logits.dtype)
        return logits, weights, ids

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.top_k}, {self.routing}"
        )


class GroupedExperts(nn.Module):
    """E gated MLP experts run as one grouped computation (:func:`moestream.moe_experts`).

    Parameters (transformers' names): ``gate_up_proj`` and ``down_proj``, laid out
    ``[E, 2I, H]`` / ``[E, H, I]`` with ``weight_layout="out_in"`` (transformers' default, each
    expert an ``nn.Linear`` weight) or ``[E, H, 2I]`` / ``[E, I, H]`` with ``"in_out"`` (GPT-OSS,
    Llama 4); ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H] when ``bias``.

    ``activation``: ``"swiglu"`` (silu(gate) * up), ``"geglu"`` (erf gelu), ``"gptoss"``
    (GPT-OSS's clamped variant, with ``alpha`` and ``limit``); ``layout``: gate and up as two halves
    (``"concat"``) or alternating columns (``"interleaved"``).

    ``forward(x [T, H], ids [T, k], weights [T, k]) -> [T, H]``: sum over the k slots of
    weights * expert(x), the signature of transformers' experts modules.

    ``placement``: where the experts are (:mod:`moestream.pipeline`); expert parallelism
    (:func:`moestream.parallelize_experts`) sets an ``ExpertParallel`` whose parameters are this
    rank's shard [E / W, ...] (``num_experts`` stays the global E).
    """

    placement: pipeline.Placement = pipeline.LOCAL

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "swiglu",
        layout: str = "concat",
        weight_layout: str = "out_in",
        bias: bool = False,
        alpha: float = 1.702,
        limit: float = 7.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GroupedExperts: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"GroupedExperts: layout must be one of {_LAYOUTS}, got {layout!r}")
        if weight_layout not in _WEIGHT_LAYOUTS:
            raise ValueError(
                f"GroupedExperts: weight_layout must be one of {_WEIGHT_LAYOUTS}, got {weight_layout!r}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.layout = layout
        self.weight_layout = weight_layout
        self.alpha = float(alpha)
        self.limit = float(limit)
        E, H, I = num_experts, hidden_size, intermediate_size
        fk = _factory(device, dtype)
        try:
            if weight_layout == "out_in":
                self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, **fk))
                self.down_proj = nn.Parameter(torch.empty(E, H, I, **fk))
            else:
                self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I, **fk))
                self.down_proj = nn.Parameter(torch.empty(E, I, H, **fk))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            nbytes = 3 * E * H * I * torch.empty((), **{**fk, "device": "meta"}).element_size()
            raise MemoryError(
                f"GroupedExperts: the weights of num_experts={E} experts of hidden_size={H} and "
                f"intermediate_size={I} take {nbytes / 2**30:.1f} GiB, which could not be allocated "
                "(build the model on the meta device and stream it with ms.offload / ms.load_offloaded)"
            ) from None
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I, **fk))
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, **fk))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        if self.gate_up_proj.device.type != "meta":
            self.reset_parameters()

    @property
    def transpose_b(self) -> bool:
        # moestream's grouped_mm takes b [E, K, N]; the "out_in" layout is [E, N, K].
        return self.weight_layout == "out_in"

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            self.gate_up_proj.normal_(0.0, std)
            self.down_proj.normal_(0.0, std)
            if self.gate_up_proj_bias is not None:
                self.gate_up_proj_bias.zero_()
                self.down_proj_bias.zero_()

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        if self.placement is not pipeline.LOCAL:
            experts = pipeline.Experts(
                self.gate_up_proj,
                self.down_proj,
                self.gate_up_proj_bias,
                self.down_proj_bias,
                self.transpose_b,
            )
            act = pipeline.Gate(self.activation, self.layout, self.alpha, self.limit)
            return pipeline.run(ops.OPS, x, ids, weights, experts, act, placement=self.placement)
        return ops.moe_experts(
            x,
            ids,
            weights,
            self.gate_up_proj,
            self.down_proj,
            self.gate_up_proj_bias,
            self.down_proj_bias,
            self.activation,
            self.layout,
            self.transpose_b,
            self.alpha,
            self.limit,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation}, layout={self.layout}, "
            f"weight_layout={self.weight_layout}, bias={self.gate_up_proj_bias is not None}"
        )


class SharedExpert(nn.Module):
    """A dense gated MLP applied to every token (``down_proj(act(gate_proj(x)) * up_proj(x))``), the
    shared expert of Qwen2-MoE, DeepSeek-V3 and Llama 4, with transformers' parameter names."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "swiglu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if activation not in ("swiglu", "geglu"):
            raise ValueError(f"SharedExpert: activation must be 'swiglu' or 'geglu', got {activation!r}")
        fk = _factory(device, dtype)
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **fk)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **fk)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **fk)

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        g = F.silu(g) if self.activation == "swiglu" else F.gelu(g)
        return self.down_proj(g * self.up_proj(x))


class MoE(nn.Module):
    """A sparse MoE block: router, grouped experts and optional shared expert.

    ``MoE(hidden_size, intermediate_size, num_experts, k, routing="mixtral")`` routes each token to
    k of ``num_experts`` gated MLP experts of width ``intermediate_size``. ``routing`` is a
    :class:`Routing` or the name of a preset (:data:`ROUTING_PRESETS`); Llama 4's routing
    (``weight_on_input``) scales each expert's input by its routing weight.

    Shared expert: ``shared_expert`` is ``None``, an intermediate size (a :class:`SharedExpert` is
    created) or any module mapping [T, H] -> [T, H]; it sees every token and its output is added to
    the routed experts' (ungated: DeepSeek-V3, Llama 4). With ``shared_expert_gate=True`` it is first
    multiplied by ``sigmoid(shared_expert_gate(x))``, a ``Linear(H, 1)`` (Qwen2-MoE).

    ``jitter_noise`` > 0 multiplies the input by uniform noise in [1 - j, 1 + j] in training mode
    (Mixtral's ``router_jitter_noise``).

    ``forward(x [..., H])`` returns y of x's shape, or ``(y, routing weights [T, k])`` with
    ``return_router="weights"`` (GPT-OSS's block), or ``(y, router logits [T, E])`` with
    ``return_router="logits"`` (Llama 4's block).

    ``ep_group``: a ``torch.distributed`` process group (or ``"world"``) to shard the experts over
    (expert parallelism, :func:`moestream.parallelize_experts`): the experts are initialised at
    full size, as without it, then each rank keeps its slice.

    ``module_names`` renames the submodules (defaults ``gate``, ``experts``, ``shared_expert``,
    ``shared_expert_gate``: transformers' names in Mixtral and Qwen2-MoE) to match other families'
    parameter names.
    """

    DEFAULT_NAMES = {
        "router": "gate",
        "experts": "experts",
        "shared_expert": "shared_expert",
        "shared_expert_gate": "shared_expert_gate",
    }

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        k: int,
        routing: Routing | str = "mixtral",
        *,
        shared_expert: int | nn.Module | None = None,
        shared_expert_gate: bool = False,
        activation: str = "swiglu",
        layout: str = "concat",
        weight_layout: str = "out_in",
        expert_bias: bool = False,
        alpha: float = 1.702,
        limit: float = 7.0,
        jitter_noise: float = 0.0,
        return_router: str | None = None,
        module_names: dict[str, str] | None = None,
        ep_group: torch.distributed.ProcessGroup | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        routing = Routing.preset(routing) if isinstance(routing, str) else routing
        if return_router not in (None, "weights", "logits"):
            raise ValueError(f"MoE: return_router must be None, 'weights' or 'logits', got {return_router!r}")
        if shared_expert_gate and shared_expert is None:
            raise ValueError("MoE: shared_expert_gate=True needs a shared_expert")
        names = dict(self.DEFAULT_NAMES)
        if module_names:
            unknown = set(module_names) - set(names)
            if unknown:
                raise ValueError(f"MoE: unknown module_names keys {sorted(unknown)}; known: {sorted(names)}")
            names.update(module_names)
        self._names = names
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = k
        self.jitter_noise = float(jitter_noise)
        self.return_router = return_router
        fk = _factory(device, dtype)
        setattr(self, names["router"], Router(hidden_size, num_experts, k, routing, **fk))
        setattr(
            self,
            names["experts"],
            GroupedExperts(
                num_experts,
                hidden_size,
                intermediate_size,
                activation=activation,
                layout=layout,
                weight_layout=weight_layout,
                bias=expert_bias,
                alpha=alpha,
                limit=limit,
                **fk,
            ),
        )
        self.has_shared_expert = shared_expert is not None
        self.has_shared_expert_gate = bool(shared_expert_gate)
        if isinstance(shared_expert, int):
            shared_expert = SharedExpert(hidden_size, shared_expert, **fk)
        if shared_expert is not None:
            setattr(self, names["shared_expert"], shared_expert)
        if shared_expert_gate:
            setattr(self, names["shared_expert_gate"], nn.Linear(hidden_size, 1, bias=False, **fk))
        if isinstance(ep_group, str) and ep_group != "world":
            raise ValueError(f"MoE: ep_group must be a process group, 'world' or None, got {ep_group!r}")
        if ep_group is not None:
            from ..distributed import shard_experts

            shard_experts(self.submodule("experts"), None if isinstance(ep_group, str) else ep_group)

    def submodule(self, role: str) -> nn.Module:
        """The submodule playing ``role`` ("router", "experts", "shared_expert", "shared_expert_gate"),
        whatever attribute name it is registered under."""
        return getattr(self, self._names[role])

    @property
    def routing(self) -> Routing:
        return self.submodule("router").routing

    def _route(self, router: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, weights, ids) from the router (a hook for routers returning another order)."""
        return router(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        shape = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(-1, self.hidden_size)
        router = self.submodule("router")
        logits, weights, ids = self._route(router, x)
        experts = self.submodule("experts")
        if router.routing.weight_on_input:
            y = pipeline.weight_inputs(experts, x, ids, weights)  # Llama 4: expert(w * x)
        else:
            y = experts(x, ids, weights)
        if self.has_shared_expert:
            s = self.submodule("shared_expert")(x)
            if self.has_shared_expert_gate:
                s = torch.sigmoid(self.submodule("shared_expert_gate")(x)) * s
            y = y + s
        y = y.view(shape)
        if self.return_router == "weights":
            return y, weights
        if self.return_router == "logits":
            return y, logits
        return y
