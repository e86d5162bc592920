"""Built-in named shapes for the benchmarks.

A shape fixes the sizes and the numerics of one model's MoE layer (and, for the model/stream
suites, of the whole decoder): hidden size, expert intermediate size, experts, top-k, routing
variant, activation kind and gate/up layout, and whether the weights are stored in transformers'
``[E, out, in]`` layout (``transpose_b=True`` in moestream's ops). Dense shapes (``num_experts == 0``)
are for the streaming suite; the ops/moe suites decline them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int  # expert intermediate size (dense MLP size for dense shapes)
    num_experts: int = 0  # 0: a dense model
    top_k: int = 0
    # routing (moestream.router_topk's arguments)
    score: str = "softmax"
    topk_first: bool = False
    router_bias: bool = False  # selection-only correction bias (DeepSeek-V3)
    num_groups: int = 1
    topk_groups: int = 1
    normalize: bool = False
    scale: float = 1.0
    # expert MLP
    kind: str = "swiglu"
    layout: str = "concat"
    transpose_b: bool = True  # weights [E, 2I, H] / [E, H, I] as transformers stores them
    expert_bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    shared_experts: int = 0
    # transformers' model family whose experts module is the baseline ("" = none)
    hf_family: str = ""
    # the whole model (for the model / stream suites)
    num_layers: int = 1
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    vocab_size: int = 32000
    notes: str = field(default="", compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def routing_kwargs(self) -> dict:
        """Keyword arguments for ``router_topk`` (besides logits, k and the bias tensor)."""
        return {
            "score": self.score,
            "topk_first": self.topk_first,
            "num_groups": self.num_groups,
            "topk_groups": self.topk_groups,
            "normalize": self.normalize,
            "scale": self.scale,
        }

    def routing_desc(self) -> str:
        if not self.is_moe:
            return "dense"
        parts = [self.score]
        if self.topk_first:
            parts.append("topk-first")
        if self.router_bias:
            parts.append("bias")
        if self.num_groups > 1:
            parts.append(f"groups {self.topk_groups}/{self.num_groups}")
        if self.normalize:
            parts.append("norm")
        if self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        return ",".join(parts)

    def describe(self) -> str:
        if not self.is_moe:
            return f"{self.name} (dense: H={self.hidden} I={self.intermediate} layers={self.num_layers})"
        return (
            f"{self.name} (H={self.hidden} I={self.intermediate} E={self.num_experts} k={self.top_k} "
            f"{self.routing_desc()}; {self.kind}/{self.layout}{' +bias' if self.expert_bias else ''}; "
            f"{'[E,out,in]' if self.transpose_b else '[E,in,out]'} weights)"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def model_sizes(self) -> dict:
        """The decoder's sizes in :mod:`moestream.testing`'s generic names."""
        return {name: getattr(self, f) for name, f in _MODEL_SIZES.items()}

    def expert_sizes(self) -> dict:
        """The MoE layer's sizes and numerics in :mod:`moestream.testing`'s generic names."""
        return {name: getattr(self, f) for name, f in _EXPERT_SIZES.items()}


# moestream.testing's generic size names -> Shape fields
_MODEL_SIZES = {
    "vocab": "vocab_size",
    "hidden": "hidden",
    "inter": "intermediate",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "layers": "num_layers",
}
_EXPERT_SIZES = {
    "hidden": "hidden",
    "inter": "intermediate",
    "experts": "num_experts",
    "k": "top_k",
    "norm": "normalize",
    "groups": "num_groups",
    "topk_groups": "topk_groups",
    "scale": "scale",
    "alpha": "alpha",
    "limit": "limit",
}
SHAPES: dict[str, Shape] = {}


def register_shape(shape: Shape, replace: bool = False) -> Shape:
    """Add a named shape (tests and other suites may add their own)."""
    if shape.name in SHAPES and not replace:
        raise ValueError(f"shape {shape.name!r} already registered")
    SHAPES[shape.name] = shape
    return shape


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


def _model(layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """The whole model's sizes (for the model / stream suites)."""
    return {
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
    }


def _renorm(family: str) -> dict:
    """A softmax top-k router with renormalised weights, and the transformers family."""
    return {"normalize": True, "hf_family": family}


_LLAMA3 = {"num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256}

for _s in (
    # The CPU default: a scaled-down Qwen3-MoE layer that runs in seconds on a laptop.
    Shape("qwen3-moe-small", 1024, 512, 32, 4, **_renorm("qwen3_moe"), **_model(8, 16, 4, 64, 32000)),
    # The CPU default of --quick: the same experts and routing at half the width (a quarter of the
    # expert bytes: 48 MiB of float32 weights, so the 4 input sets rotated through still exceed a
    # 105 MiB L3), so that a quick look at a suite takes seconds, not minutes.
    Shape("qwen3-moe-mini", 512, 256, 32, 4, **_renorm("qwen3_moe"), **_model(4, 8, 2, 64, 8192)),
    Shape("mixtral-8x7b", 4096, 14336, 8, 2, **_renorm("mixtral"), **_model(32, 32, 8, 128, 32000)),
    Shape("qwen3-30b-a3b", 2048, 768, 128, 8, **_renorm("qwen3_moe"), **_model(48, 32, 4, 128, 151936)),
    Shape(
        "deepseek-v3",
        7168,
        2048,
        256,
        8,
        score="sigmoid",
        router_bias=True,
        num_groups=8,
        topk_groups=4,
        normalize=True,
        scale=2.5,
        shared_experts=1,
        hf_family="deepseek_v3",
        notes="MLA attention; the first 3 layers are dense",
        **_model(61, 128, 128, 128, 129280),
    ),
    Shape(
        "gpt-oss-20b",
        2880,
        2880,
        32,
        4,
        topk_first=True,
        kind="gptoss",
        layout="interleaved",
        transpose_b=False,
        expert_bias=True,
        hf_family="gpt_oss",
        **_model(24, 64, 8, 64, 201088),
    ),
    Shape("llama-3-8b", 4096, 14336, num_layers=32, num_heads=32, **_LLAMA3),
    Shape("llama-3-70b", 8192, 28672, num_layers=80, num_heads=64, **_LLAMA3),
    # A toy shape for smoke tests and the test-suite: runs in milliseconds.
    Shape("tiny", 64, 32, 8, 2, **_renorm("qwen3_moe"), **_model(2, 4, 2, 16, 256)),
):
    register_shape(_s)

DEFAULT_SHAPE = "qwen3-moe-small"
