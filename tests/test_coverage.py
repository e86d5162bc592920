"""The README's family table is what the installed transformers gives, each route checked; the
warning when "moestream" is asked for on experts it never reaches."""

from __future__ import annotations

import os
import warnings

import moestream as ms  # noqa: F401  (registers "moestream" and the warning)
import pytest
import torch
from moestream import testing

transformers = pytest.importorskip("transformers")
from moestream.integrations import coverage
from moestream.integrations import transformers as hf

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_table_is_current_and_every_route_checked():
    with open(README) as f:
        text = f.read()
    start, end = text.index(coverage.README_BEGIN), text.index(coverage.README_END)
    in_readme = text[start : end + len(coverage.README_END)]
    fams = coverage.moe_families()
    # every "yes" is run here: a registered family whose route is broken raises AssertionError
    want = coverage.readme_section(fams)
    assert in_readme == want, (
        "README.md's family table is stale: python -m moestream.integrations.coverage --write README.md"
    )
    names = {f.name for f in fams}
    assert {f.name for f in hf.SUPPORTED_FAMILIES} <= names
    checked = sum(1 for line in want.splitlines() if line.endswith("| yes |"))
    assert checked >= 30  # the issue counted about 30 families beyond patch_moe's seven


def test_unregistered_families_are_the_ones_the_route_misses():
    fams = {f.name: f for f in coverage.moe_families()}
    for name in ("llama4", "dbrx", "jetmoe"):
        assert not fams[name].experts_implementation, name
    for name in ("llama4", "dbrx", "jetmoe"):  # patch_moe is their route
        assert fams[name].patch_moe and fams[name].route == "patch_moe", name
    assert "JetMoeMoA" in fams["jetmoe"].patch_moe_note  # what it leaves out is said
    assert fams["qwen3_moe"].route == 'patch_moe and set_experts_implementation("moestream")'
    from transformers import DbrxForCausalLM, JetMoeForCausalLM, Llama4ForCausalLM, Qwen3MoeForCausalLM

    assert not any(
        coverage.reaches_moestream(c) for c in (DbrxForCausalLM, JetMoeForCausalLM, Llama4ForCausalLM)
    )
    assert coverage.reaches_moestream(Qwen3MoeForCausalLM)


def test_check_fails_when_moestream_is_wrong(monkeypatch):
    fam = next(f for f in coverage.moe_families() if f.name == "qwen3_moe")
    coverage.check_experts_route(fam)
    real = hf.moestream_experts_forward
    monkeypatch.setattr(hf, "moestream_experts_forward", lambda self, x, i, w: real(self, x, i, w) * 1.001)
    try:
        with pytest.raises(AssertionError, match="differs from 'eager'"):
            coverage.check_experts_route(fam)
    finally:
        monkeypatch.undo()
        hf.register()
    coverage.check_experts_route(fam)


def _moestream_warnings(record) -> list[str]:
    return [
        str(w.message) for w in record if 'experts_implementation="moestream" has no effect' in str(w.message)
    ]


def test_warning_when_moestream_cannot_reach_the_experts():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        testing.build_model("llama4", "small", experts_implementation="moestream")
    msgs = _moestream_warnings(rec)
    assert len(msgs) == 1 and "Llama4ForCausalLM" in msgs[0] and "ms.patch_moe(model)" in msgs[0]
    model = testing.build_model("llama4", "small", experts_implementation="eager")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.set_experts_implementation("moestream")
    assert len(_moestream_warnings(rec)) == 1
    # a family it reaches: no warning, and the experts run on moestream
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = testing.build_model("qwen3_moe", "small", experts_implementation="moestream")
    assert not _moestream_warnings(rec)
    ref = testing.build_model("qwen3_moe", "small", experts_implementation="eager")
    ids = testing.input_ids()
    with torch.no_grad():
        testing.assert_accurate(model(ids).logits, ref(ids).logits.double())
