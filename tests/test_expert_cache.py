"""The expert cache of offloaded MoE models (``experts="cache"``): exact tokens for every family
patch_moe supports, with and without patch_moe, under budgets that force misses and evictions;
the counters; bytes read per decoded token; eviction order; prediction; bad input."""

from __future__ import annotations

import copy
import os
import re
import warnings

import moestream as ms
import pytest
import torch
from moestream import _C, testing
from moestream.offload import get_state
from moestream.offload.options import parse_bytes

pytest.importorskip("transformers")

FAMILIES = testing.MOE_FAMILIES
_BASE: dict = {}


def _base(family: str):
    if family not in _BASE:
        _BASE[family] = testing.build_model(family, "small")
    return _BASE[family]


def _generate(model, ids, n=6):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )


def _top_k(model) -> int:
    c = model.config.get_text_config()
    return int(c.num_experts_per_tok)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("patched", [False, True], ids=["hf", "patched"])
def test_generate_matches_in_memory_with_evictions(family, patched, tmp_path):
    base = _base(family)
    ref = copy.deepcopy(base)
    if patched:
        ms.patch_moe(ref)
    model = copy.deepcopy(ref)
    ids = testing.input_ids(1, 5, seed=3)
    want = _generate(ref, ids)
    k = _top_k(base)
    ms.offload(model, device="cpu", storage="disk", offload_dir=str(tmp_path), expert_slots=k)
    got = _generate(model, ids)
    assert torch.equal(got, want), f"{family}: tokens differ"
    st = ms.offload_stats(model)
    assert st["experts"] == "cache" and st["expert_slots"] == k
    assert st["expert_misses"] > 0 and st["expert_evictions"] > 0 and st["expert_hits"] >= 0
    assert st["expert_hits"] + st["expert_misses"] == st["expert_lookups"]
    assert st["expert_lookups"] <= st["expert_selections"]
    # between forwards the experts' parameters hold no memory
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert p.stride() == (0,) * p.dim(), name


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("gather", [False, True], ids=["slots", "gathered"])
def test_storage_cpu_batches_and_lfu(family, gather):
    base = _base(family)
    ids = testing.input_ids(3, 6, seed=5)  # several sequences: the union of their experts per layer
    want = _generate(base, ids)
    model = copy.deepcopy(base)
    ms.offload(model, device="cpu", storage="cpu", expert_slots=_top_k(base) + 1, cache_policy="lfu")
    get_state(model).cache.gather = gather  # the CUDA way of computing (weights copied out of the slots)
    assert torch.equal(_generate(model, ids), want)
    st = ms.offload_stats(model)
    assert st["expert_misses"] > 0 and st["expert_hits"] + st["expert_misses"] == st["expert_lookups"]


def test_prefetch_on_and_off_give_the_same_tokens():
    base = _base("qwen3_moe")
    ids = testing.input_ids(1, 5, seed=7)
    outs, stats = [], []
    for prefetch in (True, False):
        m = copy.deepcopy(base)
        ms.offload(m, device="cpu", storage="disk", expert_slots=4, expert_prefetch=prefetch)
        outs.append(_generate(m, ids, 8))
        stats.append(ms.offload_stats(m))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], _generate(base, ids, 8))
    on, off = stats
    assert on["prefetch_predicted"] > 0 and 0 <= on["prefetch_correct"] <= on["prefetch_predicted"]
    assert 0.0 <= on["prefetch_precision"] <= 1.0 and 0.0 <= on["prefetch_recall"] <= 1.0
    assert off["prefetch_predicted"] == 0 and off["prefetch_correct"] == 0


