"""transformers models for tests and benchmarks, built from the tables of :mod:`moestream.testing`:
configs, random causal LMs, transformers' own experts modules holding given weights, random sharded
checkpoints, and accelerate's offloading of a checkpoint (the stream bench suite's baseline).

transformers and accelerate are imported inside the functions only.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def make_config(config_class: str, kwargs: Mapping[str, object]):
    import transformers

    return getattr(transformers, config_class)(**kwargs)


def module_unavailable(module: str) -> str | None:
    """Why ``module`` (a transformers module) cannot be imported here; None when it can."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"transformers is not installed ({e.msg}); pip install 'moestream[transformers]'"
    return None


def build_causal_lm(
    model_class: str,
    config,
    dtype: torch.dtype,
    seed: int,
    attn_implementation: str = "eager",
    experts_implementation: str | None = "eager",
) -> nn.Module:
    """``model_class`` from ``config`` with transformers' random initialisation under
    ``torch.manual_seed(seed)``; zero-initialised tensors (biases, DeepSeek's score-correction bias)
    then get random values from their own generator; in eval mode."""
    import transformers

    torch.manual_seed(seed)
    kw = {"attn_implementation": attn_implementation, "dtype": dtype}
    if experts_implementation is not None:
        kw["experts_implementation"] = experts_implementation
    model = getattr(transformers, model_class)._from_config(config, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") and t.is_floating_point():
                t.copy_((torch.randn(t.shape, generator=g) * 0.1).to(t.dtype))
            elif name.endswith("e_score_correction_bias"):
                t.copy_((torch.rand(t.shape, generator=g) * 0.05).to(t.dtype))
    return model.eval()


def _quiet_transformers():
    import transformers

    log = transformers.logging
    prev = log.get_verbosity()
    log.set_verbosity_error()
    return lambda: log.set_verbosity(prev)


def build_experts(
    module: str,
    experts_class: str,
    config,
    implementation: str,
    weights: Mapping[str, Tensor | None],
    requires_grad: bool = False,
) -> nn.Module:
    """``module.experts_class(config)`` built on the meta device (no memory for its own weights),
    with ``config._experts_implementation = implementation`` ("eager": the model's own loop over
    experts; "grouped_mm": ``transformers.integrations.moe``), then given ``weights`` (name ->
    tensor, None entries skipped) as its parameters, sharing their storage."""
    restore = _quiet_transformers()
    try:
        config._experts_implementation = implementation
        cls = getattr(importlib.import_module(module), experts_class)
        with torch.device("meta"):
            experts = cls(config)
    finally:
        restore()
    for name, t in weights.items():
        if t is None:
            continue
        have = getattr(experts, name, None)
        if have is None or tuple(have.shape) != tuple(t.shape):
            got = None if have is None else tuple(have.shape)
            raise ValueError(f"{experts_class}.{name} has shape {got}, the given weight is {tuple(t.shape)}")
        setattr(experts, name, nn.Parameter(t.detach(), requires_grad=requires_grad))
    leftover = [n for n, p in experts.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{experts_class} has parameters that were not given: {leftover}")
    return experts


def write_random_checkpoint(
    out_dir: str, config, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A transformers-format sharded checkpoint of ``config``'s causal LM with random weights: one
    shard per decoder layer (``model.layers.<i>.``), then one for the rest, written tensor group by
    tensor group. Norm weights are uniform in [0.9, 1.1], the others in [-0.02, 0.02]. Returns
    (layer shards in layer order, other shards)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config.save_pretrained(out_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, t in skeleton.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):05d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append((name, t.shape))
    del skeleton
    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    n = len(groups)
    weight_map: dict[str, str] = {}
    layers, rest = [], []
    for i, key in enumerate(sorted(groups)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in groups[key]:
            t = torch.empty(shape, device=gen_dev, dtype=torch.float32)
            if name.endswith("norm.weight"):
                t.uniform_(0.9, 1.1, generator=g)
            else:
                t.uniform_(-0.02, 0.02, generator=g)
            tensors[name] = t.to(dtype).cpu()
        path = os.path.join(out_dir, fname)
        save_file(tensors, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        (rest if key == "rest" else layers).append(path)
        del tensors
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return layers, rest


def accelerate_offloaded(
    checkpoint: str, dtype: torch.dtype, device: torch.device, offload_dir: str
) -> tuple[nn.Module, str]:
    """The checkpoint loaded by transformers and offloaded by accelerate: ``cpu_offload`` onto a
    GPU, ``disk_offload`` (into ``offload_dir``) on the CPU. Returns (model, name of the method)."""
    from accelerate import cpu_offload, disk_offload
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    if device.type == "cuda":
        cpu_offload(model, execution_device=device)
        return model, "accelerate.cpu_offload"
    disk_offload(model, offload_dir=offload_dir, execution_device=device)
    gc.collect()
    return model, "accelerate.disk_offload"


# words of the offline test tokenizer after its four special tokens; ids beyond them are "w<id>"
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "an",
    "are",
    "not",
    "have",
    "but",
    "which",
    "one",
    "all",
    "were",
    "we",
    "when",
    "there",
    "can",
    "more",
    "if",
    "no",
    "out",
    "so",
    "up",
    "what",
    "about",
    "into",
    "than",
    "them",
    "only",
    "model",
    "layer",
    "expert",
    "experts",
    "weights",
    "stream",
    "streams",
    "token",
    "tokens",
    "fast",
    "MoE",
    "layers",
    "GPU",
    "memory",
    "disk",
    ".",
    ",",
    "!",
]


def load_causal_lm(checkpoint_dir: str, dtype: torch.dtype, device) -> nn.Module:
    """The checkpoint's model, all in memory on `device`, in eval mode (an in-memory baseline)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()


def write_tokenizer(out_dir: str, vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> None:
    """A word-level tokenizer of ``vocab_size`` ids built offline (no download), saved in
    ``out_dir`` as ``tokenizer.json`` + ``tokenizer_config.json`` so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it: ``<pad>``, ``<s>``, ``</s>`` at the given ids,
    ``<unk>`` next, then common English words, then ``w<id>`` fillers; words split on whitespace
    and punctuation and decoded joined by spaces. The prompt gets ``<s>`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {pad_id: "<pad>", bos_id: "<s>", eos_id: "</s>"}
    if len(specials) != 3 or max(specials) >= vocab_size:
        raise ValueError(f"write_tokenizer: pad/bos/eos ids must be distinct and < vocab_size={vocab_size}")
    vocab: dict[str, int] = {tok: i for i, tok in specials.items()}
    words = iter(["<unk>", *_WORDS])
    for i in range(vocab_size):
        if i not in specials:
            vocab[next(words, f"w{i}")] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, none before punctuation
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
