"""The process-wide kernel tuning: moestream._C.get_tuning / set_tuning and moestream._tuning.tuning."""

from __future__ import annotations

import os
import subprocess
import sys

import moestream as ms
import pytest
import torch
from conftest import assert_accurate
from moestream import _C
from moestream import reference as R
from moestream._tuning import get_tuning, set_tuning, tuning

DEFAULTS = {
    "cpu_hugepages": True,
    "cpu_lowp_gemm": "auto",
    "cpu_gmm_schedule": "auto",
    "cpu_panel_kb": 512,
    "cpu_small_rows": None,
    "gmm_impl": "auto",
}


def test_defaults():
    t = get_tuning()
    assert set(t) == set(DEFAULTS) | {"check_inputs"}
    assert {k: t[k] for k in DEFAULTS} == DEFAULTS
    assert isinstance(t["check_inputs"], bool)


def test_context_manager_sets_and_restores():
    before = get_tuning()
    with tuning(cpu_gmm_schedule="serial", cpu_panel_kb=64, cpu_small_rows=0, check_inputs=True) as now:
        assert now == get_tuning()
        assert (now["cpu_gmm_schedule"], now["cpu_panel_kb"], now["cpu_small_rows"]) == ("serial", 64, 0)
        assert now["check_inputs"] is True
        with tuning(cpu_small_rows=None, gmm_impl="simt"):
            assert get_tuning()["cpu_small_rows"] is None and get_tuning()["gmm_impl"] == "simt"
        assert get_tuning()["cpu_small_rows"] == 0 and get_tuning()["gmm_impl"] == "auto"
    assert get_tuning() == before
    with pytest.raises(KeyError), tuning(cpu_lowp_gemm="float"):
        raise KeyError("restored on an exception too")
    assert get_tuning() == before


def test_unknown_key_and_bad_values_raise_and_change_nothing():
    before = get_tuning()
    with pytest.raises(
        ValueError, match=r"unknown key 'cpu_threads'; the keys are check_inputs, cpu_hugepages"
    ):
        set_tuning(cpu_panel_kb=64, cpu_threads=4)
    bad = [
        ("cpu_lowp_gemm", "fast", r"cpu_lowp_gemm must be one of auto, native, float, got 'fast'"),
        ("cpu_gmm_schedule", 1, r"cpu_gmm_schedule must be one of auto, split, serial, got 1"),
        ("gmm_impl", "cublas", r"gmm_impl must be one of auto, simt, mma, wgmma, gemv, got 'cublas'"),
        ("cpu_panel_kb", 0, r"cpu_panel_kb must be an int >= 1 \(KiB\), got 0"),
        ("cpu_panel_kb", 1.5, r"cpu_panel_kb must be an int >= 1 \(KiB\), got 1.5"),
        ("cpu_small_rows", -1, r"cpu_small_rows must be None or an int >= 0, got -1"),
        ("cpu_hugepages", 0, r"cpu_hugepages must be True or False, got 0"),
        ("check_inputs", "1", r"check_inputs must be True or False, got '1'"),
    ]
    for key, value, msg in bad:
        with pytest.raises(ValueError, match=msg):
            set_tuning(**{"cpu_small_rows": 3, key: value})
    assert get_tuning() == before


def test_wgmma_needs_the_build_option():
    if _C.with_gmm_wgmma:
        with tuning(gmm_impl="wgmma"):
            assert get_tuning()["gmm_impl"] == "wgmma"
    else:
        with pytest.raises(
            ValueError, match=r"gmm_impl 'wgmma' is not compiled into this build.*MOESTREAM_GMM_WGMMA"
        ):
            set_tuning(gmm_impl="wgmma")
        assert get_tuning()["gmm_impl"] == "auto"


def test_check_inputs_starts_from_the_environment_once(monkeypatch):
    code = "import moestream._tuning as t; print(t.get_tuning()['check_inputs'])"
    for value, expect in (("1", "True"), ("0", "False")):
        env = dict(os.environ, MOESTREAM_CHECK_INPUTS=value)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expect
    # read when the library loads, not at each call
    before = get_tuning()["check_inputs"]
    monkeypatch.setenv("MOESTREAM_CHECK_INPUTS", "0" if before else "1")
    assert get_tuning()["check_inputs"] == before


@pytest.mark.parametrize(
    "knobs",
    [
        {"cpu_gmm_schedule": "split"},
        {"cpu_gmm_schedule": "serial"},
        {"cpu_small_rows": 0},
        {"cpu_small_rows": 2, "cpu_panel_kb": 1},
        {"cpu_lowp_gemm": "native"},
        {"cpu_lowp_gemm": "float", "cpu_hugepages": False},
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_grouped_mm_under_each_setting(knobs, dtype):
    # every CPU grouped_mm path the knobs select stays within the accuracy rules
    counts, K, N = [1, 3, 0, 9, 40, 2], 96, 80
    E, M = len(counts), sum(counts) + 2
    a = torch.randn(M, K, dtype=dtype)
    offsets = torch.cumsum(torch.tensor(counts), 0)
    for transpose_b in (False, True):
        b = torch.randn((E, N, K) if transpose_b else (E, K, N), dtype=dtype)
        bias = torch.randn(E, N, dtype=dtype)
        with tuning(**knobs):
            out = ms.grouped_mm(a, b, offsets, transpose_b, bias)
        ref64 = R.grouped_mm(a.double(), b.double(), offsets, transpose_b, bias.double())
        assert_accurate(out, ref64, R.grouped_mm(a, b, offsets, transpose_b, bias), str(knobs))
        assert (out[sum(counts) :] == 0).all()