def _decode_bytes(model, ids, steps):
    """Bytes read per decode step at batch 1 after a prefill, with the model's own KV cache."""
    st = get_state(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        per = []
        for _ in range(steps):
            st.reset_stats()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            per.append(ms.offload_stats(model))
    return per


def test_bytes_read_per_decoded_token_is_what_the_router_selected(tmp_path):
    base = testing.build_model("qwen3_moe", "small", num_experts=16, num_hidden_layers=3)
    model = copy.deepcopy(base)
    k = _top_k(base)
    # a cache of one layer's selection holds nothing across tokens; no prediction, no page cache
    ms.offload(
        model,
        device="cpu",
        storage="disk",
        offload_dir=str(tmp_path),
        expert_slots=k,
        expert_prefetch=False,
        direct_io=False,
        prefetch=0,
    )
    plan = get_state(model).plan
    expert_bytes = plan.experts.expert_bytes
    non_expert = sum(u.nbytes for u in plan.units)
    E = 16
    for st in _decode_bytes(model, testing.input_ids(1, 4, seed=2), 4):
        assert st["expert_hits"] + st["expert_misses"] == st["expert_selections"] == 3 * k  # batch 1
        bound = (k / E * expert_bytes + non_expert) * 1.1
        assert st["bytes_read"] <= bound, (st["bytes_read"], bound)
        assert st["expert_bytes_read"] >= st["expert_misses"] * plan.experts.groups[0].tensors[0].nbytes


def _streamer(policy, units=4, slots=2):
    pool = _C.HostPool(units * 4096)
    pool.view(0, units * 4096).copy_(torch.arange(units).repeat_interleave(4096).to(torch.uint8))
    cfg = _C.StreamerConfig(
        device="cpu", slot_bytes=4096, num_slots=slots, num_readers=1, contiguous_slots=True, eviction=policy
    )
    s = _C.Streamer(pool, cfg)
    for u in range(units):
        assert s.add_unit([_C.Segment(0, 4096, _C.Segment.FROM_POOL, u * 4096, f"u{u}")]) == u
    return s


def _use(s, u):
    slot = s.request(u)
    s.wait(u)
    assert int(s.slot_array()[slot * 4096]) == u  # the slot holds the unit's bytes
    s.release(u)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_order(policy):
    s = _streamer(getattr(_C.Eviction, policy))
    for u in (0, 0, 0, 1):  # 0 used three times, 1 once but last
        _use(s, u)
    _use(s, 2)  # one slot must go: LRU evicts 0 (older), LFU evicts 1 (rarer)
    evicted = 0 if policy == "lru" else 1
    assert not s.is_cached(evicted) and s.is_cached(1 - evicted) and s.is_cached(2)
    assert sorted(u for u in s.slot_units()) == sorted([1 - evicted, 2])
    assert s.stats()["evictions"] == 1


def test_pinned_slots_are_never_evicted():
    s = _streamer(_C.Eviction.lru)
    s.request(0)
    s.request(1)
    with pytest.raises(RuntimeError, match="slots are in use"):
        s.request(2)
    s.prefetch(2)  # a hint: skipped while every slot is pinned
    assert not s.is_cached(2)
    s.wait(0)
    s.wait(1)
    s.release(0)
    s.release(1)
    with pytest.raises(RuntimeError, match="not requested"):
        s.wait(3)


def test_budget_too_small_names_the_minimum_and_the_minimum_works():
    base = _base("qwen3_moe")
    with pytest.raises(ValueError, match=r"expert cache at least 2 experts") as ei:
        ms.offload(copy.deepcopy(base), device="cpu", storage="cpu", max_device_memory=10_000)
    need = re.search(r"so at least ([0-9.]+ [KMG]iB)", str(ei.value)).group(1)
    n = int(parse_bytes(need.replace(" ", "")) * 1.01)
    m = copy.deepcopy(base)
    ms.offload(m, device="cpu", storage="cpu", max_device_memory=n)
    st = ms.offload_stats(m)
    assert st["device_bytes"] <= n and st["expert_slots"] >= 2
    ids = testing.input_ids(1, 4)
    assert torch.equal(_generate(m, ids, 3), _generate(base, ids, 3))


def test_options_are_checked():
    base = _base("qwen3_moe")
    for kw, msg in (
        ({"experts": "all"}, "experts must be"),
        ({"cache_policy": "fifo"}, "cache_policy"),
        ({"expert_slots": 0}, "expert_slots"),
        ({"expert_slots": 1}, "below top_k"),
        ({"cpu_experts": True}, "cpu_experts"),
    ):
        with pytest.raises(ValueError, match=msg):
            ms.offload(copy.deepcopy(base), device="cpu", **kw)
    dense = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)]))
    with pytest.raises(ValueError, match="needs blocks with fused experts modules"):
        ms.offload(dense, device="cpu", experts="cache")


