"""What tests and benchmarks share: the error measure, the tolerance rules, tiny per-family models.

- **Error measure**: the norm-wise relative error ``||out - ref|| / ||ref||`` in float64, computed in
  blocks of rows so that a large output never needs a float64 copy (:func:`rel_err`, :class:`ErrAcc`,
  :func:`worst_rel_err` over named outputs); :func:`mismatch_fraction` for outputs compared exactly.
- **Tolerances** (DESIGN.md): float32 within 1e-5 relative of the float64 reference; bfloat16 /
  float16 within 2x of what the reference itself loses at that dtype, both measured against float64;
  index outputs exact (:func:`tolerance`, :func:`assert_accurate`). The benchmarks' correctness gate
  is looser (:data:`BENCH_TOLERANCE`): its shapes are much larger and it also gates baselines that
  compute in another order.
- **Model families**: :data:`FAMILIES` is the one table of transformers families (config, causal-LM
  and experts classes, how the generic sizes of :data:`SIZES` are spelled in the family's config, its
  own sizes). :func:`config_kwargs` reads it; :func:`family_config`, :func:`build_model`,
  :func:`build_experts` and :func:`write_random_checkpoint` build from it. transformers is imported
  only inside those functions (the building is :mod:`moestream.integrations.hf_models`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "BENCH_TOLERANCE",
    "FAMILIES",
    "GENERIC_KEYS",
    "MOE_FAMILIES",
    "RTOL",
    "SIZES",
    "ErrAcc",
    "Family",
    "assert_accurate",
    "bench_tolerance",
    "block_rows",
    "build_experts",
    "build_model",
    "config_kwargs",
    "experts_unavailable",
    "family_config",
    "input_ids",
    "mismatch_fraction",
    "rel_err",
    "tolerance",
    "worst_rel_err",
    "write_random_checkpoint",
    "write_tokenizer",
]

# ---------------------------------------------------------------------------------------------
# the error measure

_BLOCK_BYTES = 64 << 20  # float64 working set per block of rows


def block_rows(width: int, itemsize: int = 8) -> int:
    """Rows of ``width`` elements that fit a 64 MiB working block (float64 by default)."""
    return max(1, _BLOCK_BYTES // max(1, width * itemsize))


class ErrAcc:
    """Accumulates ||out - ref||^2 and ||ref||^2 in float64 over pieces; non-finite outputs give inf."""

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0
        self.finite = True

    def add(self, out: Tensor, ref: Tensor) -> None:
        if out.shape != ref.shape:
            raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
        o = out.detach().reshape(-1, out.shape[-1] if out.dim() else 1)
        r = ref.detach().reshape(-1, ref.shape[-1] if ref.dim() else 1)
        step = block_rows(o.shape[1] if o.dim() == 2 else 1)
        for s in range(0, o.shape[0], step):
            oc = o[s : s + step].to(torch.float64)
            rc = r[s : s + step].to(device=oc.device, dtype=torch.float64)  # (tests compare with CPU refs)
            if not bool(torch.isfinite(oc).all()):
                self.finite = False
            self.num += float((oc - rc).pow(2).sum())
            self.den += float(rc.pow(2).sum())

    def value(self) -> float:
        if not self.finite:
            return math.inf
        return math.sqrt(self.num / self.den) if self.den > 0 else math.sqrt(self.num)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``||out - ref||`` when ref is 0); inf when ``out`` has
    non-finite values; a shape mismatch raises ValueError."""
    acc = ErrAcc()
    acc.add(out, ref)
    return acc.value()


def worst_rel_err(outputs: Mapping[str, Tensor | None], refs: Mapping[str, Tensor]) -> tuple[float, str]:
    """Largest relative error over the named outputs -> (error, name of the worst output)."""
    worst, which = 0.0, ""
    for name, ref in refs.items():
        out = outputs.get(name)
        if out is None:
            return math.inf, f"{name} missing"
        e = rel_err(out, ref)
        if not e <= worst:  # also catches nan
            worst, which = e, name
    return worst, which


def mismatch_fraction(out: Tensor, ref: Tensor) -> float:
    """Fraction of elements that differ (exact comparison, for index and data-movement outputs)."""
    if out.shape != ref.shape:
        return 1.0
    if out.numel() == 0:
        return 0.0
    return float((out.detach() != ref.detach()).sum()) / out.numel()


