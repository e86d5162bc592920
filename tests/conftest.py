"""Shared fixtures and the accuracy rules of DESIGN.md.

- float32: within 1e-5 relative (norm-wise) of the float64 reference;
- bfloat16 / float16: error against the float64 reference at most 2x what the reference itself
  loses when run at that dtype;
- index outputs: exact.
"""

from __future__ import annotations

import pytest
import torch

import moestream
from moestream._tuning import tuning

HAS_CUDA = torch.cuda.is_available() and moestream.with_cuda

cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of moestream")

DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])]
LOWP = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh random inputs per test, but reproducible from the test id when a failure is investigated
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert x.shape == ref.shape, f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), "non-finite values in output"
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_accurate(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None, what: str = ""):
    """out: our result; ref64: the reference in float64; ref_lowp: the reference run at out's dtype
    (needed for bfloat16 / float16)."""
    err = rel_err(out, ref64)
    if out.dtype in (torch.float32, torch.float64) or ref_lowp is None:
        tol = 1e-5 if out.dtype != torch.float64 else 1e-10
        assert err <= tol, f"{what} relative error {err:.3e} > {tol:.0e}"
    else:
        ref_err = rel_err(ref_lowp, ref64)
        # 2x of what the reference loses; a floor of one ulp-scale term keeps exact cases from failing on 0
        tol = 2 * ref_err + torch.finfo(out.dtype).eps * 1e-3
        assert err <= tol, f"{what} relative error {err:.3e} > 2 x reference's {ref_err:.3e} at {out.dtype}"


@pytest.fixture(autouse=True)
def _cuda_value_checks(request):
    # On CUDA, index and offset *values* are validated only with the tuning key check_inputs (it
    # costs a host sync); the bad-input tests assert those messages, so they run with the checks on.
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda" and "bad_input" in request.node.name:
        with tuning(check_inputs=True):
            yield
    else:
        yield
