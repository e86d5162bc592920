"""Weight streaming end to end: greedy generation with offloaded transformers models must give exactly
the tokens of the same model without offloading (several families, storage cpu and disk, prefetch 1
and 3), checkpoints streamed in place, budgets, errors and memory release,
and transformers' offloaded KV cache."""

from __future__ import annotations

import copy
import gc
import os
import warnings

import moestream as ms
import pytest
import torch
from conftest import cuda
from moestream import _C, testing
from moestream.offload import get_state

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


LAYERS = 6  # more units than the 4 slots of prefetch=3, so every step streams
NEW_TOKENS = 32


def tiny_config(family: str):
    return testing.family_config(family, "offload", layers=LAYERS)


FAMILIES = ["llama", "qwen2", "mistral", "opt", "gemma", "qwen3_moe"]


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


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


_REFS: dict = {}


def reference(family: str, device: str):
    key = (family, device)
    if key not in _REFS:
        m = build(family).to(device)
        ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
        _REFS[key] = (m, ids, generate(m, ids))
    return _REFS[key]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("storage", ["cpu", "disk"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_generate_matches_unoffloaded(family, storage, prefetch, device, tmp_path):
    # whole layers, experts included (the expert cache has its own tests: test_expert_cache.py)
    base, ids, ref = reference(family, device)
    model = copy.deepcopy(base)
    out_dir = str(tmp_path / "off") if storage == "disk" else None
    ms.offload(model, device=device, storage=storage, offload_dir=out_dir, prefetch=prefetch, experts="layer")
    out = generate(model, ids)
    assert torch.equal(out, ref), f"{family} {storage} prefetch={prefetch}: tokens differ"
    st = ms.offload_stats(model)
    assert st["num_slots"] == prefetch + 1 and st["units"] == LAYERS
    # the blocks really streamed: more loads than layers, bytes moved every step
    assert st["loads"] > LAYERS
    moved = st["bytes_read"] if storage == "disk" else st["bytes_copied"]
    assert moved >= st["streamed_bytes"] * 2
    if storage == "disk":
        assert len(os.listdir(out_dir)) == LAYERS
    # between forwards the streamed parameters hold no memory (placeholders), the rest is resident
    for name, p in model.named_parameters():
        if ".layers." in name:
            assert p.stride() == (0,) * p.dim() and p.device.type == device, name
        else:
            assert p.is_contiguous() and p.device.type == device, name


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("storage", ["disk", "cpu"])
def test_load_offloaded_streams_checkpoint_in_place(family, storage, device, tmp_path):
    model = build(family).to(device)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2)).to(device)
    ref = generate(model, ids)
    # sharded, original transformers format (MoE experts stored per expert, fused at load)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    streamed = ms.load_offloaded(tmp_path, device=device, storage=storage, prefetch=2)
    assert torch.equal(generate(streamed, ids), ref)
    st = ms.offload_stats(streamed)
    if storage == "disk":
        assert st["bytes_read"] >= 2 * st["streamed_bytes"]


def test_load_offloaded_single_file_and_budget(tmp_path):
    model = build("llama")
    ids = torch.randint(3, 96, (1, 6))
    ref = generate(model, ids)
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    st0 = ms.offload_stats(ms.load_offloaded(tmp_path, device="cpu", prefetch=1))
    budget = st0["resident_bytes"] + st0["read_buffer_bytes"] + 3 * st0["slot_bytes"]
    streamed = ms.load_offloaded(tmp_path, device="cpu", max_device_memory=budget, prefetch=2)
    assert torch.equal(generate(streamed, ids), ref)
    st = ms.offload_stats(streamed)
    assert st["num_slots"] == 3 and st["device_bytes"] <= budget
    # resident parameters took the checkpoint's values
    for name, p in model.named_parameters():
        if ".layers." not in name:
            assert torch.equal(streamed.get_parameter(name), p), name
    with pytest.raises(ValueError, match="too small"):
        # one slot and the resident weights, but no room for a read buffer however small
        ms.load_offloaded(tmp_path, device="cpu", max_device_memory=st0["resident_bytes"] + st0["slot_bytes"])


