"""Timing: warm-up, then an adaptive number of repetitions within a time budget.

This is the bench tier's one timing loop (:func:`measure_round_robin`; :func:`measure` for one
implementation): the ops and moe suites' rows, the machine's ceilings, whole models and streaming
all go through it, and :class:`Measurement` is their one summary (median, quantiles, spread).

On CUDA every call is bracketed by a pair of CUDA events on the current stream (the host does not
wait between calls; one synchronisation at the end reads all events), so the time is the device's
time from the first to the last kernel of the call, launch gaps included. On CPU every call is timed
with ``time.perf_counter``. Calls cycle through several prepared input sets (see ``core``), so
caches do not hold one set's data from the previous call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

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

    @staticmethod
    def fixed(reps: int) -> TimingPolicy:
        """One warm-up round, then exactly ``reps`` timed rounds (a decode loop's steps, a bandwidth
        probe's repetitions)."""
        return TimingPolicy(budget_s=1e9, warmup_s=0.0, min_reps=reps, max_reps=reps, slow_reps=reps)


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence (nan when empty)."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


QUANTILES = {"p10_ms": 0.1, "p25_ms": 0.25, "median_ms": 0.5, "p75_ms": 0.75, "p90_ms": 0.9}


@dataclass
class Measurement:
    """The times of the timed calls (ms) and their quantiles (:data:`QUANTILES`)."""

    times_ms: list[float]
    p10_ms: float = field(init=False)
    p25_ms: float = field(init=False)
    median_ms: float = field(init=False)
    p75_ms: float = field(init=False)
    p90_ms: float = field(init=False)

    def __post_init__(self) -> None:
        xs = sorted(self.times_ms)
        for name, q in QUANTILES.items():
            setattr(self, name, quantile(xs, q))

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    def _rel(self, lo: float, hi: float) -> float:
        m = self.median_ms
        return (hi - lo) / m if m > 0 else 0.0

    @property
    def spread(self) -> float:
        """Half the p10..p90 range relative to the median (0.03 = +-3%)."""
        return self._rel(self.p10_ms, self.p90_ms) / 2

    @property
    def iqr_rel(self) -> float:
        return self._rel(self.p25_ms, self.p75_ms)


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


Calls = Sequence[Callable[[], object]]


def measure(
    calls: Calls, device: torch.device, policy: TimingPolicy, before: Callable[[], object] | None = None
) -> Measurement:
    """Time one implementation: ``calls`` holds one closure per input set, used round-robin (see
    :func:`measure_round_robin`)."""
    return measure_round_robin({"": calls}, device, policy, before)[""]


def measure_round_robin(
    impls: Mapping[str, Calls],
    device: torch.device,
    policy: TimingPolicy,
    before: Callable[[], object] | None = None,
    warmed: bool = False,
) -> dict[str, Measurement]:
    """The timing loop. Time several implementations round-robin, one call of each per round, so
    that a change of load on the machine hits every implementation alike; each implementation's
    calls (one closure per input set) rotate through the sets. Warm-up: rounds until every set was
    used once and ``warmup_s`` has passed (one round only when a round already takes longer than
    the budget); then :func:`repetitions` timed rounds, the count estimated from the warm-up as
    if each implementation were timed alone. ``before()``, when given, runs before every call and
    is not timed (e.g. evicting files from the page cache). ``warmed``: every call has already run
    once (a correctness check did it); with a fixed repetition count (``TimingPolicy.fixed``) that
    was the warm-up, and no further round is made (a whole model's training step takes seconds)."""
    if not impls or not all(impls.values()):
        raise ValueError("measure() needs at least one call per implementation")
    names = list(impls)
    n_sets = max(len(c) for c in impls.values())

    pc = time.perf_counter
    synchronize(device)
    t0, untimed, done = pc(), 0.0, 0
    # already warmed by the caller, one set, a fixed count: nothing to warm or to estimate
    skip = warmed and n_sets == 1 and policy.min_reps == policy.max_reps == policy.slow_reps
    while not skip and (done < n_sets or pc() - t0 - untimed < policy.warmup_s):
        for name in names:
            if before is not None:
                t = pc()
                before()
                untimed += pc() - t
            impls[name][done % len(impls[name])]()
        done += 1
        if done < n_sets and pc() - t0 - untimed > policy.budget_s * len(names):
            # slow calls (a loop-over-experts backward on CPU takes seconds): one warm-up round,
            # not one per input set; the timed calls still rotate through every set
            break
        if device.type == "cuda" and done % n_sets == 0:
            synchronize(device)  # keep the estimate honest: the host may run ahead of the device
    synchronize(device)
    per_call = (pc() - t0 - untimed) / max(1, done * len(names))
    reps = repetitions(per_call, policy)  # (per_call 0, no warm-up round: max_reps)

    times: dict[str, list[float]] = {name: [] for name in names}
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        events = {
            name: [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            for name in names
        }
        for i in range(reps):
            for name in names:
                if before is not None:
                    before()
                fn, (start, end) = impls[name][i % len(impls[name])], events[name][i]
                start.record(stream)
                fn()
                end.record(stream)
        torch.cuda.synchronize(device)
        times = {name: [s.elapsed_time(e) for s, e in ev] for name, ev in events.items()}
    else:
        for i in range(reps):
            for name in names:
                if before is not None:
                    before()
                fn = impls[name][i % len(impls[name])]
                t = pc()
                fn()
                times[name].append((pc() - t) * 1e3)
    return {name: Measurement(ts) for name, ts in times.items()}