# ---------------------------------------------------------------------------------------------
# tolerances

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # against the float64 reference

# The benchmarks' gate (by the dtype of the output compared). float32 (and the router's float32
# weights whatever the logits' dtype): 10x the tests' 1e-5, for shapes with much longer sums and
# baselines that sum in another order (transformers' eager loop, torch.mm). bfloat16 / float16: the
# reference itself loses about 4e-3 (bf16) / 5e-4 (fp16) on one matmul at the bench sizes and ~1e-2
# on the whole expert path; 5e-2 still flags any real bug (a wrong expert, a missing weight or bias,
# a wrong activation give errors of order 1).
BENCH_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2, torch.float64: 1e-10}


def tolerance(dtype: torch.dtype, ref_err: float | None = None) -> float:
    """DESIGN.md's tolerance for an output of ``dtype`` against the float64 reference: :data:`RTOL`
    for float32 / float64; for bfloat16 / float16, 2x ``ref_err`` (what the reference run at that
    dtype loses against float64), plus a term of ``eps * 1e-3`` so that exact cases do not fail on 0."""
    if dtype in RTOL:
        return RTOL[dtype]
    if ref_err is None:
        raise ValueError(f"the tolerance at {dtype} is relative to the reference's own error: give ref_err")
    return 2 * ref_err + torch.finfo(dtype).eps * 1e-3


def assert_accurate(out: Tensor, ref64: Tensor, ref_lowp: Tensor | None = None, what: str = "") -> None:
    """Assert DESIGN.md's rule. ``out``: our result; ``ref64``: the reference in float64; ``ref_lowp``:
    the reference run at ``out``'s dtype (for bfloat16 / float16; without it, 1e-5 applies)."""
    assert torch.isfinite(out.detach()).all(), f"{what} non-finite values in output"
    err = rel_err(out, ref64)
    if out.dtype in RTOL or ref_lowp is None:
        tol = RTOL.get(out.dtype, RTOL[torch.float32])
        assert err <= tol, f"{what} relative error {err:.3e} > {tol:.0e}"
    else:
        assert torch.isfinite(ref_lowp.detach()).all(), (
            f"{what} non-finite values in the low-precision reference"
        )
        ref_err = rel_err(ref_lowp, ref64)
        tol = tolerance(out.dtype, ref_err)
        assert err <= tol, f"{what} relative error {err:.3e} > 2 x reference's {ref_err:.3e} at {out.dtype}"


def bench_tolerance(dtype: torch.dtype) -> float:
    return BENCH_TOLERANCE[dtype]


# ---------------------------------------------------------------------------------------------
# model families

# Generic size names -> the config key most families use (None: not a config key unless the family
# says so). Other names in a size are config keys and pass through unchanged. ``dense_inter`` (the
# dense MLP of families that also have experts) defaults to 2 x ``inter``.
GENERIC_KEYS: dict[str, str | None] = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "inter": "intermediate_size",  # the experts' intermediate size (the MLP's in dense families)
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_pos": "max_position_embeddings",
    "experts": "num_experts",
    "k": "num_experts_per_tok",
    "norm": "norm_topk_prob",
    "dense_inter": None,
    "shared_inter": None,
    "groups": None,
    "topk_groups": None,
    "scale": None,
    "alpha": None,
    "limit": None,
}


@dataclass(frozen=True)
class Family:
    """One transformers family: class names (in ``transformers``; the experts class in
    ``transformers.models.<family>.modeling_<family>``), the config keys of the generic size names
    that differ from :data:`GENERIC_KEYS`, config kwargs given at every size, and the family's own
    sizes (added to :data:`SIZES` of the same name)."""

    config: str
    model: str
    experts: str = ""
    keys: Mapping[str, str | None] = field(default_factory=dict)
    fixed: Mapping[str, object] = field(default_factory=dict)
    sizes: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


