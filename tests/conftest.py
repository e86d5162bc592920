"""Shared fixtures. The accuracy rules of DESIGN.md (float32 within 1e-5 relative of the float64
reference; bfloat16 / float16 within 2x of what the reference itself loses at that dtype; index
outputs exact) are :mod:`moestream.testing`'s, re-exported here: ``rel_err``, ``assert_accurate``.
"""

from __future__ import annotations

import moestream
import pytest
import torch
from moestream._tuning import tuning
from moestream.testing import assert_accurate, rel_err  # noqa: F401  (the tests' names)

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): with several threads the kernels' and ATen's thread pools spin longer than
    the work takes (x20 CPU time measured on a busy 2-core machine), and spinning OpenMP workers
    starve the streaming engine's reader threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
