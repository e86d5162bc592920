"""The runner's machinery: suites, cases, implementations, the correctness gate, timing, rows.

A *suite* is a function ``(cfg: BenchConfig) -> list[Case]`` registered under a name with
:func:`register_suite`. Suites live in modules ``moestream/bench/suite_<name>.py``, which are found
and imported automatically, so adding a suite is adding one module.

A *case* is one thing to measure (one op at one token count and dtype). It makes random input sets,
computes the float64 reference once, knows how to check an output against it and how much work
(FLOPs, bytes) one call does, and lists the implementations to compare. An *implementation* turns
an input set into a zero-argument closure; the closure is what gets checked and timed.

For every case the runner: computes the reference on input set 0; runs every implementation once
on set 0 and checks it (a wrong one is reported WRONG with its error and not timed; one that cannot
run is reported skipped with the reason); then builds further input sets (rotation, so caches do not
flatter anyone) and times the implementations that passed; then computes rates, fractions of the
machine's ceilings and the speedups against every baseline of the case.
"""

from __future__ import annotations

import functools
import gc
import importlib
import math
import pkgutil
import re
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import ceilings as _ceilings
from .progress import Progress
from .shapes import Shape
from .timing import Measurement, TimingPolicy, measure

# ---------------------------------------------------------------------------------------------
# errors


class Unavailable(Exception):
    """Raised by a suite or an implementation when something it needs is absent; the rows become
    'skipped' with this message as the reason."""


class SuiteSkip(Unavailable):
    """Raised by a suite function: the whole suite does not apply (e.g. a dense shape)."""


# ---------------------------------------------------------------------------------------------
# data model


@dataclass
class Work:
    """What one call does: ``flops`` of matmul work, ``bytes`` read + written at least, and
    ``weight_bytes`` of expert weights read (only experts that receive tokens). ``kind`` says
    which rate judges the row: 'matmul' (FLOP/s against the matmul ceiling, or weight bytes/s
    against the bandwidth when reading weights takes longer than the math) or 'memory' (GB/s
    against the bandwidth)."""

    flops: float = 0.0
    bytes: float = 0.0
    weight_bytes: float = 0.0
    kind: str = "memory"


@dataclass
class Check:
    error: float
    tol: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # nan -> False


@dataclass
class Impl:
    """An implementation of a case: ``prepare(case, inputs)`` returns the closure to check and
    time (work done in ``prepare`` is not timed). ``role`` is 'ours' or 'baseline'; speedups are
    ``baseline time / this time``. ``requires(case)`` may return a reason why it cannot run.
    ``work(inputs)``, when given, replaces the case's work for this implementation's row (one that
    reads other bytes for the same result: compressed weights)."""

    name: str
    prepare: Callable[[Case, dict], Callable[[], Any]]
    role: str = "ours"
    requires: Callable[[Case], str | None] | None = None
    work: Callable[[dict], Work] | None = None


@dataclass
class Case:
    suite: str
    op: str
    shape: Shape
    tokens: int
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[int], dict]  # seed -> one input set (a dict of tensors and values)
    reference: Callable[[dict], Any]  # input set -> the float64 reference result
    check: Callable[[Any, Any, dict], Check]  # (output, reference result, inputs) -> Check
    work: Callable[[dict], Work]
    impls: list[Impl]
    est_bytes: int = 0  # one input set + the reference result, for the memory pre-check
    params: dict = field(default_factory=dict)  # descriptive sizes (M, K, N, ...) for table and JSON

    @property
    def label(self) -> str:
        return f"{self.suite} {self.op} T={self.tokens} {dtype_name(self.dtype)}"


@dataclass
class Row:
    """One result: the row type of every suite (a case's implementation, or a row a
    :class:`Measured` item makes), and one element of the JSON ``rows``."""

    suite: str
    op: str
    impl: str
    role: str  # ours | baseline | ceiling
    shape: str
    tokens: int
    dtype: str
    device: str
    status: str = "pending"  # ok | WRONG | skipped | error
    reason: str = ""
    error: float | None = None  # relative error against the float64 reference
    tol: float | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    spread: float | None = None  # half of p10..p90 relative to the median
    reps: int = 0
    sets: int = 0  # input sets rotated through
    flops: float = 0.0
    bytes: float = 0.0
    weight_bytes: float = 0.0
    gflops: float | None = None
    gbps: float | None = None
    weight_gbps: float | None = None
    bound: str = ""  # compute | weights | memory | link
    ceiling: str = ""  # matmul | bandwidth | link | budget
    ceiling_fraction: float | None = None
    matmul_fraction: float | None = None
    bandwidth_fraction: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # baseline -> baseline_ms / median_ms
    tokens_per_s: float | None = None  # tokens / median time (model and decode rows)
    params: dict = field(default_factory=dict)
    unreliable: str = ""  # why this row's numbers are not to be trusted (see unreliable_reason)

    def record(self, m: Measurement, sets: int = 1) -> None:
        """Status ok, with the measurement's median, quantiles, spread and repetitions."""
        self.status = "ok"
        self.median_ms, self.p10_ms, self.p25_ms = m.median_ms, m.p10_ms, m.p25_ms
        self.p75_ms, self.p90_ms, self.spread = m.p75_ms, m.p90_ms, m.spread
        self.reps, self.sets = m.reps, sets

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return d