_TESTS = {
    "vocab": 97,
    "layers": 2,
    "heads": 3,
    "kv_heads": 1,
    "head_dim": 8,
    "max_pos": 128,
    "initializer_range": 0.1,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.02,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_BENCH = {"max_pos": 4096, "initializer_range": 0.05, "kv_heads": 2}

SIZES: dict[str, dict[str, object]] = {
    # the patch tests, at two sizes (the second with odd hidden and intermediate sizes)
    "small": dict(_TESTS, hidden=32, inter=24, experts=4, k=2),
    "odd": dict(_TESTS, hidden=45, inter=37, experts=6, k=3),
    # the offload tests: more layers than the slots of prefetch 3
    "offload": {"vocab": 96, "hidden": 32, "layers": 6, "heads": 4},
    # the model bench suite: small, but shaped like the real thing (expert width / hidden, experts,
    # k); "bench-tiny" is its --shape tiny (seconds on a CPU)
    "bench": dict(_BENCH, vocab=4096, hidden=512, heads=8, head_dim=64),
    "bench-tiny": dict(_BENCH, vocab=256, hidden=64, heads=4, head_dim=16),
}

# DeepSeek-V3 at the test sizes: MLA (as many kv heads as heads, no head_dim), group-limited routing
# (8 or 12 experts in 4 groups, 2 kept), one dense layer first, then two MoE layers
_DSV3_TESTS = {
    "layers": 3,
    "kv_heads": 3,
    "groups": 4,
    "topk_groups": 2,
    "scale": 2.5,
    "norm": True,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
_QWEN_MOE = {"decoder_sparse_step": 1, "mlp_only_layers": []}  # every layer a MoE layer
_OFFLOAD_DENSE = {"inter": 64, "kv_heads": 2}
# GPT-OSS: its default YaRN parameters expect the real context length
_GPT_OSS_TESTS = {"max_pos": 131072, "sliding_window": 6}
_LLAMA4_TESTS = {"k": 1, "attention_chunk_size": 64}

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "MixtralConfig",
        "MixtralForCausalLM",
        "MixtralExperts",
        keys={"experts": "num_local_experts", "norm": None},
        sizes={
            "offload": {"inter": 48, "kv_heads": 2, "experts": 4, "k": 2},
            "bench": {"inter": 1792, "experts": 8, "k": 2},
            "bench-tiny": {"inter": 128, "experts": 8, "k": 2},
        },
    ),
    "qwen2_moe": Family(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeExperts",
        keys={
            "inter": "moe_intermediate_size",
            "dense_inter": "intermediate_size",
            "shared_inter": "shared_expert_intermediate_size",
        },
        fixed=_QWEN_MOE,
        # both settings of norm_topk_prob across the sizes
        sizes={"small": {"norm": False, "shared_inter": 27}, "odd": {"norm": True, "shared_inter": 40}},
    ),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeExperts",
        keys={"inter": "moe_intermediate_size", "dense_inter": "intermediate_size"},
        fixed=_QWEN_MOE,
        sizes={
            "small": {"norm": True},
            "odd": {"norm": False},
            "offload": {"inter": 16, "dense_inter": 64, "kv_heads": 2, "head_dim": 8, "experts": 4, "k": 2},
            "bench": {"inter": 192, "dense_inter": 1536, "experts": 32, "k": 4, "norm": True},
            "bench-tiny": {"inter": 32, "dense_inter": 128, "experts": 32, "k": 4, "norm": True},
        },
    ),
    "olmoe": Family(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        "OlmoeExperts",
        # q/k norms span hidden_size: head_dim is hidden / heads (even, for RoPE): 42 / 3
        keys={"head_dim": None},
        sizes={"small": {"hidden": 42, "norm": False}, "odd": {"hidden": 42, "norm": True}},
    ),
    "deepseek_v3": Family(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Experts",
        keys={
            "inter": "moe_intermediate_size",
            "dense_inter": "intermediate_size",
            "experts": "n_routed_experts",
            "groups": "n_group",
            "topk_groups": "topk_group",
            "scale": "routed_scaling_factor",
            "head_dim": None,
        },
        sizes={
            "small": dict(_DSV3_TESTS, experts=8, q_lora_rank=24),
            "odd": dict(_DSV3_TESTS, experts=12, q_lora_rank=None),
        },
    ),
    "gpt_oss": Family(
        "GptOssConfig",
        "GptOssForCausalLM",
        "GptOssExperts",
        keys={"experts": "num_local_experts", "norm": None, "alpha": "swiglu_alpha", "limit": "swiglu_limit"},
        sizes={"small": _GPT_OSS_TESTS, "odd": _GPT_OSS_TESTS},
    ),
    "llama4": Family(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        "Llama4TextExperts",
        keys={"experts": "num_local_experts", "dense_inter": "intermediate_size_mlp"},
        fixed={"interleave_moe_layer_step": 1},
        sizes={"small": _LLAMA4_TESTS, "odd": _LLAMA4_TESTS},
    ),
    # dense families (the offload tests; Llama also the stream bench suite)
    "llama": Family("LlamaConfig", "LlamaForCausalLM", sizes={"offload": _OFFLOAD_DENSE}),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", sizes={"offload": _OFFLOAD_DENSE}),
    "mistral": Family(
        "MistralConfig", "MistralForCausalLM", sizes={"offload": dict(_OFFLOAD_DENSE, sliding_window=None)}
    ),
    # tied embeddings
    "gemma": Family(
        "GemmaConfig", "GemmaForCausalLM", sizes={"offload": {"inter": 64, "kv_heads": 1, "head_dim": 8}}
    ),
    # model.decoder.layers, learned positions, biases
    "opt": Family(
        "OPTConfig",
        "OPTForCausalLM",
        keys={"inter": "ffn_dim"},
        sizes={"offload": {"inter": 64, "max_pos": 128, "word_embed_proj_dim": 32}},
    ),
}

