"""ms.patch_moe on DBRX and JetMoE: tiny random transformers models, compared with transformers' own
eager path on the same weights (patching is in place and shares the Parameter objects).

DBRX: transformers' router module (logits, in-place jitter) is kept; the routing (softmax, top-k,
p-norm of ``moe_normalize_expert_weights``) and the experts (``mlp.w1`` / ``v1`` / ``w2``) run on
moestream. JetMoE: the MLP's router and experts run on moestream; its attention experts (MoA) stay
transformers'."""

from __future__ import annotations

import copy
import io

import pytest
import torch

pytest.importorskip("transformers")

import moestream as ms
from conftest import rel_err
from moestream import testing as tiny
from moestream.integrations import hf_models
from moestream.integrations import transformers as integ

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

_COMMON = {
    "vocab_size": 97,
    "initializer_range": 0.1,
    "output_router_logits": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# (hidden, experts' intermediate, experts, k, heads, kv heads); "odd": odd sizes, k = 3
_SIZES = {"small": (32, 24, 4, 2, 4, 2), "odd": (42, 37, 6, 3, 3, 1)}


def dbrx_config(size: str = "small", p: float | None = 1.0, **ffn):
    from transformers import DbrxConfig

    H, I, E, k, heads, kv = _SIZES[size]
    ffn = {
        "ffn_hidden_size": I,
        "moe_num_experts": E,
        "moe_top_k": k,
        "moe_normalize_expert_weights": p,
        **ffn,
    }
    cfg = {
        "d_model": H,
        "n_heads": heads,
        "n_layers": 2,
        "max_seq_len": 128,
        "attn_config": {"kv_n_heads": kv, "rope_theta": 10000.0, "clip_qkv": 8.0},
    }
    return DbrxConfig(**cfg, ffn_config=ffn, **_COMMON)


def jetmoe_config(size: str = "small", **kw):
    from transformers import JetMoeConfig

    H, I, E, k, _, kv = _SIZES[size]
    cfg = {"hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": k}
    cfg.update(num_hidden_layers=2, num_key_value_heads=kv, kv_channels=8, max_position_embeddings=128)
    return JetMoeConfig(**{**cfg, **_COMMON, **kw})


_MODEL = {"dbrx": "DbrxForCausalLM", "jetmoe": "JetMoeForCausalLM"}
_BLOCK = {"dbrx": "DbrxFFN", "jetmoe": "JetMoeMoE"}


def build(family: str, config=None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random model (biases random too), eval mode, eager attention."""
    config = config if config is not None else (dbrx_config() if family == "dbrx" else jetmoe_config())
    return hf_models.build_causal_lm(_MODEL[family], config, dtype, seed, "eager", None)


def blocks(model, family: str) -> list:
    """The modules that are (instances of) the family's MoE block class."""
    return [m for m in model.modules() if any(c.__name__ == _BLOCK[family] for c in type(m).__mro__)]


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# the configurations of the numerics tests: DBRX with every kind of normalisation of its weights
CASES = [
    ("dbrx", "small", {"p": 1.0}),
    ("dbrx", "odd", {"p": 1.0}),
    ("dbrx", "small", {"p": None}),
    ("dbrx", "odd", {"p": 2.0}),
    ("jetmoe", "small", {}),
    ("jetmoe", "odd", {}),
]


def _config(family, size, kw):
    return dbrx_config(size, **kw) if family == "dbrx" else jetmoe_config(size, **kw)


# ------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize(("family", "size", "kw"), CASES)
def test_float32_logits_aux_loss_router_logits_and_grads_match_transformers(family, size, kw):
    model = build(family, _config(family, size, kw))
    ids = tiny.input_ids()
    ref, ref_grads = _forward_backward(model, ids)
    n = len(blocks(model, family))
    assert ms.patch_moe(model) == n == 2
    patched = blocks(model, family)
    assert len(patched) == n and all(type(b).__name__ == f"Moestream{_BLOCK[family]}" for b in patched)
    out, grads = _forward_backward(model, ids)

    assert rel_err(out.logits, ref.logits) <= 1e-5
    assert rel_err(out.loss, ref.loss) <= 1e-5
    # the load-balancing loss transformers computes from the recorded router logits (JetMoE records
    # its attention experts' router too: two per layer)
    assert ref.aux_loss is not None and ref.aux_loss.item() > 0
    assert rel_err(out.aux_loss, ref.aux_loss) <= 1e-6
    assert len(out.router_logits) == len(ref.router_logits) == (2 * n if family == "jetmoe" else n)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= 1e-6
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name

    assert ms.unpatch_moe(model) == n
    assert not any(type(m).__module__.startswith("moestream") for m in model.modules())
    again = model(ids, labels=ids)
    torch.testing.assert_close(again.logits, ref.logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("family", "size", "kw"), CASES)
def test_low_precision_within_tolerance(family, size, kw, dtype):
    config = _config(family, size, kw)
    ids = tiny.input_ids()
    model64 = build(family, config, torch.float64)
    model = build(family, config, dtype)
    with torch.no_grad():
        ref64 = model64(ids).logits
        ref_lowp = model(ids).logits
        ms.patch_moe(model)
        out = model(ids).logits
    assert out.dtype == dtype
    ref_err, err = rel_err(ref_lowp, ref64), rel_err(out, ref64)
    # DESIGN's low-precision rule: within 2x of what transformers itself loses at that dtype
    assert err <= 2 * ref_err + 1e-3, f"patched {dtype} error {err:.3e} vs transformers' {ref_err:.3e}"


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_float64_matches_transformers(family):
    # DBRX routes in float64 as transformers does; JetMoE's router computes in float32 in both
    # (transformers' torch.softmax and router_topk's then differ by float32 rounding)
    tol = 1e-10 if family == "dbrx" else 1e-6
    model = build(family, dtype=torch.float64)
    ids = tiny.input_ids()
    ref, ref_grads = _forward_backward(model, ids)
    ms.patch_moe(model)
    out, grads = _forward_backward(model, ids)
    assert out.logits.dtype == torch.float64
    assert rel_err(out.logits, ref.logits) <= tol
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= tol, name


def _one_block(family: str, config, dtype=torch.float64) -> torch.nn.Module:
    """The family's MoE block alone, random weights (biases too), in a container patch_moe walks."""
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    block = DbrxFFN(config) if family == "dbrx" else JetMoeMoE(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return torch.nn.ModuleDict({"block": block}).to(dtype).eval()


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_block_on_fresh_inputs_and_gradcheck(family):
    # the block alone on random inputs, then gradcheck in float64 w.r.t. the input and the weights
    # (tiny: hidden 10, intermediate 6, 5 experts, k = 2)
    if family == "dbrx":
        from transformers import DbrxConfig

        ffn = {
            "ffn_hidden_size": 6,
            "moe_num_experts": 5,
            "moe_top_k": 2,
            "moe_normalize_expert_weights": 2.0,
        }
        config = DbrxConfig(d_model=10, n_heads=2, ffn_config=ffn)
    else:
        config = jetmoe_config(hidden_size=10, intermediate_size=6, num_local_experts=5)
    container = _one_block(family, config)
    ref_block = copy.deepcopy(container["block"])
    assert ms.patch_moe(container) == 1
    patched = container["block"]
    assert type(patched).__name__ == f"Moestream{_BLOCK[family]}"
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    with torch.no_grad():
        # (JetMoE routes in float32: router_topk's and torch's softmax differ by float32 rounding)
        assert rel_err(patched(x), ref_block(x)) <= (1e-12 if family == "dbrx" else 1e-6)
    params = dict(patched.named_parameters())
    # JetMoE's router computes in float32 (transformers' too): finite differences in float64 do not
    # see it, so its gradients w.r.t. the input and the router weight are checked against
    # transformers' in the model tests instead
    names = [n for n in params if family == "dbrx" or not n.startswith("router.")]
    xs = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=family == "dbrx")

    def f(xs, *ws):
        return torch.func.functional_call(patched, dict(zip(names, ws)), (xs,), strict=False)

    ws = [params[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (xs, *ws))


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_edge_shapes(family):
    # zero tokens, one expert, k = num_experts
    for sizes in ({"E": 4, "k": 4}, {"E": 1, "k": 1}):
        if family == "dbrx":
            config = dbrx_config(moe_num_experts=sizes["E"], moe_top_k=sizes["k"])
        else:
            config = jetmoe_config(num_local_experts=sizes["E"], num_experts_per_tok=sizes["k"])
        model = build(family, config)
        ref = copy.deepcopy(model)
        ids = tiny.input_ids()
        ms.patch_moe(model)
        with torch.no_grad():
            assert rel_err(model(ids).logits, ref(ids).logits) <= 1e-5
            block, ref_block = blocks(model, family)[0], blocks(ref, family)[0]
            empty = torch.randn(1, 0, model.config.hidden_size)
            out, want = block(empty), ref_block(empty)
            assert out.shape == want.shape and out.numel() == 0


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_greedy_generate_same_tokens(family):
    model = build(family)
    model.config.output_router_logits = False
    ids = tiny.input_ids(batch=2, seq=7, seed=3)
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        ms.patch_moe(model)
        out = model.generate(ids, **kw)
    assert out.shape == (2, 27)
    assert torch.equal(out, ref)


def test_dbrx_train_mode_jitter_matches_transformers():
    # DBRX's router multiplies its input by uniform noise in place: the same draws, and the experts
    # see the jittered input, patched as in transformers
    model = build("dbrx", dbrx_config(moe_jitter_eps=0.1)).train()
    ids = tiny.input_ids()
    torch.manual_seed(5)
    ref = model(ids).logits
    ms.patch_moe(model)
    assert model.transformer.blocks[0].ffn.training
    torch.manual_seed(5)
    out = model(ids).logits
    assert rel_err(out, ref) <= 1e-5
    torch.manual_seed(6)
    assert rel_err(model(ids).logits, ref) > 1e-4  # the noise is live


# ------------------------------------------------------------------------------------------------
# what runs: moestream's ops, not transformers' loops


def _count_calls(monkeypatch, owner, names) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(owner, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(owner, name, counted)
    return calls


def test_moestream_ops_run_and_transformers_loops_do_not(monkeypatch):
    from transformers.models.dbrx import modeling_dbrx
    from transformers.models.jetmoe import modeling_jetmoe

    ids = tiny.input_ids()
    dbrx, jet = build("dbrx"), build("jetmoe")
    ms.patch_moe(dbrx)
    ms.patch_moe(jet)
    ops = _count_calls(monkeypatch, ms.ops, ["router_topk", "grouped_mm", "moe_experts"])
    loops = _count_calls(monkeypatch, modeling_jetmoe.JetMoeParallelExperts, ["forward"])

    def forbidden(*a, **k):
        raise AssertionError("transformers' DBRX expert loop ran")

    monkeypatch.setattr(modeling_dbrx.DbrxExpertGLU, "forward", forbidden)
    with torch.no_grad():
        dbrx(ids)
        # per layer: one routing, three grouped matmuls (gate, up, down)
        assert ops == {"router_topk": 2, "grouped_mm": 6, "moe_experts": 0}
        ops.update(router_topk=0, grouped_mm=0)
        jet(ids)
    # per layer: one routing and the fused expert path; transformers' loop runs only for the
    # attention experts (their query and output projections: 2 per layer, not 4)
    assert ops["router_topk"] == 2 and ops["moe_experts"] == 2
    assert loops["forward"] == 4
    attn = jet.model.layers[0].self_attention.experts
    assert type(attn).__module__.startswith("transformers.")
    assert type(attn.router).__module__.startswith("transformers.")


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_activation_without_fused_kernel_runs_exactly(family):
    # tanh-approximated gelu: no fused kind computes it; the module's own runs between the matmuls
    config = (
        dbrx_config(ffn_act_fn={"name": "gelu_pytorch_tanh"})
        if family == "dbrx"
        else jetmoe_config(activation_function="gelu_pytorch_tanh")
    )
    model = build(family, config)
    ids = tiny.input_ids()
    ref, ref_grads = _forward_backward(model, ids)
    ms.patch_moe(model)
    out, grads = _forward_backward(model, ids)
    assert rel_err(out.logits, ref.logits) <= 1e-5
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name
    # exact gelu has a fused kind; a later change of the activation module is seen
    block = blocks(model, family)[0]
    state = (block.experts if family == "dbrx" else block).__dict__["_moestream_act"]
    assert state.kind is None
    act_name = "activation_fn" if family == "dbrx" else "activation"
    with torch.no_grad():
        gelu_out = None
        for _ in range(2):  # patched, then transformers' own
            for b in blocks(model, family):
                setattr(b.experts.mlp if family == "dbrx" else b, act_name, torch.nn.GELU())
            if gelu_out is None:
                gelu_out = model(ids).logits
                assert state.kind == "geglu"
            ms.unpatch_moe(model)
        assert rel_err(gelu_out, model(ids).logits) <= 1e-5


# ------------------------------------------------------------------------------------------------
# in-place contract and lifecycle, as for the other families


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_same_parameters_and_state_dict_keys(family):
    model = build(family)
    params = dict(model.named_parameters())
    sd = model.state_dict(keep_vars=True)
    ms.patch_moe(model)
    new_params = dict(model.named_parameters())
    assert new_params.keys() == params.keys() and all(new_params[k] is params[k] for k in params)
    new_sd = model.state_dict(keep_vars=True)
    assert list(new_sd) == list(sd) and all(new_sd[k] is sd[k] for k in sd)
    # the weights' holders are the very same modules
    orig = model.transformer.blocks[0].ffn.__dict__["_moestream_original"][0] if family == "dbrx" else None
    if orig is not None:
        new = model.transformer.blocks[0].ffn
        assert new.router is orig.router and new.experts.mlp is orig.experts.mlp
    # patching does not touch the experts implementation (these experts never read it)
    assert model.config._experts_implementation != "moestream"


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_save_pretrained_round_trip(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(family)
    ids = tiny.input_ids()
    ms.patch_moe(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert not any(type(m).__module__.startswith("moestream") for m in loaded.modules())
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(lsd)
    for k in sd:
        torch.testing.assert_close(lsd[k], sd[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        assert rel_err(loaded.eval()(ids).logits, want) <= 1e-5


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_lifecycle_idempotent_unpatch_keeps_changes_copy_and_pickle(family):
    model = build(family)
    model.config.output_router_logits = False  # (transformers' recorder hooks cannot be pickled)
    ids = tiny.input_ids()
    assert ms.patch_moe(model) == 2
    assert ms.patch_moe(model) == 0
    assert ms.patch_moe(model, families=family) == 0
    with torch.no_grad():
        want = model(ids).logits
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (clone, loaded):
        with torch.no_grad():
            torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)
        assert ms.unpatch_moe(m) == 2
    # changes made while patched (dtype, values) are kept by unpatch
    model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
        want64 = model(ids).logits
    assert ms.unpatch_moe(model) == 2
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert rel_err(model(ids).logits, want64) <= 1e-10


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_recorder_hooks_installed_before_patching_keep_working(family):
    model = build(family)
    ids = tiny.input_ids()
    ref = model(ids, output_router_logits=True)  # installs transformers' recorder hooks
    ms.patch_moe(model)
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits)
    assert rel_err(out.aux_loss, ref.aux_loss) <= 1e-6
    ms.unpatch_moe(model)
    assert len(model(ids, output_router_logits=True).router_logits) == len(ref.router_logits)


def test_families_filter():
    model = build("jetmoe")
    with pytest.raises(ValueError, match="found no MoE block.*DBRX.*JetMoE"):
        ms.patch_moe(model, families="dbrx")
    assert ms.patch_moe(model, families=["jetmoe"]) == 2


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_patch_under_meta_default_device_and_torch_compile(family):
    model = build(family)
    model.config.output_router_logits = False
    ids = tiny.input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        with torch.device("meta"):
            assert ms.patch_moe(model) == 2
        assert not any(t.is_meta for t in model.state_dict().values())
        assert rel_err(model(ids).logits, ref) <= 1e-5
    if family == "dbrx":  # (JetMoE's attention experts need a host sync: not fullgraph in transformers)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(ids, labels=ids)
        assert rel_err(out.logits, ref) <= 1e-5
        out.loss.backward()
        assert model.transformer.blocks[0].ffn.experts.mlp.w1.grad is not None
        torch._dynamo.reset()


def _patch_at_construction(monkeypatch) -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init

    def post_init(self):
        original(self)
        if any(type(m).__name__ in _BLOCK.values() for m in self.modules()):
            ms.patch_moe(self)

    monkeypatch.setattr(PreTrainedModel, "post_init", post_init)


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_construction_patched_model_same_init_outputs_and_reload(family, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = tiny.input_ids()
    plain = build(family)
    with torch.no_grad():
        ref = plain(ids).logits
    _patch_at_construction(monkeypatch)
    model = build(family)
    assert all(type(b).__name__.startswith("Moestream") for b in blocks(model, family))
    # transformers' weight init dispatches on the replacements' classes: the same random weights
    sd, psd = model.state_dict(), plain.state_dict()
    assert list(sd) == list(psd)
    for k in sd:
        torch.testing.assert_close(sd[k], psd[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) <= 1e-5
    plain.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, output_loading_info=True, attn_implementation="eager"
    )
    assert all(type(b).__name__.startswith("Moestream") for b in blocks(loaded, family))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, psd[k].to(torch.bfloat16), rtol=0, atol=0, msg=k)


def test_meta_construction_then_init(monkeypatch):
    # transformers' test_can_be_initialized_on_meta: JetMoE's block bias is zero-initialised by
    # transformers' init, which dispatches on the block's class (the replacement's too)
    from transformers import JetMoeForCausalLM

    _patch_at_construction(monkeypatch)
    with torch.device("meta"):
        model = JetMoeForCausalLM(jetmoe_config())
    assert all(type(b).__name__ == "MoestreamJetMoeMoE" for b in blocks(model, "jetmoe"))
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.bias.fill_(1.0)
    model.init_weights()
    assert all(layer.mlp.bias.abs().sum() == 0 for layer in model.model.layers)


@pytest.mark.parametrize("family", ["dbrx", "jetmoe"])
def test_generate_with_static_cache(family):
    ids = tiny.input_ids(batch=2, seq=5, seed=3)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    model = build(family)
    model.config.output_router_logits = False
    with torch.no_grad():
        ref = model.generate(ids, cache_implementation="static", **kw)
        ms.patch_moe(model)
        out = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(out, ref)


def test_dbrx_routing_weights_match_transformers_at_every_dtype():
    # the routing alone, on fresh logits, for every normalisation: ids exact, weights within the
    # dtype's rounding (bf16 / fp16 select on rounded probabilities as transformers does, ties included)
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for p in (None, 1.0, 2.0, 3.0):
            block = DbrxFFN(dbrx_config(p=p, moe_num_experts=8, moe_top_k=3))
            # few distinct values: ties in every dtype
            logits = (torch.randint(-4, 4, (64, 8)) * 0.25).to(dtype) + torch.randn(64, 8).to(dtype) * 1e-3
            want_w, want_i = block.route_tokens_to_experts(logits)
            got_w, got_i = integ._dbrx_route(logits, 3, p)
            assert got_w.dtype == want_w.dtype
            if dtype == torch.float32:
                # router_topk breaks ties to the lower id; compare as sets of (id, weight)
                torch.testing.assert_close(
                    got_w.sort(-1).values, want_w.sort(-1).values, rtol=1e-6, atol=1e-7
                )
            else:
                assert torch.equal(got_i, want_i)
                torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)


def test_jetmoe_routing_matches_transformers_at_every_dtype():
    # the gating alone on fresh inputs: the (expert, weight) of every (token, slot) read back from
    # transformers' sorted bookkeeping; bf16 / fp16 logits hold ties, which go as in transformers
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating

    E, k, H = 8, 3, 16
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        gating = JetMoeTopKGating(H, E, k).to(dtype)
        with torch.no_grad():
            gating.layer.weight.copy_(torch.randint(-2, 3, (E, H)).to(dtype) * 0.25)
        container = torch.nn.ModuleDict({"router": gating})
        ours = integ._copy_as(gating, integ._compat_class(integ._JetMoeRouter, JetMoeTopKGating))
        x = torch.randint(-2, 3, (64, H)).to(dtype)  # few distinct logits: ties in every dtype
        with torch.no_grad():
            index_sorted, _, gates, expert_size, want_logits = container["router"](x)
            weights, ids, _, _, logits = ours(x)
        want_ids = torch.empty(64 * k, dtype=torch.long)
        want_ids[index_sorted] = torch.repeat_interleave(torch.arange(E), torch.tensor(expert_size))
        want_w = torch.empty(64 * k, dtype=gates.dtype)
        want_w[index_sorted] = gates
        assert torch.equal(logits, want_logits) and weights.dtype == dtype
        if dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(ids.reshape(-1), want_ids)
            assert torch.equal(weights.reshape(-1), want_w)
        else:  # router_topk: ties to the lower id; the same weights, the same set of values
            torch.testing.assert_close(weights.sort(-1).values, want_w.view(64, k).sort(-1).values)
