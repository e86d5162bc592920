"""The options of a streamed model, shared by ``offload``, ``load_offloaded`` and ``load_layered``:
one dataclass, validated once (``resolve``) into the values the planner and the engine use."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

ByteSize = int | float | str | None

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_PAGE = 4096


def parse_bytes(value: ByteSize, what: str = "max_device_memory") -> int | None:
    """``4_000_000_000``, ``"4GiB"``, ``"300MB"``, ``"1.5 GB"`` -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"moestream: {what} must be a number of bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"moestream: {what} must be a finite number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"moestream: {what} must look like '4GiB', '300MB' or '1.5 GB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"moestream: {what} must be a number of bytes or a string like '4GiB', got {value!r}")
    if n <= 0:
        raise ValueError(f"moestream: {what} must be positive, got {value!r}")
    return n


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def default_device() -> torch.device:
    from .. import with_cuda

    if with_cuda and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def normalize_device(device) -> torch.device:
    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda":
        from .. import with_cuda

        if not with_cuda:
            raise RuntimeError(
                "moestream.offload: device 'cuda' needs moestream built with CUDA; this build has none"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("moestream.offload: device 'cuda' requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"moestream.offload: device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


@dataclass(frozen=True)
class OffloadOptions:
    """What the caller asks for (see ``ms.offload`` for the meaning of each field)."""

    device: str | torch.device | None = None
    max_device_memory: ByteSize = None
    storage: str = "cpu"
    offload_dir: str | None = None
    prefetch: int = 2
    blocks: str | Iterable[nn.Module] | None = None
    num_readers: int = 4
    chunk_bytes: int | None = None
    pin: bool | None = None
    direct_io: bool | None = None
    progress: bool = False
    experts: str | None = None
    cache_policy: str = "lru"
    expert_prefetch: bool = True
    expert_slots: int | None = None
    cpu_experts: bool = False
    compress: object = None  # None | "int8" | "int4" | moestream.quant.QuantScheme

    def replace(self, where: str = "offload", **changes) -> OffloadOptions:
        """A copy with `changes`; an unknown name is a TypeError naming `where` it was passed to."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"moestream.{where}: unknown argument(s) {unknown}; known options: {sorted(known)}"
            )
        return replace(self, **changes)

    def resolve(self) -> Resolved:
        """Validates every field and fills in the defaults that depend on the device and storage."""
        if self.storage not in ("cpu", "disk"):
            raise ValueError(f"moestream.offload: storage must be 'cpu' or 'disk', got {self.storage!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"moestream.offload: prefetch must be an int >= 0, got {self.prefetch!r}")
        if (
            isinstance(self.num_readers, bool)
            or not isinstance(self.num_readers, int)
            or not 1 <= self.num_readers <= 256
        ):
            raise ValueError(
                f"moestream.offload: num_readers must be an int in [1, 256], got {self.num_readers!r}"
            )
        if self.experts not in (None, "cache", "layer"):
            raise ValueError(f"moestream.offload: experts must be 'cache' or 'layer', got {self.experts!r}")
        if self.cache_policy not in ("lru", "lfu"):
            raise ValueError(
                f"moestream.offload: cache_policy must be 'lru' or 'lfu', got {self.cache_policy!r}"
            )
        if self.expert_slots is not None and (
            isinstance(self.expert_slots, bool)
            or not isinstance(self.expert_slots, int)
            or self.expert_slots < 1
        ):
            raise ValueError(
                f"moestream.offload: expert_slots must be None or an int >= 1, got {self.expert_slots!r}"
            )
        from ..quant import QuantScheme

        compress = QuantScheme.parse(self.compress)  # an unknown scheme raises here, before any work
        device = normalize_device(self.device)
        if self.cpu_experts and device.type != "cuda":
            raise ValueError(
                "moestream.offload: cpu_experts=True runs missing experts on the CPU instead of moving them "
                f"to a CUDA device; the device here is {device.type!r}, where the experts run on the CPU anyway"
            )
        if self.cpu_experts:
            raise NotImplementedError(
                "moestream.offload: cpu_experts=True is not available yet: on CUDA every missing expert is "
                "moved to the device's expert cache"
            )
        budget = parse_bytes(self.max_device_memory)
        # O_DIRECT for disk storage: measured cold reads 2-7 GB/s direct vs 0.5-1.8 GB/s through the
        # page cache on the CI VM (the cache also thrashes when the model is larger than RAM).
        direct_io = self.storage == "disk" if self.direct_io is None else bool(self.direct_io)
        chunk = self.chunk_bytes
        if chunk is None:
            # CUDA: large transfers amortise the per-copy cost; CPU: smaller reads kept more readers busy
            # (4 MiB read cold at 2-7 GB/s with 4 threads vs 2.3-2.7 GB/s in 16 MiB pieces on the CI VM).
            chunk = (16 << 20) if device.type == "cuda" else (4 << 20)
        elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"moestream.offload: chunk_bytes must be a positive int, got {chunk!r}")
        chunk = max(_PAGE, round_up(int(chunk), _PAGE))
        from .. import _C

        if self.pin is False:
            pin = _C.PinMode.none
        elif device.type == "cuda":
            pin = _C.PinMode.cuda  # pinned by default: asynchronous copies need page-locked memory
        else:
            pin = _C.PinMode.mlock if self.pin else _C.PinMode.none
        return Resolved(
            device=device,
            budget=budget,
            storage=self.storage,
            offload_dir=None if self.offload_dir is None else str(self.offload_dir),
            prefetch=self.prefetch,
            blocks=self.blocks,
            num_readers=self.num_readers,
            chunk_bytes=chunk,
            pin=pin,
            direct_io=direct_io,
            progress=bool(self.progress),
            experts=self.experts,
            eviction=_C.Eviction.lfu if self.cache_policy == "lfu" else _C.Eviction.lru,
            expert_prefetch=bool(self.expert_prefetch),
            expert_slots=self.expert_slots,
            cpu_experts=bool(self.cpu_experts),
            compress=compress,
        )


@dataclass(frozen=True)
class Resolved:
    """Validated options: the device is a torch.device, the budget bytes (or None), pin a PinMode."""

    device: torch.device
    budget: int | None
    storage: str
    offload_dir: str | None
    prefetch: int
    blocks: str | Iterable[nn.Module] | None
    num_readers: int
    chunk_bytes: int
    pin: object  # moestream._C.PinMode
    direct_io: bool
    progress: bool
    experts: str | None = None  # None: "cache" when the blocks hold experts the cache can run
    eviction: object = None  # moestream._C.Eviction
    expert_prefetch: bool = True
    expert_slots: int | None = None
    cpu_experts: bool = False
    compress: object = None  # moestream.quant.QuantScheme or None

    @property
    def engine_device(self) -> str:
        return "cpu" if self.device.type == "cpu" else f"cuda:{self.device.index}"
