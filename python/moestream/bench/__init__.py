"""moestream's microbenchmark runner: ``python -m moestream.bench`` (or ``moestream-bench``).

Suites are registered by name (``register_suite``) from modules ``moestream/bench/suite_<name>.py``,
found automatically. Each suite returns :class:`Case` objects; the runner checks every
implementation against the float64 reference before timing it, times it with rotating random
inputs, and reports median, spread, rate, fraction of the machine's measured ceilings and the
speedup against every baseline measured in the same run. See ``core`` for the model and
``__main__`` for the command line.
"""

from __future__ import annotations

from .core import (
    DEFAULT_SUITES,
    KNOWN_SUITES,
    SUITES,
    BenchConfig,
    BenchResult,
    Case,
    Check,
    Impl,
    Measured,
    Row,
    SuiteSkip,
    Unavailable,
    Work,
    extra_impls,
    load_suites,
    register_impl,
    register_suite,
    run,
    unregister_impl,
)
from .shapes import DEFAULT_SHAPE, SHAPES, Shape, get_shape, register_shape
from .timing import Measurement, TimingPolicy, measure, measure_round_robin

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SUITES",
    "KNOWN_SUITES",
    "SHAPES",
    "SUITES",
    "BenchConfig",
    "BenchResult",
    "Case",
    "Check",
    "Impl",
    "Measured",
    "Measurement",
    "Row",
    "Shape",
    "SuiteSkip",
    "TimingPolicy",
    "Unavailable",
    "Work",
    "extra_impls",
    "get_shape",
    "load_suites",
    "main",
    "measure",
    "measure_round_robin",
    "register_impl",
    "register_shape",
    "register_suite",
    "run",
    "unregister_impl",
]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as _main

    return _main(argv)
