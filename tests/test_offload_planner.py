"""The offload planner on synthetic layouts: names and sizes only, no tensors, no files, no engine."""

from __future__ import annotations

import dataclasses

import moestream as ms
import pytest
import torch
from moestream import _C
from moestream.offload import OffloadOptions, plan_offload
from moestream.offload.planner import ALIGN, MIN_CHUNK, PAGE, ModelLayout, TensorSpec

KiB = 1024


def _layout(num_blocks=3, block=(40_000, 1_000), embed=64 * KiB, head=64 * KiB, tied=False, files=False):
    """embed -> blocks -> norm -> head; each block has two parameters and a buffer."""
    ts, key = [], 0

    def add(names, nbytes, is_param=True, owners=None, pos=None):
        nonlocal key
        owners = owners or tuple(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
        ts.append(TensorSpec(key, tuple(names), nbytes, is_param, pos, owners))
        key += 1

    add(["embed.weight"] + (["head.weight"] if tied else []), embed)
    for b in range(num_blocks):
        # the second tensor comes first in the file: the slot follows file order
        add([f"layers.{b}.mlp.weight"], block[0], pos=("f.bin", 2000 + b * 100_000) if files else None)
        add([f"layers.{b}.norm.weight"], block[1], pos=("f.bin", 1000 + b * 100_000) if files else None)
        add([f"layers.{b}.rope.inv_freq"], 128, is_param=False)
    add(["norm.weight"], 512)
    if not tied:
        add(["head.weight"], head)
    blocks = [f"layers.{b}" for b in range(num_blocks)]
    leaves_before = ["embed"]
    leaves_after = ["norm"] + ([] if tied else ["head"])
    return ModelLayout(ts, blocks, leaves_before, leaves_after)


def _opts(**kw):
    return OffloadOptions(device="cpu", **kw).resolve()


def _round(x, a):
    return (x + a - 1) // a * a


def test_plan_units_offsets_slots_and_prefetch():
    layout = _layout()
    plan = plan_offload(layout, _opts(prefetch=1))
    assert [u.module for u in plan.units] == ["layers.0", "layers.1", "layers.2"]
    u = plan.units[0]
    assert [(t.name, t.offset) for t in u.tensors] == [
        ("layers.0.mlp.weight", 0),
        ("layers.0.norm.weight", 40_192),
    ]
    assert all(t.offset % ALIGN == 0 for u in plan.units for t in u.tensors)
    assert u.nbytes == _round(40_192 + 1_000, ALIGN)
    assert plan.slot_bytes == _round(u.nbytes, PAGE) and plan.slot_bytes % PAGE == 0
    assert plan.num_slots == 2 and plan.prefetch == 1
    assert [u.ahead for u in plan.units] == [[1], [2], [0]]  # cyclic
    # buffers and everything outside the blocks stay resident
    assert plan.resident_bytes == 64 * KiB * 2 + 512 + 3 * 128
    assert len(plan.resident) == len(layout.tensors) - 6
    # storage "cpu": every slot image in the host pool, page aligned
    assert [u.host_offset for u in plan.units] == [k * _round(u.nbytes, PAGE) for k in range(3)]
    assert plan.host_bytes == 3 * _round(u.nbytes, PAGE)
    assert plan.num_staging == 0 and plan.ram_extra == 0 and plan.warnings == []
    assert plan.device_bytes == plan.resident_bytes + 2 * plan.slot_bytes


def test_plan_follows_file_order_and_disk_needs_no_host_pool():
    plan = plan_offload(_layout(files=True), _opts(storage="disk", num_readers=3))
    assert [t.name for t in plan.units[1].tensors] == ["layers.1.norm.weight", "layers.1.mlp.weight"]
    assert plan.host_bytes == 0
    # O_DIRECT bounce buffers (one more than the readers) count against the RAM budget on CPU
    assert plan.num_staging == 4 and plan.ram_extra == plan.staging_bytes == _C.stream_staging_bytes(
        4 << 20, 4
    )


def test_plan_for_a_cuda_device_without_one():
    cpu = _opts(storage="disk", num_readers=3)
    cuda = dataclasses.replace(cpu, device=torch.device("cuda", 0), chunk_bytes=16 << 20)
    plan = plan_offload(_layout(), cuda)
    assert plan.num_staging == 6  # 2 per reader, at least 4
    assert plan.ram_extra == 0 and plan.staging_bytes == _C.stream_staging_bytes(16 << 20, 6)


def test_plan_budget_lowers_prefetch_then_streams_leaves_then_refuses():
    layout = _layout()
    full = plan_offload(layout, _opts(prefetch=2))
    slot, res = full.slot_bytes, full.resident_bytes
    plan = plan_offload(layout, _opts(prefetch=2, max_device_memory=res + 2 * slot))
    assert plan.num_slots == 2 and plan.prefetch == 1
    assert "prefetch lowered from 2 to 1" in plan.warnings[0]
    # too small for the embedding and head to stay: they become units of their own, in module order
    plan = plan_offload(layout, _opts(prefetch=0, max_device_memory=res))  # the slot grows to 64 KiB
    assert [u.module for u in plan.units] == ["embed", "layers.0", "layers.1", "layers.2"]
    assert plan.resident_bytes == res - 64 * KiB
    plan = plan_offload(layout, _opts(prefetch=0, max_device_memory=512 + 3 * 128 + 64 * KiB + 4096))
    assert [u.module for u in plan.units] == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    with pytest.raises(
        ValueError, match=r"is too small: one streamed layer needs .* when the embedding / output"
    ):
        plan_offload(layout, _opts(max_device_memory=slot))


def test_plan_never_streams_a_tied_leaf():
    layout = _layout(tied=True)
    full = plan_offload(layout, _opts(prefetch=0))
    need = full.resident_bytes + full.slot_bytes
    # only the norm (512 bytes) may leave: the embedding is tied to the head
    plan = plan_offload(layout, _opts(prefetch=0, max_device_memory=need - 256))
    assert [u.module for u in plan.units] == ["layers.0", "layers.1", "layers.2", "norm"]
    with pytest.raises(ValueError, match="is too small"):
        plan_offload(layout, _opts(prefetch=0, max_device_memory=need - 1024))


def test_plan_refuses_blocks_without_parameters():
    layout = ModelLayout([TensorSpec(0, ("layers.0.buf",), 64, False)], ["layers.0", "layers.1"])
    with pytest.raises(ValueError, match="the blocks have no parameters to stream"):
        plan_offload(layout, _opts())
    with pytest.raises(ValueError, match="no blocks to stream"):
        plan_offload(ModelLayout([], []), _opts())


def test_options_are_checked_once_with_their_names():
    with pytest.raises(ValueError, match="storage must be 'cpu' or 'disk'"):
        _opts(storage="ssd")
    with pytest.raises(ValueError, match="num_readers must be an int in"):
        _opts(num_readers=0)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        _opts(chunk_bytes=-4)
    with pytest.raises(ValueError, match="max_device_memory must look like"):
        _opts(max_device_memory="lots")
    assert _opts(chunk_bytes=5000).chunk_bytes == 8192  # whole pages
    assert _opts(pin=True).pin == _C.PinMode.mlock and _opts().pin == _C.PinMode.none
    with pytest.raises(TypeError, match=r"moestream.load_offloaded: unknown argument\(s\) \['prefech'\]"):
        ms.load_offloaded("/nonexistent", device="cpu", prefech=3)


def _moe_layout(num_blocks=3, E=8, k=2, expert=(6_000, 3_000), attn=20_000, router=True):
    """embed -> blocks (attention, router [E, H], experts gate_up [E, ...] and down [E, ...]) -> head."""
    from moestream.offload.planner import ExpertGroupSpec

    ts, groups, key = [], [], 0

    def add(name, nbytes, is_param=True):
        nonlocal key
        ts.append(TensorSpec(key, (name,), nbytes, is_param, None, (name.rsplit(".", 1)[0],)))
        key += 1
        return key - 1

    add("embed.weight", 64 * KiB)
    for b in range(num_blocks):
        add(f"layers.{b}.attn.weight", attn)
        r = add(f"layers.{b}.mlp.gate.weight", E * 128) if router else None
        gu = add(f"layers.{b}.mlp.experts.gate_up_proj", E * expert[0])
        dn = add(f"layers.{b}.mlp.experts.down_proj", E * expert[1])
        groups.append(ExpertGroupSpec(f"layers.{b}.mlp.experts", b, (gu, dn), E, k, (r,) if router else ()))
    add("head.weight", 64 * KiB)
    return ModelLayout(ts, [f"layers.{b}" for b in range(num_blocks)], ["embed"], ["head"], groups)


def test_expert_plan_slots_units_and_budget():
    layout = _moe_layout()
    eslot = _round(_round(6_000, ALIGN) + 3_000, PAGE)
    plan = plan_offload(layout, _opts(prefetch=1))
    ep = plan.experts
    assert ep is not None and ep.slot_bytes == eslot and ep.min_slots == 2
    # the layer units hold only the attention; the routers stay resident
    assert [[t.name for t in u.tensors] for u in plan.units][0] == ["layers.0.attn.weight"]
    assert plan.resident_bytes == 2 * 64 * KiB + 3 * 8 * 128
    assert [(g.module, g.first_unit) for g in ep.groups] == [
        (f"layers.{b}.mlp.experts", 8 * b) for b in range(3)
    ]
    g = ep.groups[0]
    assert [(t.offset, t.nbytes) for t in g.tensors] == [(0, 6_000), (_round(6_000, ALIGN), 3_000)]
    assert ep.num_slots == 8 * plan.num_slots  # no budget: one layer's experts per layer slot
    assert ep.expert_bytes == 3 * 8 * 9_000
    # a budget: the cache takes what the resident weights and the layer slots leave
    budget = plan.resident_bytes + plan.ram_extra + 2 * plan.slot_bytes + 5 * eslot + 100
    p2 = plan_offload(layout, _opts(prefetch=1, max_device_memory=budget))
    assert p2.experts.num_slots == 5 and p2.device_bytes <= budget
    # below one layer plus k experts: refused, naming the minimum
    need = plan.resident_bytes + plan.ram_extra + plan.slot_bytes + 2 * eslot
    with pytest.raises(ValueError, match="expert cache at least 2 experts"):
        plan_offload(layout, _opts(max_device_memory=need // 4))
    assert plan_offload(layout, _opts(max_device_memory=need)).experts.num_slots == 2
    # experts="layer": whole layers again
    p3 = plan_offload(layout, _opts(experts="layer"))
    assert p3.experts is None and len(p3.units[0].tensors) == 4


def test_expert_plan_on_storage_cpu_and_cuda():
    layout = _moe_layout(num_blocks=2)
    p = plan_offload(layout, _opts(storage="cpu"))
    offs = [o for g in p.experts.groups for o in g.host_offsets]
    assert len(offs) == 4 and all(o % PAGE == 0 for o in offs) and offs == sorted(offs)
    assert p.host_bytes >= offs[-1] + 8 * 3_000
    cuda = dataclasses.replace(_opts(storage="disk"), device=torch.device("cuda", 0), pin=_C.PinMode.cuda)
    pc = plan_offload(layout, cuda)
    assert pc.experts.num_slots == 8 * pc.num_slots and pc.ram_extra == 0 and pc.num_staging > 0


def test_read_buffers_are_sized_to_a_small_budget():
    # disk storage with O_DIRECT on the CPU: the bounce buffers count in the budget. The default ones
    # (5 x 4 MiB) dwarf these layers; any budget holding the resident weights, two slots and the
    # smallest buffer must work, with buffers as large as the rest allows.
    layout = _layout(num_blocks=6, block=(700 * KiB, 4 * KiB))
    opts = {"storage": "disk", "num_readers": 4, "prefetch": 2}
    full = plan_offload(layout, _opts(**opts))
    assert full.staging_bytes == _C.stream_staging_bytes(4 << 20, 5) and full.chunk_bytes == 4 << 20
    res, slot = full.resident_bytes, full.slot_bytes
    smallest = _C.stream_staging_bytes(min(4 << 20, MIN_CHUNK), 1)
    for extra in (smallest, 3 * smallest, 1 << 20, 6 << 20, 30 << 20):
        budget = res + 2 * slot + extra
        plan = plan_offload(layout, _opts(max_device_memory=budget, **opts))
        assert plan.device_bytes <= budget and plan.num_slots >= 2
        assert (
            plan.ram_extra
            == plan.staging_bytes
            == _C.stream_staging_bytes(plan.chunk_bytes, plan.num_staging)
        )
        assert plan.staging_bytes <= extra
        # the largest that fits: doubling the chunk (or one more buffer at the smallest chunk) would not
        if plan.chunk_bytes < 4 << 20 and plan.num_staging == full.num_staging:
            assert _C.stream_staging_bytes(2 * plan.chunk_bytes, plan.num_staging) > extra
        elif plan.num_staging < full.num_staging:
            assert _C.stream_staging_bytes(plan.chunk_bytes, plan.num_staging + 1) > extra
    # one slot and the smallest buffer still work (prefetch 0); below that the error names the minimum
    plan = plan_offload(layout, _opts(max_device_memory=res + slot + smallest, **opts))
    assert plan.num_slots == 1 and plan.staging_bytes == smallest
    with pytest.raises(ValueError, match=r"read buffers at the least\), so at least") as e:
        plan_offload(layout, _opts(max_device_memory=slot + smallest - 1, **opts))
    from moestream.offload.options import fmt_bytes

    assert f"at least {fmt_bytes(res + slot + smallest)} is needed" in str(e.value)


def test_bad_option_values_are_named():
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"max_device_memory must be a finite number of bytes"):
            _opts(max_device_memory=value)
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"num_readers must be an int in \[1, 256\]"):
            _opts(num_readers=n)
