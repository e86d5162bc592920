"""Process-wide kernel tuning (csrc/common/tuning.h), for benchmarks and tests.

Keys and defaults (``get_tuning()`` lists the current values):

- ``check_inputs`` (initially ``MOESTREAM_CHECK_INPUTS=1`` in the environment, else False): CUDA
  ops validate index and offset values, at the cost of a host synchronisation per call;
- ``cpu_hugepages`` (True): large CPU outputs advised for transparent huge pages;
- ``cpu_lowp_gemm`` ("auto" | "native" | "float"): how bfloat16 / float16 GEMMs run on the CPU;
- ``cpu_gmm_schedule`` ("auto" | "split" | "serial"): how the CPU grouped_mm spreads its groups;
- ``cpu_panel_kb`` (512): KiB of the float32 weight panels of the CPU low-precision grouped_mm;
- ``cpu_small_rows`` (None: the measured limits): caps the rows per group of its small-row kernels;
- ``gmm_impl`` ("auto" | "simt" | "mma" | "wgmma" | "gemv"): the CUDA grouped-matmul kernel family
  ("wgmma" only in builds with ``MOESTREAM_GMM_WGMMA=ON``).

An unknown key or a bad value raises ValueError and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _C


def get_tuning() -> dict[str, Any]:
    return _C.get_tuning()


def set_tuning(**kw: Any) -> None:
    _C.set_tuning(**kw)


@contextmanager
def tuning(**kw: Any) -> Iterator[dict[str, Any]]:
    """``with tuning(gmm_impl="simt"): ...`` sets the keys, yields the new values and restores the
    previous ones on exit."""
    previous = _C.get_tuning()
    _C.set_tuning(**kw)
    try:
        yield _C.get_tuning()
    finally:
        _C.set_tuning(**previous)
