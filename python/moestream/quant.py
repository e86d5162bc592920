"""Compressed weights: group-wise int8 and int4, the packed format, its reference and its modules.

Offloaded decode and batch-1 MoE decode are bound by the bytes they move (disk, PCIe, or DRAM on a
CPU), so fewer bytes are directly more speed. This module owns the packed format; the kernels that
read it without materialising full-precision weights are ``torch.ops.moestream.qlinear`` and
``qgrouped_mm`` (csrc/quant/, wrapped by :func:`moestream.ops.qlinear` and
:func:`moestream.ops.qgrouped_mm`).

The format
----------
A weight is seen as W [..., N, K]: N output features, K input features (an ``nn.Linear`` weight, or
one expert's projection in transformers' ``[E, N, K]`` "out_in" layout; "in_out" weights [E, K, N]
are transposed first). K is cut into groups of ``group_size`` consecutive input elements
(a multiple of 32 from 32 to 128; it must divide K). Each group has one float32 ``scale`` and, for
the asymmetric variant, one float32 ``zero`` (an integer-valued zero point in code units):

- codes are unsigned, ``bits`` wide (8 or 4): ``code in [0, 2^bits)``;
- symmetric: ``w ~ (code - 2^(bits-1)) * scale``, ``scale = max|w| / (2^(bits-1) - 1)`` per group
  (codes 1..255 for int8, 1..15 for int4; the code 0 is unused), no ``zero`` tensor;
- asymmetric: ``w ~ (code - zero) * scale``, ``scale = (max - min) / (2^bits - 1)``,
  ``zero = round(-min / scale)`` clamped to the code range.

Either way the reconstruction error of every element is at most ``scale / 2`` (round to nearest).

Tensors (for W [..., N, K], G = K / group_size):

- ``qweight`` uint8 [..., N, K] for int8; uint8 [..., N, K / 2] for int4, two codes per byte: in
  every run of 32 consecutive elements of a row (16 bytes), byte j holds element j in its low
  nibble and element j + 16 in its high nibble. That order lets a SIMD kernel turn 16 bytes into
  two vectors of 16 consecutive elements with one widening load, a mask and a shift;
- ``scale`` float32 [..., N, G];
- ``zero`` float32 [..., N, G] (asymmetric only).

Float32 scales cost 4 bytes per group: with group 64, int4 weights take 0.5625 bytes per element
(3.6x fewer than bfloat16) and int8 weights 1.0625 (1.9x fewer).

In a model (:func:`quantize_model`), a quantized tensor called ``NAME`` in the original state dict
becomes the tensors ``NAME.qweight``, ``NAME.scale`` (and ``NAME.zero``), held by a
:class:`PackedWeight` submodule in its place. Safetensors files written by ``ms.save_layered(...,
compress=...)`` carry ``__metadata__["moestream.quant"]``: a JSON object mapping each ``NAME`` to its
scheme (``{"scheme": "int4", "bits": 4, "group_size": 64, "symmetric": true, "shape": [E, N, K],
"transposed": false, "dtype": "bfloat16", "packing": "moestream-v1"}``); readers check it against
the tensors (:func:`check_metadata`).

What is compressed: the ``nn.Linear`` layers inside the repeated decoder blocks (attention
projections, dense MLPs, shared experts) and the routed experts' ``gate_up_proj`` / ``down_proj``.
What is not: embeddings, norms, the MoE router (its logits pick the experts: a small tensor whose
errors change routing), biases, and the ``lm_head`` (outside the blocks).

Activations
-----------
On the CPU the kernels multiply the packed codes either with the activations as they are
(``"float"``: weight-only) or with the activations quantized on each call to int8 per row and
group of ``group_size`` elements, scale ``max|a| / 127`` (``"int8"``: AVX-512 VNNI integer
products, what makes the compressed path faster than bfloat16 on CPUs whose vector units are slow
next to their memory; a group with an outlier only coarsens its own 64 elements). The default
``"auto"`` is int8 for bfloat16 / float16 activations, float for float32; :func:`set_activations`
chooses per model. The int8 activations add about 0.5% relative error per matmul (an int4 weight
alone costs about 10%); groups of more than 16 rows of one expert, and CPUs without AVX-512 VNNI,
use the float kernels.

Inference only: the quantized modules have no gradients.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "GROUP_SIZES",
    "PACKING",
    "SCHEMES",
    "PackedWeight",
    "QuantScheme",
    "QuantizedGroupedExperts",
    "QuantizedLinear",
    "apply_metadata",
    "check_metadata",
    "dequantize",
    "metadata_of",
    "pack_int4",
    "quantize",
    "quantize_model",
    "quantized_state_dict",
    "set_activations",
    "unpack_int4",
]

SCHEMES = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 96, 128)
PACKING = "moestream-v1"
METADATA_KEY = "moestream.quant"


@dataclass(frozen=True)
class QuantScheme:
    """A compression scheme: ``name`` "int8" | "int4", ``group_size`` input elements per scale,
    ``symmetric`` (no zero point)."""

    name: str = "int4"
    group_size: int = 64
    symmetric: bool = True

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"moestream.quant: unknown scheme {self.name!r}; known: {sorted(SCHEMES)}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"moestream.quant: group_size must be one of {GROUP_SIZES} (a multiple of 32 from 32 to 128), "
                f"got {self.group_size!r}"
            )

    @property
    def bits(self) -> int:
        return SCHEMES[self.name]

    @classmethod
    def parse(cls, compress: str | QuantScheme | None, group_size: int = 64, symmetric: bool = True):
        """``None`` -> None; ``"int4"`` / ``"int8"`` (with group_size and symmetric) or a
        :class:`QuantScheme` -> the scheme. Unknown names raise ValueError."""
        if compress is None or isinstance(compress, QuantScheme):
            return compress
        if not isinstance(compress, str):
            raise TypeError(f"moestream: compress must be None, 'int8' or 'int4', got {compress!r}")
        return cls(compress, group_size, symmetric)


# ----------------------------------------------------------------------------------------------
# the reference: quantize / dequantize in plain PyTorch


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes [..., K] in [0, 16), K a multiple of 32 -> packed uint8 [..., K / 2] (byte j of
    every 16-byte run: element j low nibble, element j + 16 high nibble)."""
    K = codes.shape[-1]
    if K % 32 != 0:
        raise ValueError(f"moestream.quant.pack_int4: the last dimension ({K}) must be a multiple of 32")
    c = codes.reshape(*codes.shape[:-1], K // 32, 2, 16)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], K // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`: uint8 [..., K / 2] -> codes uint8 [..., K]."""
    Kh = packed.shape[-1]
    p = packed.reshape(*packed.shape[:-1], Kh // 16, 1, 16)
    return torch.cat([p & 0xF, p >> 4], dim=-2).reshape(*packed.shape[:-1], Kh * 2)


def _groups_of(w: Tensor, group_size: int, name: str) -> Tensor:
    K = w.shape[-1]
    if K % group_size != 0:
        raise ValueError(
            f"moestream.quant: group_size {group_size} does not divide the input dimension K = {K} of "
            f"{name} (shape {list(w.shape)})"
        )
    return w.reshape(*w.shape[:-1], K // group_size, group_size)


def quantize(
    w: Tensor,
    scheme: str | QuantScheme = "int4",
    group_size: int = 64,
    symmetric: bool = True,
    *,
    name: str = "weight",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """W [..., N, K] (any float dtype) -> (qweight uint8, scale float32 [..., N, K/g], zero float32
    [..., N, K/g] or None) in the packed format of this module (round to nearest, computed in
    float32). ``name`` names the tensor in errors."""
    s = QuantScheme.parse(scheme, group_size, symmetric)
    if not w.is_floating_point():
        raise TypeError(f"moestream.quant: {name} must be a floating tensor, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"moestream.quant: {name} must be [..., N, K], got shape {list(w.shape)}")
    g = _groups_of(w.detach().float(), s.group_size, name)
    top = (1 << s.bits) - 1
    if s.symmetric:
        qmax = (1 << (s.bits - 1)) - 1
        amax = g.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        q = torch.round(g / scale).clamp(-qmax, qmax) + (1 << (s.bits - 1))
        zero = None
    else:
        lo = g.amin(dim=-1, keepdim=True)
        hi = g.amax(dim=-1, keepdim=True)
        fallback = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))  # a constant group
        scale = torch.where(hi > lo, (hi - lo) / top, fallback)
        zero = torch.round(-lo / scale).clamp(0, top)
        q = (torch.round(g / scale) + zero).clamp(0, top)
        zero = zero.squeeze(-1).contiguous()
    codes = q.to(torch.uint8).reshape(w.shape)
    qweight = pack_int4(codes) if s.bits == 4 else codes
    return qweight.contiguous(), scale.squeeze(-1).contiguous(), zero


def dequantize(
    qweight: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The packed tensors -> W [..., N, K] in ``dtype``: ``(code - zero) * scale`` in float32
    (zero = 2^(bits-1) when None), rounded once to ``dtype``. The oracle of the kernels."""
    if bits not in (4, 8):
        raise ValueError(f"moestream.quant.dequantize: bits must be 4 or 8, got {bits}")
    codes = unpack_int4(qweight) if bits == 4 else qweight
    K = codes.shape[-1]
    c = codes.float().reshape(*codes.shape[:-1], K // group_size, group_size)
    z = torch.tensor(float(1 << (bits - 1))) if zero is None else zero.unsqueeze(-1)
    w = (c - z) * scale.unsqueeze(-1)
    return w.reshape(codes.shape).to(dtype)


# ----------------------------------------------------------------------------------------------
# modules


class PackedWeight(nn.Module):
    """One compressed weight: buffers ``qweight``, ``scale`` and (asymmetric) ``zero`` in the packed
    format, W of logical shape ``shape`` = [..., N, K] (``transposed``: the original tensor was
    [..., K, N], an "in_out" expert weight). ``dtype`` is the dtype of the original weight, the one
    the layer computes in. ``activations`` ("auto", "int8" or "float"; set it with
    :func:`set_activations`) is how the CPU kernels treat the activations multiplied with it (see
    :func:`moestream.ops.qgrouped_mm`); it is not part of the saved format."""

    activations: str = "auto"

    def __init__(
        self,
        scheme: QuantScheme,
        shape: Iterable[int],
        dtype: torch.dtype,
        *,
        transposed: bool = False,
        device: torch.device | str | None = None,
        name: str = "weight",
    ):
        super().__init__()
        self.scheme = scheme
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.transposed = bool(transposed)
        *lead, N, K = self.shape
        if K % scheme.group_size != 0:
            _groups_of(torch.empty(*self.shape, device="meta"), scheme.group_size, name)
        kp = K // 2 if scheme.bits == 4 else K
        G = K // scheme.group_size
        self.register_buffer("qweight", torch.empty(*lead, N, kp, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(*lead, N, G, dtype=torch.float32, device=device))
        if scheme.symmetric:
            self.zero = None
        else:
            self.register_buffer("zero", torch.empty(*lead, N, G, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(
        cls, w: Tensor, scheme: QuantScheme, *, transposed: bool = False, name: str = "weight"
    ) -> PackedWeight:
        """Quantizes w ([..., N, K]; with ``transposed`` w is [..., K, N] and is transposed first)."""
        src = w.detach().transpose(-1, -2) if transposed else w.detach()
        pw = cls(scheme, src.shape, w.dtype, transposed=transposed, device=w.device, name=name)
        if w.device.type != "meta":
            q, s, z = quantize(src, scheme, name=name)
            pw.qweight.copy_(q)
            pw.scale.copy_(s)
            if z is not None:
                pw.zero.copy_(z)
        return pw

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def group_size(self) -> int:
        return self.scheme.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W [..., N, K] in ``dtype`` (default: the original dtype), materialised."""
        return dequantize(
            self.qweight, self.scale, self.zero, self.bits, self.group_size, dtype or self.dtype
        )

    def metadata(self) -> dict:
        """The entry of this weight in ``__metadata__["moestream.quant"]``."""
        return {
            "scheme": self.scheme.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.scheme.symmetric,
            "shape": list(self.shape),
            "transposed": self.transposed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "packing": PACKING,
        }

    def extra_repr(self) -> str:
        sym = "symmetric" if self.scheme.symmetric else "asymmetric"
        return (
            f"{self.scheme.name}, group_size={self.group_size}, {sym}, shape={list(self.shape)}, "
            f"dtype={self.dtype}, activations={self.activations}"
        )


def set_activations(model: nn.Module, activations: str) -> nn.Module:
    """How the CPU kernels treat the activations of every compressed weight in ``model``:
    ``"auto"`` (the default: int8 for bfloat16 / float16 activations, as they are for float32),
    ``"int8"`` (quantized per row and group on each call, the AVX-512 VNNI kernels: the fastest,
    about 0.5% from the exact product) or ``"float"`` (weight-only: the activations as they are).
    Returns ``model``."""
    from ._op_checks import ACTIVATIONS

    if activations not in ACTIVATIONS:
        raise ValueError(
            f"moestream.quant: activations must be 'auto', 'int8' or 'float', got {activations!r}"
        )
    for m in model.modules():
        if isinstance(m, PackedWeight):
            m.activations = activations
    return model


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` with a compressed weight (``weight`` is a :class:`PackedWeight`, so the
    state dict names are ``weight.qweight``, ``weight.scale`` ...; ``bias`` stays in its dtype).
    ``forward(x [..., K]) -> [..., N]`` in x's dtype through :func:`moestream.ops.qlinear`."""

    def __init__(self, weight: PackedWeight, bias: Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantizedLinear: the weight must be [N, K], got {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, name: str = "weight") -> QuantizedLinear:
        return cls(PackedWeight.from_weight(linear.weight, scheme, name=name), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        from . import ops

        w = self.weight
        return ops.qlinear(x, w.qweight, w.scale, w.zero, w.bits, w.group_size, self.bias, w.activations)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _below_autograd(*tensors: Tensor | None):
    """Where no gradient is asked for (the path is inference only), the ops of the expert path run
    below the autograd dispatch key: no Python autograd layer per op, ~0.1 ms less per decode step
    of a layer on the CPU. With a gradient asked for, autograd stays on, so the compressed matmuls'
    backward can say why there is none."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    ):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


class QuantizedGroupedExperts(nn.Module):
    """E gated MLP experts with compressed ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
    (:class:`PackedWeight` submodules, always in the packed [E, N, K] orientation; biases stay in
    their dtype). ``forward(x [T, H], ids [T, k], weights [T, k]) -> [T, H]``, the signature of
    :class:`moestream.nn.GroupedExperts` and of transformers' experts modules: the expert pipeline
    with :func:`moestream.ops.qgrouped_mm` in place of ``grouped_mm``."""

    def __init__(
        self,
        gate_up_proj: PackedWeight,
        down_proj: PackedWeight,
        gate_up_proj_bias: Tensor | None = None,
        down_proj_bias: Tensor | None = None,
        *,
        activation: str = "swiglu",
        layout: str = "concat",
        alpha: float = 1.702,
        limit: float = 7.0,
    ):
        super().__init__()
        E, two_i, H = gate_up_proj.shape
        if tuple(down_proj.shape) != (E, H, two_i // 2):
            raise ValueError(
                f"QuantizedGroupedExperts: down_proj must be [E, H, I] = [{E}, {H}, {two_i // 2}], "
                f"got {list(down_proj.shape)}"
            )
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, two_i // 2
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        for n, b in (("gate_up_proj_bias", gate_up_proj_bias), ("down_proj_bias", down_proj_bias)):
            if b is None:
                self.register_parameter(n, None)
            else:
                setattr(self, n, nn.Parameter(b.detach(), requires_grad=False))
        self.activation, self.layout = activation, layout
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        from . import ops, pipeline

        dtype = self.gate_up_proj.dtype
        xin = x.to(dtype)
        experts = pipeline.Experts(
            self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias, True
        )
        act = pipeline.Gate(self.activation, self.layout, self.alpha, self.limit)
        with _below_autograd(xin, weights):
            out = pipeline.run(ops.QUANT_OPS, xin, ids, weights, experts, act)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation}, layout={self.layout}"
        )


# ----------------------------------------------------------------------------------------------
# converting a model


def _experts_spec(m: nn.Module) -> dict | None:
    """What a QuantizedGroupedExperts needs to replace experts module m (ms.nn.GroupedExperts, or a
    transformers experts module with fused gate_up_proj / down_proj), or None when m is neither."""
    from .nn import GroupedExperts

    if isinstance(m, GroupedExperts):
        return {
            "transposed": not m.transpose_b,
            "activation": m.activation,
            "layout": m.layout,
            "alpha": m.alpha,
            "limit": m.limit,
            "biases": (m.gate_up_proj_bias, m.down_proj_bias),
        }
    w1, w2 = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(w1, Tensor) and isinstance(w2, Tensor) and w1.dim() == 3 and w2.dim() == 3):
        return None
    if not getattr(m, "has_gate", True) or getattr(m, "has_post_expert_norm", False):
        return None
    from .integrations.transformers import _experts_gate

    gate = _experts_gate(m)
    if not gate:
        return None
    has_bias = getattr(m, "has_bias", False)
    return {
        "transposed": bool(getattr(m, "is_transposed", False)),
        "activation": gate[0],
        "layout": gate[1],
        "alpha": float(getattr(m, "alpha", 1.702)),
        "limit": float(getattr(m, "limit", 7.0)),
        "biases": (m.gate_up_proj_bias, m.down_proj_bias) if has_bias else (None, None),
    }


def _block_list(model: nn.Module, blocks) -> list[tuple[str, nn.Module]]:
    if blocks is None:
        from .offload.model_view import find_blocks

        prefix, mods = find_blocks(model)[:2]
        return [(f"{prefix}.{i}", b) for i, b in enumerate(mods)]
    if isinstance(blocks, str):
        ml = model.get_submodule(blocks)
        return [(f"{blocks}.{i}", b) for i, b in enumerate(ml)]
    names = {id(m): n for n, m in model.named_modules()}
    return [(names.get(id(b), "?"), b) for b in blocks]


def _router_like(name: str, module: nn.Module) -> bool:
    # MoE routers are small Linear(H, E) layers whose errors change which experts run: kept.
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router", "shared_expert_gate") and not hasattr(module, "up_proj")


def _targets(model: nn.Module, blocks) -> list[tuple[str, nn.Module, dict | None]]:
    """(full name, module, experts spec or None for a Linear) of everything quantize_model compresses."""
    out = []
    for bname, block in _block_list(model, blocks):
        for name, m in block.named_modules():
            if not name or isinstance(m, (QuantizedLinear, QuantizedGroupedExperts, PackedWeight)):
                continue
            if any(isinstance(p, (QuantizedGroupedExperts, QuantizedLinear)) for p in _parents(block, name)):
                continue
            if isinstance(m, nn.Linear):
                if not _router_like(name, m):
                    out.append((f"{bname}.{name}", m, None))
            else:
                spec = _experts_spec(m)
                if spec is not None:
                    out.append((f"{bname}.{name}", m, spec))
    return out


def _parents(root: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")[:-1]
    mods, m = [], root
    for p in parts:
        m = getattr(m, p)
        mods.append(m)
    return mods


def _quantized_module(full: str, m: nn.Module, spec: dict | None, scheme: QuantScheme) -> nn.Module:
    """The replacement of module m (a Linear, or experts with `spec`), quantized (meta stays meta)."""
    if spec is None:
        return QuantizedLinear.from_linear(m, scheme, name=f"{full}.weight")
    t = spec["transposed"]
    w1 = PackedWeight.from_weight(m.gate_up_proj, scheme, transposed=t, name=f"{full}.gate_up_proj")
    w2 = PackedWeight.from_weight(m.down_proj, scheme, transposed=t, name=f"{full}.down_proj")
    return QuantizedGroupedExperts(
        w1,
        w2,
        *spec["biases"],
        activation=spec["activation"],
        layout=spec["layout"],
        alpha=spec["alpha"],
        limit=spec["limit"],
    )


def _set_module(model: nn.Module, full: str, new: nn.Module) -> None:
    parent_name, _, attr = full.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_model(
    model: nn.Module,
    compress: str | QuantScheme = "int4",
    group_size: int = 64,
    symmetric: bool = True,
    *,
    blocks: str | Iterable[nn.Module] | None = None,
) -> int:
    """Replaces, in place, the ``nn.Linear`` layers of the model's repeated blocks by
    :class:`QuantizedLinear` and its experts modules (``ms.nn.GroupedExperts`` or transformers'
    fused experts) by :class:`QuantizedGroupedExperts`. Embeddings, norms, routers, biases and
    everything outside the blocks (``lm_head``) keep their dtype. Works on meta models too (the
    skeleton of a compressed checkpoint). ``blocks`` is found automatically (see ``ms.offload``).
    Returns the number of weights compressed (0 when the model is already quantized)."""
    scheme = QuantScheme.parse(compress, group_size, symmetric)
    if scheme is None:
        return 0
    if getattr(model, "_moestream_offload", None) is not None:
        raise RuntimeError("moestream.quantize_model: quantize the model before offloading it")
    done = {m.scheme for m in model.modules() if isinstance(m, PackedWeight)}
    if done and done != {scheme}:
        raise ValueError(
            f"moestream.quantize_model: the model is already quantized with {sorted(map(str, done))}, not {scheme}"
        )
    count = 0
    with torch.no_grad():
        for full, m, spec in _targets(model, blocks):
            _set_module(model, full, _quantized_module(full, m, spec, scheme))
            count += 1 if spec is None else 2
    return count


def quantized_state_dict(
    model: nn.Module, scheme: QuantScheme, blocks: str | Iterable[nn.Module] | None = None
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """The state dict the model would have after :func:`quantize_model`, and its metadata, without
    changing the model (the packed tensors are computed here; the others are the model's own)."""
    state = model.state_dict(keep_vars=True)
    meta: dict[str, dict] = {}
    with torch.no_grad():
        for full, m, spec in _targets(model, blocks):
            new = _quantized_module(full, m, spec, scheme)
            for n in ("weight",) if spec is None else ("gate_up_proj", "down_proj"):
                state.pop(f"{full}.{n}", None)
            for n, t in new.state_dict(keep_vars=True).items():
                state[f"{full}.{n}"] = t
            for n, pw in new.named_modules():
                if isinstance(pw, PackedWeight):
                    meta[f"{full}.{n}"] = pw.metadata()
    for name, pw in model.named_modules():  # weights quantized earlier
        if isinstance(pw, PackedWeight):
            meta.setdefault(name, pw.metadata())
    return state, meta


def apply_metadata(model: nn.Module, meta: Mapping[str, Mapping]) -> int:
    """Converts, in place, the modules of a (meta) model skeleton that ``meta`` (a
    ``moestream.quant`` metadata object) names into their quantized versions, with each entry's
    scheme. Returns the number of modules converted; a name the model lacks raises ValueError."""
    by_module: dict[str, dict[str, Mapping]] = {}
    for name, e in meta.items():
        owner, _, attr = name.rpartition(".")
        by_module.setdefault(owner, {})[attr] = e
    count = 0
    with torch.no_grad():
        for owner, entries in by_module.items():
            try:
                m = model.get_submodule(owner)
            except AttributeError:
                raise ValueError(
                    f"moestream: compressed tensor '{owner}.{next(iter(entries))}' has no module in the model"
                ) from None
            if isinstance(m, (QuantizedLinear, QuantizedGroupedExperts)):
                continue
            e = next(iter(entries.values()))
            scheme = QuantScheme(e["scheme"], int(e["group_size"]), bool(e["symmetric"]))
            if isinstance(m, nn.Linear) and set(entries) == {"weight"}:
                new = _quantized_module(owner, m, None, scheme)
            else:
                spec = _experts_spec(m)
                if spec is None or set(entries) != {"gate_up_proj", "down_proj"}:
                    raise ValueError(
                        f"moestream: the checkpoint compresses {sorted(owner + '.' + a for a in entries)} but "
                        f"'{owner}' is a {type(m).__name__}, which moestream.quant cannot hold compressed"
                    )
                new = _quantized_module(owner, m, spec, scheme)
            _set_module(model, owner, new)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# metadata


def metadata_of(model: nn.Module) -> dict[str, dict]:
    """``{NAME: entry}`` for every :class:`PackedWeight` of the model (NAME: the original tensor's
    state-dict name; its tensors are NAME.qweight, NAME.scale, NAME.zero)."""
    return {name: m.metadata() for name, m in model.named_modules() if isinstance(m, PackedWeight)}


def check_metadata(
    meta: Mapping[str, Mapping] | str, tensors: Mapping[str, tuple[torch.dtype, tuple]], where: str = ""
) -> None:
    """Checks a ``moestream.quant`` metadata object (or its JSON) against the (dtype, shape) of the
    tensors it describes; a mismatch raises ValueError naming the tensor (and ``where``)."""
    if isinstance(meta, str):
        meta = json.loads(meta)
    at = f" in {where}" if where else ""
    for name, e in meta.items():
        try:
            scheme = QuantScheme(e["scheme"], int(e["group_size"]), bool(e["symmetric"]))
            shape = [int(d) for d in e["shape"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"moestream: compressed tensor '{name}'{at} has bad metadata {dict(e)!r}: {err}"
            ) from None
        if e.get("packing", PACKING) != PACKING:
            raise ValueError(
                f"moestream: compressed tensor '{name}'{at} uses packing {e['packing']!r}, not {PACKING!r}"
            )
        if int(e.get("bits", scheme.bits)) != scheme.bits:
            raise ValueError(
                f"moestream: compressed tensor '{name}'{at}: bits {e['bits']} disagree with {scheme.name}"
            )
        *lead, N, K = shape
        if K % scheme.group_size:
            raise ValueError(
                f"moestream: compressed tensor '{name}'{at}: group_size {scheme.group_size} does not divide K = {K}"
            )
        G = K // scheme.group_size
        want = {
            "qweight": (torch.uint8, [*lead, N, K // 2 if scheme.bits == 4 else K]),
            "scale": (torch.float32, [*lead, N, G]),
        }
        if not scheme.symmetric:
            want["zero"] = (torch.float32, [*lead, N, G])
        elif f"{name}.zero" in tensors:
            raise ValueError(
                f"moestream: compressed tensor '{name}.zero'{at} exists but the metadata says symmetric"
            )
        for part, (dtype, shp) in want.items():
            key = f"{name}.{part}"
            if key not in tensors:
                raise ValueError(
                    f"moestream: compressed tensor '{key}'{at} is missing ({scheme.name} metadata names it)"
                )
            got_dtype, got_shape = tensors[key]
            if got_dtype != dtype or list(got_shape) != shp:
                raise ValueError(
                    f"moestream: compressed tensor '{key}'{at} is {got_dtype} {list(got_shape)} but its metadata "
                    f"({scheme.name}, group_size {scheme.group_size}, shape {shape}) needs {dtype} {shp}"
                )
