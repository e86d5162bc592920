"""safetensors files read in place and written tensor by tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data;
offsets are relative to the end of the header. The streamer reads byte ranges of these files with
pread, so only the header is parsed here; nothing is memory-mapped (mapped pages would count in the
process's resident memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

# Header limit of the reference implementation (100 MB): anything larger is a corrupt file.
_MAX_HEADER = 100_000_000
# The data section starts on this boundary in files we write (the header is padded with spaces,
# which JSON allows): with tensor sizes that are multiples of it, every tensor is aligned for O_DIRECT.
DATA_ALIGN = 4096


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``path`` at absolute byte ``offset``, ``nbytes`` long."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"moestream: dtype {dtype} cannot be stored in safetensors") from None


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and checks the header of a safetensors file: returns ({name: TensorInfo}, metadata)."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        head = os.pread(f.fileno(), 8, 0)
        if len(head) < 8:
            raise ValueError(
                f"moestream: '{path}' is not a safetensors file ({size} bytes, no header length)"
            )
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(
                f"moestream: '{path}' is not a valid safetensors file (header length {n}, file size {size})"
            )
        raw = os.pread(f.fileno(), n, 8)
    if len(raw) != n:
        raise ValueError(f"moestream: '{path}': short read of the header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"moestream: '{path}': the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"moestream: '{path}': the safetensors header is not a JSON object")  # noqa: TRY004
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"moestream: '{path}': bad or unsupported header entry for tensor '{name}': {entry}"
            ) from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or begin < 0 or end - begin != nbytes or base + end > size:
            raise ValueError(
                f"moestream: '{path}': tensor '{name}' ({entry['dtype']} {list(shape)}, {nbytes} bytes) has data "
                f"offsets [{begin}, {end}) that do not fit the file ({size} bytes, data at {base})"
            )
        out[name] = TensorInfo(name, path, base + begin, nbytes, dtype, shape)
    return out, {str(k): v for k, v in meta.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name next to `path` to write; on success the file is fsynced and renamed to
    `path`, on failure removed, so `path` is never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_safetensors(
    path: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Writes ``tensors`` (name, tensor) to ``path`` atomically, one tensor at a time: to a temporary
    name, fsync, rename. Only one tensor's bytes are held (and only when it must leave the device)."""
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, t in items:
        if t.device.type == "meta":
            raise ValueError(f"moestream: tensor '{name}' has no data (it is on the meta device)")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": st_dtype(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    pad = (-(8 + len(raw))) % DATA_ALIGN
    raw += b" " * pad
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in items:
            mv = _tensor_bytes(t)
            f.write(mv)
            if on_tensor is not None:
                on_tensor(len(mv))


def write_json_atomic(path: str, obj: object) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    fsync_dir(os.path.dirname(os.path.abspath(path)))


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_tensors(checkpoint_dir: str) -> tuple[dict[str, TensorInfo], dict]:
    """All tensors of a safetensors checkpoint directory (sharded with an index, or model.safetensors,
    or every *.safetensors file): ({name: TensorInfo}, index metadata)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"moestream: checkpoint directory '{checkpoint_dir}' does not exist")
    index_path = os.path.join(checkpoint_dir, INDEX_NAME)
    meta: dict = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        meta = index.get("metadata", {}) or {}
        weight_map: dict[str, str] = index["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(checkpoint_dir, SINGLE_NAME)):
        weight_map = {}
        files = [SINGLE_NAME]
    else:
        files = sorted(
            f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors") and not f.startswith(".")
        )
        weight_map = {}
        if not files:
            raise FileNotFoundError(f"moestream: no safetensors files in '{checkpoint_dir}'")
    out: dict[str, TensorInfo] = {}
    for fname in files:
        path = os.path.join(checkpoint_dir, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"moestream: '{path}' is listed in the index of '{checkpoint_dir}' but missing"
            )
        infos, _ = read_header(path)
        for name, info in infos.items():
            if weight_map and weight_map.get(name) not in (None, fname):
                continue
            out[name] = info
    missing = [n for n in weight_map if n not in out]
    if missing:
        raise ValueError(
            f"moestream: the index of '{checkpoint_dir}' lists {len(missing)} tensors not found in their files, "
            "e.g. " + ", ".join(f"'{n}' (in '{weight_map[n]}')" for n in missing[:3])
        )
    return out, meta
