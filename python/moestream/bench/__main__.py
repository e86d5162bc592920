"""Command line: ``python -m moestream.bench`` / ``moestream-bench``.

With no arguments: the default suites (ops and moe) on the default shape for the best device
present (CUDA if available, else CPU), printing a table of moestream's ops against the baselines.

Exit status: 0; 1 when one of moestream's own implementations gave a WRONG result or an error
(baselines that fail are reported but do not change the status); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..cli import quiet_broken_pipe
from . import plots, report
from .core import (
    DEFAULT_SUITES,
    KNOWN_SUITES,
    SUITES,
    BenchConfig,
    load_suites,
    run,
    suite_unavailable_reason,
)
from .shapes import SHAPES, get_shape

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEFAULT_SHAPE = {"cpu": "qwen3-moe-small", "cuda": "qwen3-30b-a3b"}
# --quick on a CPU: the small layer at half the width; its backward baselines (a Python loop over
# experts whose weight gradients are written in full once per expert) take 1 s a call instead of
# 6..10 s, so that one suite's quick look stays under a minute on two cores
QUICK_SHAPE = {"cpu": "qwen3-moe-mini", "cuda": "qwen3-30b-a3b"}
DEFAULT_TOKENS = {"cpu": [16, 1024], "cuda": [128, 4096, 16384]}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moestream.bench",
        description="Microbenchmarks of moestream's ops against the baselines measured in the same run.",
        epilog="shapes: " + ", ".join(SHAPES) + ". Suites others add appear automatically "
        "(modules moestream/bench/suite_<name>.py).",
    )
    p.add_argument(
        "--suite",
        default=",".join(DEFAULT_SUITES),
        help=f"comma list of {', '.join(KNOWN_SUITES)} or 'all' (default: %(default)s)",
    )
    p.add_argument(
        "--shape",
        help="a built-in shape (default: qwen3-moe-small on CPU, qwen3-moe-mini with --quick; "
        "qwen3-30b-a3b on CUDA)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", help="comma list of float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument(
        "--tokens", help="comma list of token counts (default: 16,1024 on CPU; 128,4096,16384 on CUDA)"
    )
    p.add_argument("--op", help="only these ops (comma list, e.g. grouped_mm,experts_fwd)")
    p.add_argument("--impl", help="only these implementations (comma list, e.g. moestream,reference)")
    p.add_argument("--quick", action="store_true", help="short warm-up and a small time budget per row")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--sets", type=int, help="input sets rotated through while timing (default 4; fewer when large)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the results with metadata as JSON")
    p.add_argument(
        "--plot", metavar="PATH", help="plot time and fraction of ceiling vs tokens (needs matplotlib)"
    )
    p.add_argument("--load", metavar="PATH", help="print (and --plot) a saved JSON result instead of running")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare two saved results row by row (old A, new B)",
    )
    p.add_argument("--list", action="store_true", help="list suites and shapes, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _list() -> str:
    load_suites()
    lines = ["suites:"]
    for name in sorted(set(KNOWN_SUITES) | set(SUITES)):
        info = SUITES.get(name)
        state = info.help if info else suite_unavailable_reason(name)
        lines.append(f"  {name:8s} {state}")
    lines.append("shapes:")
    for s in SHAPES.values():
        lines.append(f"  {s.describe()}")
    return "\n".join(lines)


def _resolve_suites(spec: str, parser: argparse.ArgumentParser) -> list[str]:
    load_suites()
    names: list[str] = []
    for n in _csv(spec):
        if n == "all":
            names += sorted(set(KNOWN_SUITES) | set(SUITES))
        elif n in KNOWN_SUITES or n in SUITES:
            names.append(n)
        else:
            parser.error(
                f"unknown suite {n!r}; choose from {', '.join(sorted(set(KNOWN_SUITES) | set(SUITES)))}, all"
            )
    return list(dict.fromkeys(names))


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to this torch")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device}: only cpu and cuda are supported")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.type
    try:
        shape = get_shape(args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)[kind])
    except ValueError as e:
        parser.error(str(e))
    dtypes = []
    for d in _csv(args.dtype or DEFAULT_DTYPE[kind]):
        if d not in _DTYPES:
            parser.error(f"--dtype {d!r}: choose float32, bfloat16 or float16")
        dtypes.append(_DTYPES[d])
    dtypes = list(dict.fromkeys(dtypes))
    if args.tokens:
        try:
            tokens = [int(t) for t in _csv(args.tokens)]
        except ValueError:
            parser.error(f"--tokens {args.tokens!r}: a comma list of integers")
        if any(t < 1 for t in tokens):
            parser.error("--tokens: token counts must be at least 1")
    else:
        tokens = DEFAULT_TOKENS[kind]
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    cfg = BenchConfig(
        shape=shape,
        device=device,
        dtypes=dtypes,
        tokens=tokens,
        quick=args.quick,
        threads=args.threads,
        ops=_csv(args.op) if args.op else None,
        impls=_csv(args.impl) if args.impl else None,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.sets is not None:
        cfg.sets = max(1, args.sets)
    return cfg


def _plot(data: dict, path: str) -> None:
    for p in plots.plot(data, path):  # one picture per suite
        print(f"plot written to {p}")


@quiet_broken_pipe  # `moestream-bench --list | head` ends quietly
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    if args.list:
        print(_list())
        return 0
    if args.compare:
        a, b = (report.load_json(p) for p in args.compare)
        print(report.format_compare(a, b, args.compare[0], args.compare[1]))
        return 0
    if args.plot:
        try:
            plots.require_matplotlib()
        except plots.PlotUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.load:
        data = report.load_json(args.load)
        print(report.format_table(data))
        if args.plot:
            _plot(data, args.plot)
        return 0

    cfg = make_config(args, parser)
    suites = _resolve_suites(args.suite, parser)
    result = run(cfg, suites, argv)
    data = result.to_dict()
    print(report.format_table(data))
    if args.json:
        report.write_json(data, args.json)
        print(f"results written to {args.json}")
    if args.plot:
        _plot(data, args.plot)
    bad = [r for r in result.rows if r.role != "baseline" and r.status in ("WRONG", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