@dataclass
class Measured:
    """A suite item that measures itself with its own harness (a link's bandwidth, a decode loop,
    a whole model's training step) and returns finished rows: ``run() -> list[Row]`` with status,
    times, rates, errors and fractions of its own ceilings filled in where they apply. The runner
    runs it in its turn, applies ``--op``/``--impl`` to the rows, turns a missing optional
    dependency (ImportError, :class:`Unavailable`) into a skipped suite and any other exception
    into an error row, and adds what it adds to every row: tokens/s and the speedup against every
    baseline of the same op, dtype and token count."""

    suite: str
    label: str  # for the progress bar and error rows, e.g. "stream float32"
    dtype: torch.dtype
    device: torch.device
    run: Callable[[], list[Row]]
    expected_rows: int = 1  # for the progress bar
    params: dict = field(default_factory=dict)

    @classmethod
    def per_dtype(
        cls,
        cfg: BenchConfig,
        suite: str,
        run: Callable[[BenchConfig, torch.dtype], list[Row]],
        expected_rows: int,
        **params,
    ) -> list[Measured]:
        """One item per dtype of the run; ``run(cfg, dtype)`` measures it and returns its rows."""
        return [
            cls(
                suite,
                f"{suite} {dtype_name(dt)}",
                dt,
                cfg.device,
                functools.partial(run, cfg, dt),
                expected_rows,
                params,
            )
            for dt in cfg.dtypes
        ]


@dataclass
class BenchConfig:
    shape: Shape
    device: torch.device
    dtypes: list[torch.dtype]
    tokens: list[int]
    quick: bool = False
    threads: int | None = None
    ops: list[str] | None = None  # only these ops (None: all)
    impls: list[str] | None = None  # only these implementations (None: all)
    sets: int = 4  # input sets to rotate through (fewer when a set is large)
    policy: TimingPolicy | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.policy is None:
            self.policy = TimingPolicy.for_run(self.quick, self.device)


@dataclass
class BenchResult:
    meta: dict
    rows: list[Row]
    skipped: list[dict]  # suites that did not run, with the reason

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [r.to_dict() for r in self.rows], "skipped": self.skipped}


# ---------------------------------------------------------------------------------------------
# registries

SuiteFn = Callable[[BenchConfig], list[Case | Measured]]

# Suites the CLI knows by name even before their module exists (listed as unavailable until then).
KNOWN_SUITES: dict[str, str] = {
    "ops": "the individual ops against reference.py (and torch._grouped_mm)",
    "moe": "the whole expert path, forward and forward+backward, against reference and transformers",
    "quant": "the expert path on int8 / int4 compressed weights against the same path on dense weights",
    "model": "whole transformers models with moestream's layers patched in",
    "stream": "weight streaming of dense and MoE models",
    "expert_cache": "decoding an offloaded MoE model through the expert cache vs layer streaming",
}
DEFAULT_SUITES = ("ops", "moe")


@dataclass
class SuiteInfo:
    name: str
    fn: SuiteFn
    help: str = ""


SUITES: dict[str, SuiteInfo] = {}
SUITE_IMPORT_ERRORS: dict[str, str] = {}
_EXTRA_IMPLS: dict[tuple[str, str], list[Impl]] = {}
_loaded = False