def test_training_through_the_cache_is_refused():
    m = copy.deepcopy(_base("mixtral"))
    ms.offload(m, device="cpu", storage="cpu")
    x = torch.randn(3, m.config.hidden_size, requires_grad=True)
    experts = m.model.layers[0].mlp.experts
    with pytest.raises(RuntimeError, match="inference only"):
        experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_load_offloaded_reads_experts_in_place(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    testing.write_random_checkpoint(ckpt, "qwen3_moe", "small")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    ids = testing.input_ids(1, 5, seed=4)
    want = _generate(ref, ids)
    m = ms.load_offloaded(ckpt, device="cpu", storage="disk", expert_slots=2)
    assert torch.equal(_generate(m, ids), want)
    st = get_state(m)
    assert st.files and all(os.path.dirname(f) == ckpt for f in st.files)  # no copies written
    s = ms.offload_stats(m)
    assert s["experts"] == "cache" and s["expert_misses"] > 0


def test_missing_expert_tensor_is_named(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    layers, _ = testing.write_random_checkpoint(ckpt, "qwen3_moe", "small")
    from safetensors.torch import load_file, save_file

    t = load_file(layers[1])
    gone = next(n for n in t if n.endswith("mlp.experts.down_proj") or ".experts.0.down_proj" in n)
    del t[gone]
    save_file(t, layers[1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(gone) + ".*" + re.escape(os.path.basename(layers[1]))):
        ms.load_offloaded(ckpt, device="cpu", storage="disk")


@pytest.mark.parametrize("routing", ["mixtral", "deepseek_v3", "gpt_oss", "llama4"])
def test_ms_nn_moe_blocks(routing):
    """Blocks that are only ms.nn.MoE (router + experts): nothing else streams per layer."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gpt = routing == "gpt_oss"
            self.layers = torch.nn.ModuleList(
                ms.nn.MoE(
                    32,
                    24,
                    6,
                    2 if routing != "llama4" else 1,
                    routing=routing,
                    expert_bias=gpt,
                    activation="gptoss" if gpt else "swiglu",
                )
                for _ in range(3)
            )

        def forward(self, x):
            for layer in self.layers:
                y = layer(x)
                x = x + (y[0] if isinstance(y, tuple) else y)
            return x

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = net(x)
    ms.offload(net, device="cpu", storage="cpu", expert_slots=2)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    st = ms.offload_stats(net)
    assert st["expert_misses"] > 0 and st["expert_hits"] + st["expert_misses"] == st["expert_lookups"]


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and ms.with_cuda), reason="needs a CUDA device and build")
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_cuda_expert_cache_generate(storage, tmp_path):
    base = _base("qwen3_moe").to("cuda")
    ids = testing.input_ids(2, 5, seed=9).cuda()
    want = _generate(base, ids)
    model = copy.deepcopy(base)
    ms.offload(model, device="cuda", storage=storage, offload_dir=str(tmp_path), expert_slots=2)
    assert torch.equal(_generate(model, ids), want)
    st = ms.offload_stats(model)
    assert st["expert_misses"] > 0 and st["expert_hits"] + st["expert_misses"] == st["expert_lookups"]


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_compressed_experts_are_cached_compressed(storage, tmp_path):
    from moestream import quant

    base = testing.build_model("qwen3_moe", testing.QUANT_SIZES["qwen3_moe"])
    scheme = quant.QuantScheme("int4", 32)
    ref = copy.deepcopy(base)
    quant.quantize_model(ref, scheme)
    ids = testing.input_ids(2, 5, vocab=int(base.config.vocab_size))
    want = _generate(ref, ids, 5)
    packed = sum(b.numel() * b.element_size() for n, b in ref.named_buffers() if ".experts." in n)
    m = copy.deepcopy(base)
    ms.offload(m, device="cpu", storage=storage, offload_dir=str(tmp_path), compress=scheme, expert_slots=3)
    assert torch.equal(_generate(m, ids, 5), want)
    st = ms.offload_stats(m)
    assert st["experts"] == "cache" and st["expert_misses"] > 0
    assert get_state(m).plan.experts.expert_bytes == packed  # the packed bytes, not bfloat16 ones
    # whole layers: the packed buffers stream with their layer instead of staying resident
    m2 = copy.deepcopy(base)
    ms.offload(
        m2, device="cpu", storage=storage, offload_dir=str(tmp_path / "l"), compress=scheme, experts="layer"
    )
    assert torch.equal(_generate(m2, ids, 5), want)
    assert ms.offload_stats(m2)["resident_bytes"] < packed
