"""What a user meets first: ``python -m moestream`` (help, ``run``), the bench's ``--list`` in a
pipe, ``import moestream.offload``, the licence, and the build's error when torch is missing."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import types

import moestream as ms
import pytest
import torch
from moestream import cli, testing

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _python(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, timeout=240, **kw
    )


# ---------------------------------------------------------------------------------------------
# the package


def test_offload_is_the_subpackage_and_the_function():
    import moestream.offload as mo
    from moestream.offload import OffloadOptions, get_state, plan_offload  # noqa: F401

    assert isinstance(mo, types.ModuleType) and mo is sys.modules["moestream.offload"]
    assert ms.offload is mo and callable(ms.offload)
    assert mo.offload is mo.api.offload
    import inspect

    assert list(inspect.signature(ms.offload).parameters)[:3] == ["model", "device", "max_device_memory"]
    # calling the package streams a model, like the function
    net = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.ModuleList([torch.nn.Linear(8, 8)]))
    with pytest.raises(ValueError, match="storage must be"):
        ms.offload(net, device="cpu", storage="tape")


def test_license_is_apache_2():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS" in text
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'license = { text = "Apache-2.0" }' in f.read()


def test_python_m_moestream_prints_help():
    r = _python("-m", "moestream")
    assert r.returncode == 0, r.stderr
    assert "usage: python -m moestream" in r.stdout and "run" in r.stdout and "bench" in r.stdout
    r = _python("-m", "moestream", "run", "--help")
    assert r.returncode == 0 and "--max-device-memory" in r.stdout and "--patch-moe" in r.stdout


def test_bench_list_into_a_closed_pipe_is_quiet():
    # `moestream-bench --list | head -1`: the reader exits after one line
    p = subprocess.Popen(
        [sys.executable, "-m", "moestream.bench", "--list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    first = p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=240)
    assert first.startswith(b"suites:")
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert p.returncode in (0, 141)


def test_quiet_broken_pipe_returns_141(monkeypatch):
    r, w = os.pipe()
    os.close(r)
    f = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", f)

    @cli.quiet_broken_pipe
    def main() -> int:
        print("x" * 100000)
        return 0

    try:
        assert main() == 141
    finally:
        monkeypatch.undo()


@pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None, reason="cmake/ninja missing"
)
def test_cmake_without_torch_names_the_fix(tmp_path):
    # an interpreter without torch: what pip's build isolation gives the build
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            str(tmp_path / "build"),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={venv}/bin/python",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "Could NOT find Python" in r.stderr:
        pytest.skip("no Python development headers for a plain venv here")
    assert r.returncode != 0
    msg = " ".join(r.stderr.split())
    assert "cannot import torch" in msg and "No module named 'torch'" in msg
    assert "pip install --no-build-isolation ." in msg and "scikit-build-core" in msg


# ---------------------------------------------------------------------------------------------
# python -m moestream run


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    d = str(tmp_path_factory.mktemp("qwen3-moe"))
    testing.write_random_checkpoint(d, "qwen3_moe", "offload")
    testing.write_tokenizer(d, int(testing.family_config("qwen3_moe", "offload").vocab_size))
    return d


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    d = str(tmp_path_factory.mktemp("llama"))
    testing.write_random_checkpoint(d, "llama", "offload")
    testing.write_tokenizer(d, int(testing.family_config("llama", "offload").vocab_size))
    return d


PROMPT = "the experts of a MoE layer stream from disk, one token at a time"


def _reference_text(checkpoint: str, n: int) -> str:
    """What plain transformers generates greedily from the checkpoint (the whole model in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _run(argv: list[str]) -> tuple[int, str, str]:
    parser = cli.build_parser()
    out, err = io.StringIO(), io.StringIO()
    rc = cli.run(parser.parse_args(argv), parser, out, err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "extra",
    [
        ["--storage", "disk", "--max-device-memory", "48MiB"],
        ["--storage", "cpu", "--patch-moe"],
        ["--storage", "disk", "--experts", "layer", "--no-stream"],
    ],
    ids=["disk-cache", "cpu-patch-moe", "layer"],
)
def test_run_moe_streams_the_same_text_as_transformers(moe_checkpoint, extra):
    n = 7
    want = _reference_text(moe_checkpoint, n)
    rc, out, err = _run(
        ["run", moe_checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(n), "--device", "cpu", *extra]
    )
    assert rc == 0, err
    assert out.strip() == want.strip()
    m = re.search(r"(\d+) new tokens in [\d.]+ s: ([\d.]+) tokens/s", err)
    assert m and int(m.group(1)) >= 1 and float(m.group(2)) > 0, err
    m = re.search(r"bytes read per token: ([\d.]+) (\w+) from storage", err)
    assert m, err
    assert "peak memory" in err
    if "--storage" in extra and extra[extra.index("--storage") + 1] == "disk":
        assert float(m.group(1)) > 0  # the streamed layers are read from the checkpoint at every token
    if "layer" in extra:
        assert "expert cache" not in err and "experts: layer" in err
    else:
        m = re.search(r"expert cache: hit rate ([\d.]+)% \((\d+) hits, (\d+) misses", err)
        assert m, err
        hits, misses = int(m.group(2)), int(m.group(3))
        assert misses > 0 and abs(float(m.group(1)) - 100 * hits / (hits + misses)) < 0.06
    if "--patch-moe" in extra:
        assert "patch_moe: 6 MoE blocks" in err


def test_run_compressed(tmp_path, capsys):
    from moestream import quant
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(tmp_path / "llama")
    testing.write_random_checkpoint(d, "llama", testing.QUANT_SIZES["llama"])
    testing.write_tokenizer(d, int(testing.family_config("llama", testing.QUANT_SIZES["llama"]).vocab_size))
    tok = AutoTokenizer.from_pretrained(d)
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    quant.quantize_model(ref, quant.QuantScheme("int4", 32))
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        want = ref.generate(**enc, max_new_tokens=5, do_sample=False)
    want = tok.decode(want[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    argv = ["run", d, "--prompt", PROMPT, "--max-new-tokens", "5", "--device", "cpu", "--compress", "int4"]
    rc, out, err = _run([*argv, "--group-size", "32"])
    assert rc == 0, err
    assert out.strip() == want.strip()
    with pytest.raises(SystemExit) as e:
        _run([*argv, "--group-size", "48"])
    assert e.value.code == 2 and "--group-size" in capsys.readouterr().err


def test_run_dense_model(dense_checkpoint):
    want = _reference_text(dense_checkpoint, 5)
    rc, out, err = _run(
        ["run", dense_checkpoint, "--prompt", PROMPT, "--max-new-tokens", "5", "--device", "cpu"]
    )
    assert rc == 0, err
    assert out.strip() == want.strip()
    assert "expert cache" not in err and "tokens/s" in err


def test_run_reports_bad_input(moe_checkpoint, dense_checkpoint, tmp_path, capsys):
    rc, _, err = _run(
        ["run", moe_checkpoint, "--prompt", "x", "--device", "cpu", "--max-device-memory", "16KiB"]
    )
    assert rc == 1 and "max_device_memory=16.00 KiB is too small" in err
    rc, _, err = _run(["run", dense_checkpoint, "--prompt", "x", "--device", "cpu", "--patch-moe"])
    assert rc == 1 and "--patch-moe" in err and "no MoE block" in err
    for argv, what in [
        (["run", moe_checkpoint, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["run", str(tmp_path / "nowhere"), "--prompt", "x"], "not a directory"),
        (["run", moe_checkpoint, "--prompt", "x", "--device", "tpu"], "--device"),
        (["run", moe_checkpoint, "--prompt", "x", "--storage", "tape"], "--storage"),
    ]:
        with pytest.raises(SystemExit) as e:
            _run(argv)
        assert e.value.code == 2
        assert what in capsys.readouterr().err
