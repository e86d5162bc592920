"""Timing: warm-up, then an adaptive number of repetitions within a time budget.

On CUDA every call is bracketed by a pair of CUDA events on the current stream (the host does not
wait between calls; one synchronisation at the end reads all events), so the time is the device's
time from the first to the last kernel of the call, launch gaps included. On CPU every call is timed
with ``time.perf_counter``. Calls cycle through several prepared input sets (see ``core``), so
caches do not hold one set's data from the previous call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPolicy:
    budget_s: float = 1.0  # wall time spent timing one row (after warm-up)
    warmup_s: float = 0.1  # at least this long of warm-up calls (and at least one call per input set)
    min_reps: int = 5
    max_reps: int = 2000
    slow_reps: int = 3  # for calls so slow that min_reps of them exceed twice the budget

    @staticmethod
    def for_run(quick: bool, device: torch.device) -> TimingPolicy:
        if quick:
            return TimingPolicy(budget_s=0.05, warmup_s=0.01, min_reps=3, max_reps=50)
        if device.type == "cuda":
            return TimingPolicy(budget_s=0.5, warmup_s=0.05, min_reps=10, max_reps=5000)
        return TimingPolicy(budget_s=1.0, warmup_s=0.1, min_reps=5, max_reps=2000)


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass
class Measurement:
    times_ms: list[float]

    def _q(self, q: float) -> float:
        return quantile(sorted(self.times_ms), q)

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return self._q(0.5)

    @property
    def p10_ms(self) -> float:
        return self._q(0.1)

    @property
    def p25_ms(self) -> float:
        return self._q(0.25)

    @property
    def p75_ms(self) -> float:
        return self._q(0.75)

    @property
    def p90_ms(self) -> float:
        return self._q(0.9)

    @property
    def spread(self) -> float:
        """Half the p10..p90 range relative to the median (0.03 = +-3%)."""
        m = self.median_ms
        return (self.p90_ms - self.p10_ms) / (2 * m) if m > 0 else 0.0

    @property
    def iqr_rel(self) -> float:
        m = self.median_ms
        return (self.p75_ms - self.p25_ms) / m if m > 0 else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repetitions(per_call_s: float, policy: TimingPolicy) -> int:
    """``clamp(budget / call time, min_reps, max_reps)``, except that a call so slow that
    ``min_reps`` of them would take more than twice the budget gets ``slow_reps`` (the median of
    three is still a median, and a CPU run of a loop-over-experts backward must not take minutes)."""
    if per_call_s <= 0:
        return policy.max_reps
    reps = int(policy.budget_s / per_call_s)
    if reps < policy.min_reps:
        reps = policy.min_reps if per_call_s * policy.min_reps <= 2 * policy.budget_s else policy.slow_reps
    return max(1, min(policy.max_reps, reps))


def measure(calls: Sequence[Callable[[], object]], device: torch.device, policy: TimingPolicy) -> Measurement:
    """Time ``calls`` (one closure per input set, used round-robin): warm-up (every set at least
    once unless one call already takes longer than the budget, then until ``warmup_s`` has
    passed), then :func:`repetitions` timed calls, the count
    estimated from the warm-up calls."""
    if not calls:
        raise ValueError("measure() needs at least one call")
    n = len(calls)
    synchronize(device)
    t0 = time.perf_counter()
    done = 0
    while done < n or time.perf_counter() - t0 < policy.warmup_s:
        calls[done % n]()
        done += 1
        if done < n and time.perf_counter() - t0 > policy.budget_s:
            # a slow call (a loop-over-experts backward on CPU takes seconds): one warm-up call,
            # not one per input set; the timed calls still rotate through every set
            synchronize(device)
            break
        if device.type == "cuda" and done % n == 0:
            synchronize(device)  # keep the estimate honest: the host may run ahead of the device
    synchronize(device)
    per_call = (time.perf_counter() - t0) / done
    reps = repetitions(per_call, policy)

    times: list[float] = []
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        for i, (start, end) in enumerate(events):
            start.record(stream)
            calls[i % n]()
            end.record(stream)
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        pc = time.perf_counter
        for i in range(reps):
            t = pc()
            calls[i % n]()
            times.append((pc() - t) * 1e3)
    return Measurement(times)