MOE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.experts)


def config_kwargs(family: str, size: str | Mapping[str, object] = "small", **overrides: object) -> dict:
    """The config keyword arguments of ``family`` at ``size``: a name in :data:`SIZES` (with the
    family's own entry of that name on top) or a mapping of generic sizes and config keys;
    ``overrides`` use the same names (``layers=4``, ``vocab_size=...``)."""
    fam = FAMILIES[family]
    merged: dict[str, object] = dict(fam.fixed)
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
        merged.update(SIZES[size])
        merged.update(fam.sizes.get(size, {}))
    else:
        merged.update(size)
    merged.update(overrides)
    if "inter" in merged and fam.keys.get("dense_inter"):
        merged.setdefault("dense_inter", 2 * int(merged["inter"]))
    kwargs = {}
    for name, value in merged.items():
        key = fam.keys[name] if name in fam.keys else GENERIC_KEYS.get(name, name)
        if key is not None:
            kwargs[key] = value
    return kwargs


def family_config(family: str, size: str | Mapping[str, object] = "small", **overrides: object):
    """The transformers config of ``family`` at ``size`` (see :func:`config_kwargs`)."""
    from .integrations import hf_models

    return hf_models.make_config(FAMILIES[family].config, config_kwargs(family, size, **overrides))


def build_model(
    family: str,
    size: str | Mapping[str, object] = "small",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    attn_implementation: str = "eager",
    experts_implementation: str | None = "eager",
    **overrides: object,
) -> nn.Module:
    """A random ``family`` causal LM at ``size`` (nothing downloaded), in eval mode: transformers'
    initialisation under ``torch.manual_seed(seed)``, then the tensors it zero-initialises (biases,
    DeepSeek's score-correction bias) given random values, so that every path is exercised."""
    from .integrations import hf_models

    config = family_config(family, size, **overrides)
    return hf_models.build_causal_lm(
        FAMILIES[family].model, config, dtype, seed, attn_implementation, experts_implementation
    )


def input_ids(
    batch: int = 2, seq: int = 11, seed: int = 0, vocab: int = int(SIZES["small"]["vocab"])
) -> Tensor:
    """Random token ids in [3, vocab) (0..2 are the test models' pad / bos / eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def experts_unavailable(family: str) -> str | None:
    """Why transformers' experts module of ``family`` cannot be built here (None: it can)."""
    fam = FAMILIES.get(family)
    if fam is None or not fam.experts:
        return f"no transformers experts module for family {family!r}"
    from .integrations import hf_models

    return hf_models.module_unavailable(f"transformers.models.{family}.modeling_{family}")


