"""The expert pipeline, written once.

    route -> group (permute) -> dispatch -> expert MLP (grouped_mm -> gated activation -> grouped_mm)
    -> combine -> ungroup (weighted unpermute)

Routing happens before (``router_topk`` or a model's own router); everything after it is here, as
small stage functions and one driver, :func:`run`, parameterised by

- the op set (:class:`ExpertOps`): :data:`moestream.ops.OPS` (moestream's kernels, each
  differentiable through its own backward) or :data:`moestream.reference.OPS` (plain PyTorch, the
  oracle's ops);
- the placement (:class:`Placement`): where the experts are. ``dispatch`` takes the rows grouped by
  expert and returns the rows, groups and expert weights that the expert MLP runs on; ``combine``
  takes the MLP's output rows back to the grouped order. :data:`LOCAL` (all experts on this device,
  in expert order) is the identity. This is the seam where an expert cache fetches missing experts
  into device slots (the experts the MLP sees are then the cache's slots, a subset mapped by slot)
  and where expert parallelism sends rows to the ranks that hold their experts (all-to-all, and
  the reverse all-to-all in ``combine``).

Who calls it: ``moestream.ops`` (the differentiable composite, the op's own backward, the CUDA
kernel of ``moe_experts``), ``moestream.reference.moe_experts``, the bench's float64 oracle (one
expert at a time, through :func:`expert_mlp`), the transformers experts function (custom
activations, post-expert norms) and ``nn.MoE`` (:func:`weight_inputs`, Llama 4). Two things are
deliberately not built on it: the fused CPU inference kernel of ``moe_experts``
(csrc/experts/moe_experts_cpu.cpp, the same stages fused natively) and
``reference.moe_experts_loop``, the independent per-expert loop everything here is checked against.

Shapes: T tokens, k slots per token, E experts, H hidden, I expert intermediate size, N = T * k rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LOCAL",
    "ExpertOps",
    "Experts",
    "Gate",
    "Placement",
    "expert_mlp",
    "group",
    "moe_experts",
    "run",
    "ungroup",
    "weight_inputs",
]


class ExpertOps(NamedTuple):
    """The ops the pipeline is made of, with moestream's signatures:

    - ``permute(x [T, H], ids [T, k], num_experts) -> (rows [N, H], perm [T, k], offsets [E])``
    - ``grouped_mm(a [N, K], b [E, K, N'] or [E, N', K], offsets, transpose_b, bias [E, N'] | None)``
    - ``gated_activation(x [N, 2I], kind, layout, alpha, limit) -> [N, I]``
    - ``unpermute(y [N, H], perm [T, k], weights [T, k] | None) -> [T, H]``
    """

    permute: Callable[..., tuple[Tensor, Tensor, Tensor]]
    grouped_mm: Callable[..., Tensor]
    gated_activation: Callable[..., Tensor]
    unpermute: Callable[..., Tensor]


class Experts(NamedTuple):
    """The weights of E gated-MLP experts, as ``grouped_mm`` takes them: group g is expert g.

    w_gate_up [E, H, 2I] and w_down [E, I, H], or [E, 2I, H] and [E, H, I] with ``transpose_b``
    (transformers' layout); b_gate_up [E, 2I] and b_down [E, H] optional (GPT-OSS)."""

    w_gate_up: Tensor
    w_down: Tensor
    b_gate_up: Tensor | None = None
    b_down: Tensor | None = None
    transpose_b: bool = False

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    def narrow(self, start: int, length: int) -> Experts:
        """Experts [start, start + length) as views (one expert; a rank's shard)."""
        n = lambda t: None if t is None else t.narrow(0, start, length)
        return Experts(n(self.w_gate_up), n(self.w_down), n(self.b_gate_up), n(self.b_down), self.transpose_b)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Experts:
        """The same experts with ``fn`` applied to every weight and bias (e.g. a dtype conversion)."""
        m = lambda t: None if t is None else fn(t)
        return Experts(m(self.w_gate_up), m(self.w_down), m(self.b_gate_up), m(self.b_down), self.transpose_b)


class Gate(NamedTuple):
    """A fused gated activation of ``gated_activation``: kind ``swiglu``, ``geglu`` or ``gptoss``,
    layout ``concat`` or ``interleaved``; ``alpha`` and ``limit`` are GPT-OSS's."""

    kind: str = "swiglu"
    layout: str = "concat"
    alpha: float = 1.702
    limit: float = 7.0


#: The activation between the two matmuls: a fused :class:`Gate`, or any function of the gate/up
#: projections [N, 2I] (or [N, I] for ungated experts) returning [N, I] in the weights' dtype.
Activation = Gate | Callable[[Tensor], Tensor]


class Placement:
    """Where the experts are: the step between "rows grouped by expert" and "the expert MLP on the
    experts at hand". The base class is the identity (every expert on this device, group g =
    expert g); :data:`LOCAL` is its instance.

    A subclass overrides:

    - ``num_experts(experts)``: the number of experts ids refer to (the global E: an expert-parallel
      rank holds only a shard of ``experts``);
    - ``dispatch(rows, offsets, experts) -> (rows', offsets', experts', state)``: rows [N, H] in
      expert order with cumulative ends ``offsets`` [E]. Returns the rows to run, their groups'
      cumulative ends and the weights of those groups (an expert cache: its device slots, with the
      rows re-grouped by slot; expert parallelism: the rows received from every rank, grouped by
      local expert, and the local shard) and anything ``combine`` needs;
    - ``combine(y', state) -> y``: the MLP's output rows back to the ``rows`` order of ``dispatch``
      (the reverse all-to-all; undoing a re-grouping).

    Both run inside autograd when gradients are needed, so they are written with differentiable
    operations (the backward of an all-to-all is the reverse all-to-all).
    """

    def num_experts(self, experts: Experts) -> int:
        return experts.num_experts

    def dispatch(
        self, rows: Tensor, offsets: Tensor, experts: Experts
    ) -> tuple[Tensor, Tensor, Experts, Any]:
        return rows, offsets, experts, None

    def combine(self, y: Tensor, state: Any) -> Tensor:
        return y


LOCAL = Placement()


# ----------------------------------------------------------------------------------------------
# stages


def group(ops: ExpertOps, x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of x in (expert, token, slot) order -> (rows [N, H], perm [T, k], offsets [E])."""
    return ops.permute(x, ids, num_experts)


def expert_mlp(
    ops: ExpertOps,
    rows: Tensor,
    offsets: Tensor,
    experts: Experts,
    act: Activation,
    post: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Each group's rows through its expert: down(act(gate_up(rows) + b_gate_up)) + b_down, then
    ``post`` (a post-expert norm) -> [N, H]. Rows past offsets[-1] give zeros (before ``post``)."""
    tb = experts.transpose_b
    h = ops.grouped_mm(rows, experts.w_gate_up, offsets, tb, experts.b_gate_up)
    a = ops.gated_activation(h, *act) if isinstance(act, Gate) else act(h)
    y = ops.grouped_mm(a, experts.w_down, offsets, tb, experts.b_down)
    return y if post is None else post(y)


def ungroup(ops: ExpertOps, y: Tensor, perm: Tensor, weights: Tensor | None) -> Tensor:
    """Weighted combine back to token order: out[t] = sum_s weights[t, s] * y[perm[t, s]]."""
    return ops.unpermute(y, perm, weights)


# ----------------------------------------------------------------------------------------------
# the driver


def run(
    ops: ExpertOps,
    x: Tensor,
    ids: Tensor,
    weights: Tensor | None,
    experts: Experts,
    act: Activation,
    *,
    placement: Placement = LOCAL,
    post: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The expert path: x [T, H], ids [T, k], weights [T, k] (None: unweighted sum over slots) ->
    [T, H] in the dtype ``ops.unpermute`` returns (the rows' dtype).

    No host synchronisation of its own: on CUDA it syncs only where an op or the placement does.
    Zero tokens, k = 0 and I = 0 go through the same stages (empty rows; with I = 0 each routed slot
    contributes its b_down)."""
    rows, perm, offsets = group(ops, x, ids, placement.num_experts(experts))
    rows, offsets, local, state = placement.dispatch(rows, offsets, experts)
    y = expert_mlp(ops, rows, offsets, local, act, post)
    y = placement.combine(y, state)
    return ungroup(ops, y, perm, weights)


def moe_experts(
    ops, x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, kind, layout, transpose_b, alpha, limit
) -> Tensor:
    """:func:`run` on the arguments of ``moestream::moe_experts``, in its order (flat tensors and
    activation parameters, all given)."""
    experts = Experts(w_gate_up, w_down, b_gate_up, b_down, transpose_b)
    return run(ops, x, ids, weights, experts, Gate(kind, layout, alpha, limit))


def weight_inputs(
    experts_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, ids: Tensor, weights: Tensor
) -> Tensor:
    """The routing weight applied to each expert's input instead of its output (Llama 4):
    sum_s expert_{ids[t, s]}(weights[t, s] * x[t]). Each (token, slot) becomes its own row routed to
    one expert with weight 1, so ``experts_fn(x, ids, weights)`` is any expert path (fused or not)."""
    T, k = ids.shape
    rows = (x.unsqueeze(1) * weights.to(x.dtype).unsqueeze(-1)).reshape(T * k, x.shape[-1])
    ones = torch.ones(T * k, 1, dtype=x.dtype, device=x.device)
    y = experts_fn(rows, ids.reshape(T * k, 1), ones)
    return y if k == 1 else y.view(T, k, x.shape[-1]).sum(dim=1)