def register_suite(name: str, help: str = "") -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: ``@register_suite("stream", help=...)`` on ``def suite(cfg) -> list[Case]``."""

    def deco(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = SuiteInfo(name, fn, help or KNOWN_SUITES.get(name, ""))
        return fn

    return deco


def register_impl(suite: str, op: str, impl: Impl) -> None:
    """Add an implementation to every case of ``suite``/``op`` (tests use it to inject fakes;
    an experimental kernel can be compared the same way). Replaces one of the same name."""
    lst = _EXTRA_IMPLS.setdefault((suite, op), [])
    lst[:] = [i for i in lst if i.name != impl.name] + [impl]


def unregister_impl(suite: str, op: str, name: str) -> None:
    lst = _EXTRA_IMPLS.get((suite, op), [])
    lst[:] = [i for i in lst if i.name != name]


def extra_impls(suite: str, op: str) -> list[Impl]:
    return list(_EXTRA_IMPLS.get((suite, op), []))


def load_suites() -> dict[str, SuiteInfo]:
    """Import every ``moestream.bench.suite_*`` module once (each registers its suites)."""
    global _loaded
    if _loaded:
        return SUITES
    _loaded = True
    from . import __path__ as pkg_path

    for mod in sorted(pkgutil.iter_modules(pkg_path), key=lambda m: m.name):
        if not mod.name.startswith("suite_"):
            continue
        try:
            importlib.import_module(f"{__package__}.{mod.name}")
        except Exception as e:  # noqa: BLE001  (a broken optional suite must not take the others down)
            SUITE_IMPORT_ERRORS[mod.name[len("suite_") :]] = f"{type(e).__name__}: {e}"
    return SUITES


def suite_unavailable_reason(name: str) -> str:
    if name in SUITE_IMPORT_ERRORS:
        return f"suite {name!r} failed to import: {SUITE_IMPORT_ERRORS[name]}"
    return f"suite {name!r} is not available yet (no module moestream.bench.suite_{name} registers it)"


# ---------------------------------------------------------------------------------------------
# helpers

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct storages among the tensors in ``obj`` (dict / list / tensor)."""
    seen: set[int] = set()
    total = 0

    def visit(o: Any) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            key = st.data_ptr()
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, list | tuple):
            for v in o:
                visit(v)

    visit(obj)
    return total


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


_NO_KERNEL = re.compile(r"Could not run '([\w:.]+)' with arguments from the '(\w+)' backend")


def _describe_exception(e: BaseException) -> tuple[str, str]:
    """-> (status, reason) for an exception raised while preparing or running an implementation."""
    if isinstance(e, Unavailable):
        return "skipped", str(e)
    if _is_oom(e):
        return "skipped", "out of memory"
    m = _NO_KERNEL.search(str(e))
    if m:
        return "skipped", f"no {m.group(2)} kernel for {m.group(1)} in this build"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return "error", f"{type(e).__name__}: {first[:300]}"


def describe_failure(e: BaseException, role: str) -> tuple[str, str]:
    """-> (status, reason) of an implementation that raised ``e``: 'skipped' when something it
    needs is absent, and for a baseline that cannot run here (absent, not our bug); else 'error'."""
    status, reason = _describe_exception(e)
    if role == "baseline" and status == "error":
        status = "skipped"
    return status, reason


_BIG_CASE = 256 << 20


def _free(device: torch.device, big: bool = True) -> None:
    """Release memory between cases. gc.collect() takes a noticeable fraction of a second with
    torch and transformers loaded, so it runs only after large cases (or an error)."""
    if not big:
        return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# rotation: at most this many bytes of input sets kept at once (a larger set is used alone: it is
# already larger than any cache)
ROTATION_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}


# ---------------------------------------------------------------------------------------------
# the runner


