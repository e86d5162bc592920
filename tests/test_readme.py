"""Every ```python block of README.md runs, so the README stays true.

Each block runs on its own (a fresh namespace: a reader copies one block at a time), in a temporary
working directory, after the substitutions of :data:`SUBSTITUTIONS`: tiny random checkpoints (with
an offline tokenizer) stand in for the ``path/to/...`` models, and, without CUDA, the CPU for
``"cuda"``. Nothing else in a block is changed.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from moestream import testing

pytest.importorskip("transformers")

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")

# README placeholder -> (family, size) of the tiny checkpoint written in its place
CHECKPOINTS = {
    "path/to/qwen3-moe": ("qwen3_moe", "small"),
    "path/to/qwen3-30b-a3b": ("qwen3_moe", "offload"),
    "path/to/llama-3-8b": ("llama", "offload"),
    "path/to/llama-3-70b": ("llama", "offload"),
    "path/to/llama-3.1-8b": ("llama", "quant"),  # testing.QUANT_SIZES: widths the int4 groups divide
}
# text -> replacement, applied in this order, only when the condition holds
SUBSTITUTIONS = [('"cuda"', '"cpu"', lambda: not torch.cuda.is_available())]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        blocks.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return blocks


with open(README) as _f:
    _TEXT = _f.read()
_BLOCKS = python_blocks(_TEXT)


def test_readme_placeholders_are_all_substituted():
    used = set(re.findall(r'"(path/to/[^"]+)"', "".join(code for _, code in _BLOCKS)))
    assert used == set(CHECKPOINTS), (
        f"README python blocks use {sorted(used)}; the test knows {sorted(CHECKPOINTS)}"
    )
    assert len(_BLOCKS) >= 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    made: dict[tuple[str, str], str] = {}
    out = {}
    for placeholder, (family, size) in CHECKPOINTS.items():
        if (family, size) not in made:
            d = str(tmp_path_factory.mktemp(f"{family}-{size}"))
            sz = testing.QUANT_SIZES[family] if size == "quant" else size
            testing.write_random_checkpoint(d, family, sz)
            testing.write_tokenizer(d, int(testing.family_config(family, sz).vocab_size))
            made[family, size] = d
        out[placeholder] = made[family, size]
    return out


@pytest.mark.parametrize("line,code", _BLOCKS, ids=[f"README.md:{line}" for line, _ in _BLOCKS])
def test_readme_block_runs(line, code, checkpoints, tmp_path, monkeypatch):
    for placeholder, path in checkpoints.items():
        code = code.replace(f'"{placeholder}"', repr(path))
    for old, new, when in SUBSTITUTIONS:
        if when():
            code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the blocks write relative paths ("finetuned", "layered/")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices about random test models
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the test)