def test_save_layered_roundtrip(tmp_path):
    model = build("qwen3_moe")
    ids = torch.randint(3, 96, (1, 6))
    ref = generate(model, ids)
    ms.save_layered(model, tmp_path, progress=False)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model-rest.safetensors" in files
    assert sum(f.startswith("model-layer-") for f in files) == LAYERS
    assert not [f for f in files if f.startswith(".")]
    streamed = ms.load_layered(tmp_path, device="cpu", prefetch=1)
    assert torch.equal(generate(streamed, ids), ref)
    # the layered directory is also an ordinary transformers checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(generate(again, ids), ref)


def test_budget_too_small_is_a_clear_error():
    model = build("llama")
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with pytest.raises(
        ValueError, match=r"max_device_memory=.* is too small: one streamed layer needs .* at least"
    ):
        ms.offload(model, device="cpu", max_device_memory=layer // 2)
    # nothing was changed by the failed call
    assert all(p.is_contiguous() for p in model.parameters())
    assert getattr(model, "_moestream_offload", None) is None


def test_budget_lowers_prefetch_with_warning():
    base, ids, ref = reference("llama", "cpu")
    model = copy.deepcopy(base)
    slot = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    rest += sum(b.numel() * b.element_size() for b in model.buffers())
    budget = rest + 2 * (slot + 8192)
    with pytest.warns(UserWarning, match="prefetch lowered from 3 to 1"):
        ms.offload(model, device="cpu", max_device_memory=budget, prefetch=3)
    assert ms.offload_stats(model)["num_slots"] == 2
    assert torch.equal(generate(model, ids), ref)


def test_budget_streams_embeddings_when_they_do_not_fit():
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.vocab_size = 4000  # embeddings (2 x 512 KB) much larger than a layer (~24 KB)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 4000, (1, 5))
    ref = generate(model, ids)
    emb = model.model.embed_tokens.weight.numel() * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # may hold fewer slots than prefetch + 1
        ms.offload(model, device="cpu", max_device_memory=int(emb * 1.5), prefetch=2)
    st = ms.offload_stats(model)
    assert st["units"] > LAYERS  # embedding and/or lm_head became units
    assert st["device_bytes"] <= emb * 1.5
    assert torch.equal(generate(model, ids), ref)


def test_truncated_file_raises_naming_file_and_tensor(tmp_path):
    base, ids, _ = reference("llama", "cpu")
    model = copy.deepcopy(base)
    ms.offload(model, device="cpu", storage="disk", offload_dir=str(tmp_path), prefetch=1)
    generate(model, ids)
    victim = tmp_path / "unit-00004.safetensors"
    os.truncate(victim, os.path.getsize(victim) // 2)
    with pytest.raises(
        RuntimeError, match=r"reading tensor 'model\.layers\.4\..*unit-00004\.safetensors.*short read"
    ):
        generate(model, ids)


def test_memory_released_when_model_deleted(tmp_path):
    gc.collect()
    before = _C.stream_live_bytes()
    base, ids, ref = reference("llama", "cpu")
    model = copy.deepcopy(base)
    ms.offload(model, device="cpu", storage="disk", prefetch=2)  # temporary offload directory
    state = get_state(model)
    tmp = os.path.dirname(state.files[0])
    assert os.path.isdir(tmp)
    assert torch.equal(generate(model, ids), ref)
    assert _C.stream_live_bytes()[1] > before[1]
    del state, model
    gc.collect()
    assert _C.stream_live_bytes() == before
    assert not os.path.exists(tmp)


def test_offload_twice_and_bad_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="storage must be 'cpu' or 'disk'"):
        ms.offload(model, device="cpu", storage="ssd")
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        ms.offload(model, device="cpu", prefetch=-1)
    with pytest.raises(ValueError, match="max_device_memory must look like"):
        ms.offload(model, device="cpu", max_device_memory="lots")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        ms.offload(model, device="mps")
    ms.offload(model, device="cpu")
    with pytest.raises(RuntimeError, match="already offloaded"):
        ms.offload(model, device="cpu")
    with pytest.raises(ValueError, match="is offloaded"):
        ms.save_layered(model, "/nonexistent")


def test_load_layered_refuses_incomplete_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete layered checkpoint"):
        ms.load_layered(tmp_path)
    model = build("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # an ordinary checkpoint is not a layered one
    with pytest.raises(ValueError, match="not a layered checkpoint"):
        ms.load_layered(tmp_path)


def test_parse_bytes():
    from moestream.offload import parse_bytes

    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("300MB") == 300 * 10**6
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(12345) == 12345
    assert parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("-3GB")
    with pytest.raises(ValueError):
        parse_bytes(0)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and ms.with_cuda), reason="needs a CUDA device and build")
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_cuda_device_memory_stays_within_budget(storage):
    torch.cuda.synchronize()
    model = build("llama")  # on the CPU: only resident weights and slots may reach the device
    ids = torch.randint(3, 96, (1, 6), device="cuda")
    ref = generate(copy.deepcopy(model).cuda(), ids)  # same numerics: the whole model on the GPU
    slot = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    rest += sum(b.numel() * b.element_size() for b in model.buffers())
    budget = rest + 3 * (slot + 4096)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    ms.offload(model, device="cuda", storage=storage, max_device_memory=budget, prefetch=2)
    st = ms.offload_stats(model)
    assert st["pool_pinned"] == 1.0
    weights = torch.cuda.memory_allocated() - before
    assert weights <= budget + 4096 * 16, (weights, budget)  # allocator rounding of small tensors
    torch.cuda.reset_peak_memory_stats()
    out = generate(model, ids)
    assert torch.equal(out, ref)
    assert torch.cuda.max_memory_allocated() - before <= budget + (8 << 20)  # + activations and KV cache


