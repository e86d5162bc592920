"""transformers' offloaded KV cache (``generate(..., cache_implementation="offloaded")``) on an
offloaded model: the same tokens as the default cache and as the model without offloading.

transformers' offloaded cache moves each layer's keys and values to host memory between uses and
prefetches them on a CUDA side stream; its ``update`` calls ``torch.cuda`` unconditionally, so on a
CPU-only torch it fails even without moestream. On a CPU model moestream turns its offloading off
(the cache already lives in host memory); on CUDA it runs as transformers wrote it (the CUDA test is
skipped without a GPU: unverified here)."""

from __future__ import annotations

import copy
import warnings

import moestream as ms
import pytest
import torch
from conftest import cuda
from moestream import testing

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

LAYERS = 6  # more units than the 3 slots of prefetch=2, so every step streams
NEW_TOKENS = 12


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(
        testing.family_config("llama", "offload", layers=LAYERS)
    )
    with torch.no_grad():  # norms away from their init, so every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def generate(model, ids, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def prompt(device: str, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, 7), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_kv_cache_same_tokens_cpu(storage, tmp_path):
    base = build()
    ids = prompt("cpu")
    ref = generate(base, ids)
    model = copy.deepcopy(base)
    ms.offload(model, device="cpu", storage=storage, offload_dir=str(tmp_path / "off"), prefetch=2)
    out = generate(model, ids, cache_implementation="offloaded", return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert torch.equal(generate(model, ids), ref)  # the default cache, on the same streamed model
    # the cache transformers built was the offloaded one, with its offloading off on the CPU
    cache = out.past_key_values
    assert type(cache).__name__ == "DynamicCache" and cache.offloading is False
    assert all(layer.keys.device.type == "cpu" for layer in cache.layers)
    st = ms.offload_stats(model)
    assert st["num_slots"] < st["units"] == LAYERS  # the weights really streamed


def test_offloaded_kv_cache_load_offloaded_cpu(tmp_path):
    base = build(seed=3)
    ids = prompt("cpu", batch=1)
    ref = generate(base, ids)
    base.save_pretrained(tmp_path)
    model = ms.load_offloaded(tmp_path, device="cpu", storage="disk", prefetch=1)
    assert torch.equal(generate(model, ids, cache_implementation="offloaded"), ref)


def test_cpu_model_without_offloading_is_not_changed():
    """Only offloaded models get the CPU fallback: moestream patches nothing in transformers."""
    model = build()
    ids = prompt("cpu", batch=1)
    try:
        generate(model, ids, cache_implementation="offloaded")
    except (AssertionError, RuntimeError) as e:  # transformers' own failure on a CPU-only torch
        assert "CUDA" in str(e)
    else:
        assert torch.cuda.is_available(), "transformers' offloaded cache ran on a CPU-only torch"


@cuda
@pytest.mark.cuda
def test_offloaded_kv_cache_same_tokens_cuda(tmp_path):
    """Unverified without a GPU: the CUDA path as transformers wrote it, on a streamed model."""
    base = build()
    ids = prompt("cuda")
    ref = generate(copy.deepcopy(base).to("cuda"), ids)
    model = ms.offload(copy.deepcopy(base), device="cuda", storage="cpu", prefetch=2)
    out = generate(model, ids, cache_implementation="offloaded", return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert torch.equal(generate(model, ids), ref)
    cache = out.past_key_values
    assert cache.offloading is True
    # between uses the layers' keys and values live in host memory (one may be prefetched back)
    assert sum(layer.keys.device.type == "cpu" for layer in cache.layers) >= LAYERS - 1