def build_experts(
    family: str,
    sizes: Mapping[str, object],
    implementation: str,
    weights: Mapping[str, Tensor | None],
    requires_grad: bool = False,
) -> nn.Module:
    """transformers' experts module of ``family`` with ``config._experts_implementation`` =
    ``implementation``, built on the meta device from a config of ``sizes`` (generic names), holding
    ``weights`` (``gate_up_proj``, ``down_proj`` and optionally ``gate_up_proj_bias``,
    ``down_proj_bias``; the same storage, no copy) in the family's own layout."""
    from .integrations import hf_models

    fam = FAMILIES[family]
    config = family_config(family, sizes)
    return hf_models.build_experts(
        f"transformers.models.{family}.modeling_{family}",
        fam.experts,
        config,
        implementation,
        weights,
        requires_grad,
    )


def write_random_checkpoint(
    out_dir: str,
    family: str,
    size: str | Mapping[str, object],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: object,
) -> tuple[list[str], list[str]]:
    """A sharded transformers checkpoint of a random ``family`` model (one shard per decoder layer,
    one for the rest), written shard by shard so that no process holds the whole model (values
    are drawn on ``device``: fast on a GPU). Returns (layer shards in order, other shards)."""
    from .integrations import hf_models

    config = family_config(family, size, **overrides)
    return hf_models.write_random_checkpoint(out_dir, config, dtype, torch.device(device), seed)


# ---------------------------------------------------------------------------------------------
# compressed weights: accuracy of a quantized random model against the uncompressed one

#: Sizes of the accuracy report's tiny models: every input dimension a multiple of the group size.
#: initializer_range 0.02 as in real checkpoints' configs (the test sizes' 0.1 makes attention so
#: sharp that small perturbations flip it).
_QUANT = dict(_TESTS, hidden=128, heads=4, kv_heads=2, head_dim=32, layers=4, initializer_range=0.02)
QUANT_SIZES: dict[str, dict[str, object]] = {
    "llama": dict(_QUANT, inter=256),
    "qwen3_moe": dict(_QUANT, inter=128, dense_inter=256, experts=8, k=2, norm=True),
}


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def quant_accuracy(
    family: str,
    compress: str = "int4",
    group_size: int = 64,
    symmetric: bool = True,
    *,
    size: str | Mapping[str, object] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int = 2,
    seq: int = 16,
    activations: str = "auto",
) -> dict:
    """A random ``family`` model (``size``; default :data:`QUANT_SIZES`) against the same model
    after ``moestream.quant.quantize_model`` (CPU kernels' ``activations``: see
    ``moestream.quant.set_activations``): for each decoder layer the relative error of its output
    hidden states (end to end: the quantized model's own earlier layers feed it), then the logits'
    relative error and cosine similarity and the share of positions whose arg-max token agrees."""
    from .quant import quantize_model, set_activations

    size = QUANT_SIZES[family] if size is None else size
    ref = build_model(family, size, dtype, seed)
    q = build_model(family, size, dtype, seed)
    quantize_model(q, compress, group_size, symmetric)
    set_activations(q, activations)
    vocab = int(ref.config.vocab_size)
    ids = input_ids(batch, seq, seed, vocab)

    def run(model):
        outs: list[Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
            for layer in model.model.layers
        ]
        try:
            with torch.no_grad():
                logits = model(ids).logits
        finally:
            for h in hooks:
                h.remove()
        return outs, logits

    ref_layers, ref_logits = run(ref)
    q_layers, q_logits = run(q)
    return {
        "family": family,
        "compress": compress,
        "group_size": group_size,
        "symmetric": symmetric,
        "activations": activations,
        "layers": [rel_err(a, b) for a, b in zip(q_layers, ref_layers)],
        "logits_rel_err": rel_err(q_logits, ref_logits),
        "logits_cosine": _cosine(q_logits, ref_logits),
        "top1_agree": float((q_logits.argmax(-1) == ref_logits.argmax(-1)).double().mean()),
    }
def write_tokenizer(out_dir: str, vocab_size: int = int(SIZES["small"]["vocab"])) -> None:
    """A word-level tokenizer of ``vocab_size`` ids built offline, saved in ``out_dir`` (next to a
    :func:`write_random_checkpoint` checkpoint, so that ``AutoTokenizer.from_pretrained`` and
    ``python -m moestream run`` find it); pad / bos / eos are ids 0 / 1 / 2 like the test models'."""
    from .integrations import hf_models

    hf_models.write_tokenizer(
        out_dir,
        vocab_size,
        int(_TESTS["pad_token_id"]),
        int(_TESTS["bos_token_id"]),
        int(_TESTS["eos_token_id"]),
    )
