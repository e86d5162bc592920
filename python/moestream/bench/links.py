"""What the streaming suites (``stream``, ``expert_cache``) share: the raw rate of the link the
weights cross (cold disk reads by the engine's reader threads, pinned host-to-device copies), the
page cache control that keeps reads cold, and the decode loop that times one step per call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .. import _C
from .core import Row, dtype_name
from .timing import Measurement, TimingPolicy, measure

READERS = 4  # reader threads of the disk probe and the engine
CHUNK = 4 << 20  # bytes per read of the disk probe


def drop_page_cache(paths) -> None:
    """Evicts the files' clean pages (POSIX_FADV_DONTNEED), so the next read comes from the disk."""
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def files_under(d: str, suffixes=(".safetensors", ".dat")) -> list[str]:
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.join(root, f) for f in files if f.endswith(suffixes)]
    return sorted(out)


def gbps(nbytes: float, m: Measurement) -> float:
    return nbytes / (m.median_ms * 1e-3) / 1e9


def disk_gbps(files: list[str], direct: bool, chunk: int = CHUNK, reps: int = 2) -> float:
    """Cold reads of ``files`` in ``chunk``-byte pieces by the engine's reader threads (the page
    cache dropped before each)."""
    total = sum(os.path.getsize(f) for f in files)
    m = measure(
        [lambda: _C.read_files_seconds(files, chunk, READERS, direct)],
        torch.device("cpu"),
        TimingPolicy.fixed(reps),
        before=lambda: drop_page_cache(files),
    )
    return gbps(total, m)


def pinned_h2d_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return gbps(nbytes, measure([lambda: dst.copy_(src, non_blocking=True)], device, TimingPolicy.fixed(8)))


def decode(
    model,
    device: torch.device,
    prompt: torch.Tensor,
    steps: int,
    *,
    feed: torch.Tensor | None = None,
    warmup: int = 0,
    before: Callable[[], object] | None = None,
    after_warmup: Callable[[], object] | None = None,
) -> Measurement:
    """The time per decode step with the model's KV cache: a prefill of ``prompt`` [B, P], then
    ``warmup`` untimed steps, ``after_warmup()``, and one more warm-up and ``steps`` timed steps
    (``TimingPolicy.fixed``). Each step feeds one token per sequence: the greedy next token, or
    with ``feed`` [n, B] the next row of it (``n >= warmup + steps + 1``)."""
    with torch.no_grad():
        out = model(input_ids=prompt.to(device), use_cache=True)
        state = {"next": out.logits[:, -1:].argmax(-1), "cache": out.past_key_values, "i": 0}

        def step():
            ids = state["next"] if feed is None else feed[state["i"]].view(-1, 1).to(device)
            state["i"] += 1
            out = model(input_ids=ids, past_key_values=state["cache"], use_cache=True)
            state["next"], state["cache"] = out.logits[:, -1:].argmax(-1), out.past_key_values

        for _ in range(warmup):
            if before is not None:
                before()
            step()
        if after_warmup is not None:
            after_warmup()
        return measure([step], device, TimingPolicy.fixed(steps), before=before)


class SuiteRows:
    """Makes a streaming suite's rows: its name, the run's shape, dtype and device, and the params
    every row has; ``link`` rows carry a measured link rate (the suite's ceiling)."""

    suite = ""

    def __init__(self, shape: str, dtype: torch.dtype, device: torch.device, **params) -> None:
        self.shape, self.dtype, self.device, self.params = shape, dtype, device, params

    def row(self, op: str, impl: str = "moestream", role: str = "ours", tokens: int = 0, **params) -> Row:
        return Row(
            suite=self.suite,
            op=op,
            impl=impl,
            role=role,
            shape=self.shape,
            tokens=tokens,
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            status="ok",
            params={**self.params, **{k: v for k, v in params.items() if v is not None}},
        )

    def link(self, impl: str, gbps: float, note: str, **params) -> Row:
        r = self.row("link", impl, "ceiling", note=note, **params)
        r.gbps = gbps
        return r
