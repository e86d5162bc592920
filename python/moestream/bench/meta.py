"""Run metadata for the JSON results: machine, versions, commit, date, settings, ceilings."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: torch.device) -> str | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


def transformers_version() -> str | None:
    """The installed transformers' version, read from its metadata (importing it takes seconds)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout moestream runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return sha or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def collect_meta(cfg, suites: list[str], ceilings: dict, argv: list[str] | None = None) -> dict:
    import moestream

    from .core import dtype_name

    commit, dirty = git_commit()
    dev = cfg.device
    gpu = gpu_name(dev)
    return {
        "schema": "moestream-bench/1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": gpu if gpu else cpu_model(),
        "cpu_model": cpu_model(),
        "gpu_name": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers_version(),
        "moestream": getattr(moestream, "__version__", None),
        "moestream_with_cuda": bool(getattr(moestream, "with_cuda", False)),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "shape": cfg.shape.to_dict(),
        "suites": list(suites),
        "dtypes": [dtype_name(d) for d in cfg.dtypes],
        "tokens": list(cfg.tokens),
        "quick": cfg.quick,
        "timing": asdict(cfg.policy),
        "ceilings": ceilings,
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