def test_inference_mode_then_grad_mode_forward():
    base, ids, ref = reference("llama", "cpu")
    model = copy.deepcopy(base)
    with torch.inference_mode():
        ms.offload(model, device="cpu", storage="cpu", prefetch=1)
        assert torch.equal(generate(model, ids), ref)
    # the slot views cached under inference_mode are ordinary tensors: usable with autograd on
    logits = model(ids).logits
    with torch.no_grad():
        assert torch.equal(logits.detach(), base(ids).logits)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layers." in n)


@pytest.mark.parametrize("storage,prefetch", [("cpu", 8), ("disk", 1)])
def test_forwards_from_several_threads_are_serialised(storage, prefetch):
    import threading

    base, ids, _ = reference("llama", "cpu")
    with torch.no_grad():
        ref = base(ids).logits
    model = copy.deepcopy(base)
    ms.offload(model, device="cpu", storage=storage, prefetch=prefetch)
    wrong, errors = [], []

    def work():
        try:
            for _ in range(10):
                with torch.no_grad():
                    if not torch.equal(model(ids).logits, ref):
                        wrong.append(1)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    with torch.no_grad():  # still usable from one thread afterwards
        assert torch.equal(model(ids).logits, ref)
    # a unit called directly (not through the model) takes the same lock
    with torch.no_grad():
        model.model.layers[0](
            model.model.embed_tokens(ids),
            position_embeddings=model.model.rotary_emb(
                model.model.embed_tokens(ids), torch.arange(ids.shape[1])[None]
            ),
        )
    assert ms.offload_stats(model)["acquires"] > 0


# ---------------------------------------------------------------------------------------------
# transformers' offloaded KV cache (generate(..., cache_implementation="offloaded")) on an offloaded
# model: the same tokens as the default cache and as the model without offloading. Its `update`
# calls torch.cuda unconditionally, so on a CPU-only torch it fails even without moestream; on a CPU
# model moestream turns its offloading off (the cache already lives in host memory); on CUDA it runs
# as transformers wrote it (the CUDA test is skipped without a GPU: unverified here).


def prompt(device: str, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, 7), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_kv_cache_same_tokens_cpu(storage, tmp_path):
    base = build("llama")
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
    base = build("llama", seed=3)
    ids = prompt("cpu", batch=1)
    ref = generate(base, ids)
    base.save_pretrained(tmp_path)
    model = ms.load_offloaded(tmp_path, device="cpu", storage="disk", prefetch=1)
    assert torch.equal(generate(model, ids, cache_implementation="offloaded"), ref)


def test_cpu_model_without_offloading_is_not_changed():
    """Only offloaded models get the CPU fallback: moestream patches nothing in transformers."""
    model = build("llama")
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
    base = build("llama")
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
