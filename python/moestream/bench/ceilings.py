"""The machine's own ceilings, measured in the same run as the rows they judge.

- dense matmul rate per dtype: one ``torch.mm`` of a size comparable to the shape's expert GEMM
  (M = 4096 rows on CUDA, 1024 on CPU; K = hidden, N = 2 * intermediate, each clamped to
  [256, 8192] on CUDA and [256, 4096] on CPU so that the measurement stays short);
- memory bandwidth: a copy of a large tensor (1 GiB on CUDA, 256 MiB on CPU, 64 MiB in quick mode),
  counting the bytes read plus the bytes written.
"""

from __future__ import annotations

import torch

from .shapes import Shape
from .timing import TimingPolicy, measure


def matmul_size(shape: Shape, device: torch.device, quick: bool) -> tuple[int, int, int]:
    lo, hi = 256, (8192 if device.type == "cuda" else 4096)
    m = 4096 if device.type == "cuda" else (512 if quick else 1024)
    k = min(hi, max(lo, shape.hidden))
    n = min(hi, max(lo, 2 * shape.intermediate))
    return m, k, n


def measure_matmul(
    shape: Shape, device: torch.device, dtype: torch.dtype, policy: TimingPolicy, quick: bool = False
) -> dict:
    m, k, n = matmul_size(shape, device, quick)
    g = torch.Generator(device=device).manual_seed(7)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(m, n, device=device, dtype=dtype)
    meas = measure([lambda: torch.mm(a, b, out=out)], device, policy)
    flops = 2.0 * m * k * n
    return {
        "op": "torch.mm",
        "m": m,
        "k": k,
        "n": n,
        "median_ms": meas.median_ms,
        "gflops": flops / (meas.median_ms * 1e-3) / 1e9,
    }


def bandwidth_bytes(device: torch.device, quick: bool) -> int:
    if quick:
        return 64 << 20
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def measure_bandwidth(device: torch.device, policy: TimingPolicy, quick: bool = False) -> dict:
    nbytes = bandwidth_bytes(device, quick)
    n = nbytes // 4
    src = torch.rand(n, device=device, dtype=torch.float32) + 1.0
    dst = torch.empty_like(src)
    meas = measure([lambda: dst.copy_(src)], device, policy)
    moved = 2.0 * nbytes
    return {
        "op": "copy",
        "bytes": nbytes,
        "median_ms": meas.median_ms,
        "gbps": moved / (meas.median_ms * 1e-3) / 1e9,
    }
