"""Tiny random transformers MoE models for the patch tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import torch

VOCAB = 97

# (hidden, expert intermediate, experts, k, head_dim); the second size has odd hidden / intermediate sizes
SIZES = {
    "small": dict(hidden=32, inter=24, experts=4, k=2),
    "odd": dict(hidden=45, inter=37, experts=6, k=3),
}


def _common(s: dict) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        initializer_range=0.1,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _mixtral(s):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **_common(s), intermediate_size=s["inter"], num_local_experts=s["experts"], num_experts_per_tok=s["k"]
    )
    return MixtralForCausalLM, cfg


def _qwen2_moe(s):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **_common(s),
        intermediate_size=2 * s["inter"],
        moe_intermediate_size=s["inter"],
        shared_expert_intermediate_size=s["inter"] + 3,
        num_experts=s["experts"],
        num_experts_per_tok=s["k"],
        norm_topk_prob=s["hidden"] % 2 == 1,  # both settings across the sizes
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return Qwen2MoeForCausalLM, cfg


def _qwen3_moe(s):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **_common(s),
        intermediate_size=2 * s["inter"],
        moe_intermediate_size=s["inter"],
        num_experts=s["experts"],
        num_experts_per_tok=s["k"],
        norm_topk_prob=s["hidden"] % 2 == 0,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return Qwen3MoeForCausalLM, cfg


def _olmoe(s):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    # OLMoE's q/k norms span hidden_size, so head_dim must be hidden / heads (and even, for RoPE)
    c = _common(s)
    c.pop("head_dim")
    if c["hidden_size"] % 6:
        c["hidden_size"] = 42
    cfg = OlmoeConfig(
        **c,
        intermediate_size=s["inter"],
        num_experts=s["experts"],
        num_experts_per_tok=s["k"],
        norm_topk_prob=s["hidden"] % 2 == 1,
    )
    return OlmoeForCausalLM, cfg


def _deepseek_v3(s):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    c = _common(s)
    c.pop("head_dim")
    c["num_hidden_layers"] = 3
    c["num_key_value_heads"] = c["num_attention_heads"]  # MLA
    # group-limited routing: 8 or 12 experts in 4 groups, 2 groups kept
    experts = 8 if s["hidden"] % 2 == 0 else 12
    cfg = DeepseekV3Config(
        **c,
        intermediate_size=2 * s["inter"],
        moe_intermediate_size=s["inter"],
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=s["k"],
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=24 if s["hidden"] % 2 == 0 else None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return DeepseekV3ForCausalLM, cfg


def _gpt_oss(s):
    from transformers import GptOssConfig, GptOssForCausalLM

    c = _common(s)
    c["max_position_embeddings"] = 131072  # the default YaRN parameters expect the real context length
    cfg = GptOssConfig(
        **c,
        intermediate_size=s["inter"],
        num_local_experts=s["experts"],
        num_experts_per_tok=s["k"],
        sliding_window=6,
    )
    return GptOssForCausalLM, cfg


def _llama4(s):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        **_common(s),
        intermediate_size=s["inter"],
        intermediate_size_mlp=2 * s["inter"],
        num_local_experts=s["experts"],
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        attention_chunk_size=64,
    )
    return Llama4ForCausalLM, cfg


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
}


def build(family: str, size: str = "small", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random model of ``family`` in eval mode, eager attention and eager (reference) experts.

    Zero-initialised tensors (biases, DeepSeek's score-correction bias) are given random values so
    that every path is exercised."""
    model_cls, cfg = FAMILIES[family](SIZES[size])
    torch.manual_seed(seed)
    model = model_cls._from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=dtype
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") and t.is_floating_point():
                t.copy_((torch.randn(t.shape, generator=g) * 0.1).to(t.dtype))
            elif name.endswith("e_score_correction_bias"):
                t.copy_((torch.rand(t.shape, generator=g) * 0.05).to(t.dtype))
    return model.eval()


def input_ids(batch: int = 2, seq: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