class Runner:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.matmul_ceiling: dict[str, dict] = {}
        self.bandwidth: dict | None = None
        self.ceiling_runs: list[dict] = []
        self._rated: list[tuple] = []  # (row, work, dtype) of every row judged by the ceilings
        self.progress: Progress | None = None

    # ceilings ---------------------------------------------------------------------------------
    def measure_ceilings(self) -> dict:
        """Measures the ceilings and keeps, for each, the best of this and any earlier measurement:
        a ceiling is what the machine can do, and a single measurement on a shared or cold machine
        (clock ramp-up, a neighbour's burst) can come out low and flatter every row judged by it."""
        cfg = self.cfg
        bw = _ceilings.measure_bandwidth(cfg.device, cfg.policy, cfg.quick)
        runs = {"memory_bandwidth": bw, "matmul": {}}
        if self.bandwidth is None or bw["gbps"] > self.bandwidth["gbps"]:
            self.bandwidth = bw
        for dt in cfg.dtypes:
            mm = _ceilings.measure_matmul(cfg.shape, cfg.device, dt, cfg.policy, cfg.quick)
            runs["matmul"][dtype_name(dt)] = mm
            best = self.matmul_ceiling.get(dtype_name(dt))
            if best is None or mm["gflops"] > best["gflops"]:
                self.matmul_ceiling[dtype_name(dt)] = mm
        self.ceiling_runs.append(runs)
        return {
            "memory_bandwidth": self.bandwidth,
            "matmul": self.matmul_ceiling,
            "measurements": self.ceiling_runs,
        }

    def rejudge(self) -> None:
        """Recomputes every timed row's rates and fractions against the current ceilings."""
        for row, work, dtype in self._rated:
            row.matmul_fraction = row.bandwidth_fraction = row.ceiling_fraction = None
            row.bound = row.ceiling = ""
            self._rates(row, work, dtype)

    # cases ------------------------------------------------------------------------------------
    def collect_cases(self, suite_names: list[str]) -> tuple[list[Case | Measured], list[dict]]:
        load_suites()
        cases: list[Case | Measured] = []
        skipped: list[dict] = []
        for name in suite_names:
            info = SUITES.get(name)
            if info is None:
                skipped.append({"suite": name, "reason": suite_unavailable_reason(name)})
                continue
            try:
                got = list(info.fn(self.cfg))
            except Unavailable as e:
                skipped.append({"suite": name, "reason": str(e)})
                continue
            if self.cfg.ops:  # (Measured items are filtered by their rows' ops after running)
                got = [c for c in got if isinstance(c, Measured) or c.op in self.cfg.ops]
            for c in got:
                if isinstance(c, Measured):
                    continue
                extras = extra_impls(c.suite, c.op)
                names = {i.name for i in extras}
                impls = [i for i in c.impls if i.name not in names] + extras
                # ours first, then baselines, each in declaration order
                impls = [i for i in impls if i.role != "baseline"] + [
                    i for i in impls if i.role == "baseline"
                ]
                if self.cfg.impls:
                    impls = [i for i in impls if i.name in self.cfg.impls]
                c.impls = impls
            cases.extend(got)
        return cases, skipped

    def _row(self, case: Case, impl: Impl) -> Row:
        return Row(
            suite=case.suite,
            op=case.op,
            impl=impl.name,
            role=impl.role,
            shape=case.shape.name,
            tokens=case.tokens,
            dtype=dtype_name(case.dtype),
            device=str(case.device),
            params=dict(case.params),
        )

    def run_case(self, case: Case) -> list[Row]:
        cfg = self.cfg
        prog = self.progress
        rows = {impl.name: self._row(case, impl) for impl in case.impls}
        n_impls = len(case.impls)

        def finish_all(status: str, reason: str) -> list[Row]:
            for r in rows.values():
                if r.status == "pending":
                    r.status, r.reason = status, reason
            if prog:
                prog.advance(n_impls, case.label, f"{status}: {reason}")
            return list(rows.values())

        if not case.impls:
            return []
        avail = available_memory(case.device)
        if case.est_bytes > 0.85 * avail:
            return finish_all(
                "skipped",
                f"needs about {case.est_bytes / 2**30:.1f} GiB of {case.device.type} memory, "
                f"{avail / 2**30:.1f} GiB available",
            )

        big = case.est_bytes > _BIG_CASE
        seed0 = cfg.seed * 1_000_003 + 1
        try:
            inputs0 = case.make_inputs(seed0)
            work = case.work(inputs0)
            works = {i.name: i.work(inputs0) if i.work else work for i in case.impls}
            ref = case.reference(inputs0)
        except Exception as e:  # noqa: BLE001
            status, reason = _describe_exception(e)
            if status == "error":
                reason = "the reference failed: " + reason
                traceback.print_exc()
            _free(case.device, big)
            return finish_all(status, reason)
        for name, r in rows.items():
            w = works.get(name, work)
            r.flops, r.bytes, r.weight_bytes = w.flops, w.bytes, w.weight_bytes

        # correctness gate -------------------------------------------------------------------------
        passed: dict[str, tuple[Impl, Callable[[], Any]]] = {}
        for impl in case.impls:
            row = rows[impl.name]
            label = f"{case.label} {impl.name}"
            if prog:
                prog.show(f"{label}: checking")
            reason = impl.requires(case) if impl.requires else None
            if reason:
                row.status, row.reason = "skipped", reason
                if prog:
                    prog.advance(1, label, f"skipped: {reason}")
                continue
            try:
                call = impl.prepare(case, inputs0)
                out = call()
                chk = case.check(out, ref, inputs0)
                del out
            except Exception as e:  # noqa: BLE001
                status, reason = describe_failure(e, impl.role)
                row.status, row.reason = status, reason
                if prog:
                    prog.advance(1, label, f"{status}: {reason}")
                _free(case.device, big or status != "skipped")
                continue
            row.error, row.tol = chk.error, chk.tol
            if not chk.ok:
                row.status = "WRONG"
                row.reason = f"relative error {chk.error:.3g} > {chk.tol:.0e}" + (
                    f" ({chk.detail})" if chk.detail else ""
                )
                if prog:
                    prog.advance(1, label, row.reason)
                continue
            passed[impl.name] = (impl, call)
            if prog:
                prog.advance(0.5, label)
        del ref
        _free(case.device, big)

        # timing ---------------------------------------------------------------------------------
        if passed:
            try:
                set_bytes = max(1, tensor_bytes(inputs0))
                budget = min(
                    ROTATION_BYTES.get(case.device.type, 512 << 20), 0.3 * available_memory(case.device)
                )
                n_sets = int(max(1, min(cfg.sets, budget // set_bytes)))
                sets = [inputs0] + [case.make_inputs(seed0 + i) for i in range(1, n_sets)]
            except Exception as e:
                if not _is_oom(e):
                    raise
                sets = [inputs0]
                _free(case.device, True)
            for name, (impl, call0) in passed.items():
                row = rows[name]
                label = f"{case.label} {name}"
                if prog:
                    prog.show(f"{label}: timing")
                try:
                    calls = [call0] + [impl.prepare(case, s) for s in sets[1:]]
                    meas = measure(calls, case.device, cfg.policy)
                except Exception as e:  # noqa: BLE001
                    row.status, row.reason = _describe_exception(e)
                    if prog:
                        prog.advance(0.5, label, f"{row.status}: {row.reason}")
                    _free(case.device, True)
                    continue
                row.record(meas, len(calls))
                self._rates(row, works.get(name, work), case.dtype)
                self._rated.append((row, works.get(name, work), case.dtype))
                del calls
                if prog:
                    prog.advance(0.5, label, f"{row.median_ms:.4g} ms")
            del sets
        del inputs0, passed
        _free(case.device, big)
        out_rows = list(rows.values())
        self._speedups(out_rows)
        return out_rows

    def run_measured(self, m: Measured, skipped: list[dict]) -> list[Row]:
        """Run a self-measuring suite item (see :class:`Measured`)."""
        prog = self.progress
        if prog:
            prog.show(f"{m.label}: measuring")
        try:
            rows = list(m.run())
        except (ImportError, Unavailable) as e:
            reason = str(e) if isinstance(e, Unavailable) else f"needs {e.name or 'a module'}: {e}"
            skipped.append({"suite": m.suite, "reason": f"{m.label}: {reason}"})
            if prog:
                prog.advance(m.expected_rows, m.label, f"skipped: {reason}")
            _free(m.device, True)
            return []
        except Exception as e:  # noqa: BLE001
            status, reason = _describe_exception(e)
            if status == "error":
                traceback.print_exc()
            row = Row(
                suite=m.suite,
                op="*",
                impl="moestream",
                role="ours",
                shape=self.cfg.shape.name,
                tokens=0,
                dtype=dtype_name(m.dtype),
                device=str(m.device),
                status=status,
                reason=reason,
                params=dict(m.params),
            )
            if prog:
                prog.advance(m.expected_rows, m.label, f"{status}: {reason}")
            _free(m.device, True)
            return [row]
        if self.cfg.ops:
            rows = [r for r in rows if r.op in self.cfg.ops]
        if self.cfg.impls:
            rows = [r for r in rows if r.impl in self.cfg.impls]
        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            if r.status == "ok" and r.median_ms and r.tokens > 0 and r.tokens_per_s is None:
                r.tokens_per_s = r.tokens / (r.median_ms * 1e-3)
            groups.setdefault((r.op, r.dtype, r.tokens, r.shape), []).append(r)
        for grp in groups.values():
            self._speedups(grp)
        if prog:
            prog.advance(m.expected_rows, m.label, f"{len(rows)} rows")
        _free(m.device, True)
        return rows

    def _rates(self, row: Row, work: Work, dtype: torch.dtype) -> None:
        t = row.median_ms * 1e-3
        if t <= 0:
            return
        bw = self.bandwidth["gbps"] if self.bandwidth else None
        mm = self.matmul_ceiling.get(dtype_name(dtype), {}).get("gflops")
        if work.bytes:
            row.gbps = work.bytes / t / 1e9
        if work.weight_bytes:
            row.weight_gbps = work.weight_bytes / t / 1e9
        if work.kind == "matmul":
            row.gflops = work.flops / t / 1e9
            row.matmul_fraction = row.gflops / mm if mm else None
            if row.weight_gbps is not None and bw:
                row.bandwidth_fraction = row.weight_gbps / bw
            # judged by whichever resource bounds the row on this machine: reading the weights of
            # the experts hit (decode) or the math
            weights_s = work.weight_bytes / (bw * 1e9) if bw else 0.0
            math_s = work.flops / (mm * 1e9) if mm else 0.0
            if work.weight_bytes and weights_s > math_s:
                row.bound, row.ceiling, row.ceiling_fraction = "weights", "bandwidth", row.bandwidth_fraction
            else:
                row.bound, row.ceiling, row.ceiling_fraction = "compute", "matmul", row.matmul_fraction
        else:
            row.bound, row.ceiling = "memory", "bandwidth"
            if row.gbps is not None and bw:
                row.bandwidth_fraction = row.gbps / bw
                row.ceiling_fraction = row.bandwidth_fraction

    @staticmethod
    def _speedups(rows: list[Row]) -> None:
        ok = [r for r in rows if r.status == "ok" and r.median_ms]
        for r in ok:
            r.speedup = {b.impl: b.median_ms / r.median_ms for b in ok if b.role == "baseline" and b is not r}

    # everything -------------------------------------------------------------------------------
    def run(self, suite_names: list[str], argv: list[str] | None = None) -> BenchResult:
        from .meta import collect_meta

        cfg = self.cfg
        prev_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            cases, skipped = self.collect_cases(suite_names)
            total = sum(c.expected_rows if isinstance(c, Measured) else len(c.impls) for c in cases)
            self.progress = Progress(total + 1, enabled=cfg.progress)
            ceilings: dict = {}
            if cases:  # nothing to judge: do not spend time measuring the machine
                self.progress.show("measuring the machine's ceilings")
                ceilings = self.measure_ceilings()
            self.progress.advance(1, "ceilings", None)
            rows: list[Row] = []
            for case in cases:
                if isinstance(case, Measured):
                    rows.extend(self.run_measured(case, skipped))
                else:
                    rows.extend(self.run_case(case))
            if self._rated:  # measured again at the end: the best of both judges the rows
                self.progress.show("measuring the machine's ceilings again")
                ceilings = self.measure_ceilings()
                self.rejudge()
            if any(_above_ceiling(r.ceiling_fraction) for r, _, _ in self._rated):
                # a row faster than the machine allows: a ceiling measurement was disturbed (it
                # came out low); once more, then what is still above it is marked unreliable
                self.progress.show("a row is above its ceiling: measuring the ceilings once more")
                ceilings = self.measure_ceilings()
                self.rejudge()
            for r in rows:
                r.unreliable = unreliable_reason(r.ceiling_fraction, r.spread)
            self.progress.close()
            meta = collect_meta(cfg, suite_names, ceilings, argv)
        finally:
            torch.set_num_threads(prev_threads)
        return BenchResult(meta=meta, rows=rows, skipped=skipped)


# A row is flagged unreliable when its rate is above the machine's ceiling measured in the same run
# (beyond what the timing noise of both allows) or when its timing spread is this wide.
FRACTION_LIMIT = 1.05
SPREAD_LIMIT = 0.5  # +-50% around the median (half of p10..p90)


def _above_ceiling(fraction: float | None) -> bool:
    return fraction is not None and fraction > FRACTION_LIMIT


def unreliable_reason(ceiling_fraction: float | None, spread: float | None) -> str:
    """Why a row's numbers are not to be trusted ("" when they are): a rate above the machine's
    measured ceiling (the ceiling or the row was disturbed), or a timing spread beyond +-50%."""
    why = []
    if _above_ceiling(ceiling_fraction):
        why.append(f"{100 * ceiling_fraction:.0f}% of its ceiling, more than the machine allows")
    if spread is not None and spread > SPREAD_LIMIT:
        why.append(f"timing spread +-{100 * spread:.0f}%")
    return "; ".join(why)


def run(
    cfg: BenchConfig, suites: list[str] | tuple[str, ...] = DEFAULT_SUITES, argv: list[str] | None = None
) -> BenchResult:
    """Run ``suites`` under ``cfg`` and return the rows and metadata (what the CLI prints)."""
    return Runner(cfg).run(list(suites), argv)
