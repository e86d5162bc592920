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
    if not isinstance(meta, dict):
        raise ValueError(f"moestream: '{path}': the safetensors __metadata__ is not a JSON object")  # noqa: TRY004
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info = _tensor_entry(path, name, entry, base, size)
        out[name] = info
        ranges.append((info.offset - base, info.offset - base + info.nbytes, name))
    _check_ranges(path, ranges, size - base)
    return out, {str(k): v for k, v in meta.items()}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_entry(path: str, name: str, entry: object, base: int, size: int) -> TensorInfo:
    """One header entry, checked as the safetensors library checks it: a known dtype, a shape of
    non-negative JSON integers (64.5 is not a dimension), integer data offsets [begin, end) whose
    length is the tensor's byte size."""

    def bad(why: str) -> ValueError:
        return ValueError(f"moestream: '{path}': bad header entry for tensor '{name}' ({why}): {entry}")

    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    dtype = _ST_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"unsupported dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad("the shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and x >= 0 for x in offsets):
        raise bad("data_offsets must be two non-negative integers [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes or base + end > size:
        raise ValueError(
            f"moestream: '{path}': tensor '{name}' ({entry['dtype']} {list(shape)}, {nbytes} bytes) has data "
            f"offsets [{begin}, {end}) that do not fit the file ({size} bytes, data at {base})"
        )
    return TensorInfo(name, path, base + begin, nbytes, dtype, tuple(shape))


def _check_ranges(path: str, ranges: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' byte ranges must tile the data section exactly, as the safetensors library
    requires: sorted by offset, each starts where the previous ends (no gap, no overlap: two tensors
    on the same bytes, or a range shifted by a few bytes, are a corrupt header), the last ends at the
    end of the file."""
    pos, prev = 0, None
    for begin, end, name in sorted(ranges):
        if begin != pos:
            where = (
                f"{'overlaps' if begin < pos else 'leaves a gap after'} tensor '{prev}' (which ends at {pos})"
                if prev is not None
                else "does not start at the beginning of the data (offset 0)"
            )
            raise ValueError(
                f"moestream: '{path}': corrupt safetensors header: tensor '{name}' at data offsets "
                f"[{begin}, {end}) {where}; tensors must cover the data contiguously"
            )
        pos, prev = end, name
    if pos != data_bytes:
        raise ValueError(
            f"moestream: '{path}': corrupt safetensors header: the tensors cover {pos} bytes of data but the "
            f"file holds {data_bytes} after the header"
        )


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


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path`; a clear ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"moestream: {what} '{path}' is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"moestream: {what} '{path}' is not a JSON object")  # noqa: TRY004
    return obj


def _inside(checkpoint_dir: str, fname: object, index_path: str) -> str:
    """The path of the index entry `fname`, which must name a file inside the checkpoint directory
    (relative, no '..'): an index is data, and must not make us read other files."""
    if not isinstance(fname, str) or not fname:
        raise ValueError(f"moestream: the index '{index_path}' maps a tensor to {fname!r}, not a file name")
    norm = os.path.normpath(fname)
    if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise ValueError(
            f"moestream: the index '{index_path}' lists the file {fname!r}, which is outside the checkpoint "
            f"directory '{checkpoint_dir}'; refusing to read it"
        )
    return os.path.join(checkpoint_dir, norm)


# save_layered's files carry this in their metadata; without its index such a directory is an
# interrupted save, possibly over an older one (checkpoint.LAYERED_FORMAT)
_LAYERED = "moestream-layered"


def checkpoint_tensors(checkpoint_dir: str) -> tuple[dict[str, TensorInfo], dict]:
    """All tensors of a safetensors checkpoint directory (sharded with an index, or model.safetensors,
    or every *.safetensors file): ({name: TensorInfo}, index metadata). Without an index, a tensor
    name in two files is an error (which one is meant is unknown)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        if os.path.exists(checkpoint_dir):
            raise NotADirectoryError(
                f"moestream: the checkpoint '{checkpoint_dir}' is a file; pass the directory that holds the "
                "safetensors files (and config.json)"
            )
        raise FileNotFoundError(f"moestream: checkpoint directory '{checkpoint_dir}' does not exist")
    index_path = os.path.join(checkpoint_dir, INDEX_NAME)
    meta: dict = {}
    weight_map: dict[str, str] = {}
    if os.path.exists(index_path):
        index = read_json(index_path, "the checkpoint index")
        meta = index.get("metadata", {}) or {}
        if not isinstance(meta, dict):
            raise ValueError(
                f"moestream: the \"metadata\" of the checkpoint index '{index_path}' is not a JSON object"
            )
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(
                f"moestream: the checkpoint index '{index_path}' has no \"weight_map\" object "
                "(tensor name -> file)"
            )
        files = sorted(
            {os.path.normpath(v) for v in weight_map.values() if _inside(checkpoint_dir, v, index_path)}
        )
        weight_map = {k: os.path.normpath(v) for k, v in weight_map.items()}
    elif os.path.exists(os.path.join(checkpoint_dir, SINGLE_NAME)):
        files = [SINGLE_NAME]
    else:
        files = sorted(
            f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors") and not f.startswith(".")
        )
        if not files:
            raise FileNotFoundError(f"moestream: no safetensors files in '{checkpoint_dir}'")
    out: dict[str, TensorInfo] = {}
    for fname in files:
        path = os.path.join(checkpoint_dir, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"moestream: '{path}' is listed in the index of '{checkpoint_dir}' but missing"
            )
        infos, file_meta = read_header(path)
        if not weight_map and file_meta.get("layout") == _LAYERED:
            raise ValueError(
                f"moestream: '{checkpoint_dir}' holds files of a layered checkpoint ('{fname}') but no "
                f"{INDEX_NAME}: an interrupted ms.save_layered (it writes the index last); save again"
            )
        for name, info in infos.items():
            if weight_map and weight_map.get(name) not in (None, fname):
                continue
            if name in out:
                raise ValueError(
                    f"moestream: tensor '{name}' is in two files of '{checkpoint_dir}': "
                    f"'{os.path.basename(out[name].path)}' and '{fname}' (no index says which one to use)"
                )
            out[name] = info
    missing = [n for n in weight_map if n not in out]
    if missing:
        raise ValueError(
            f"moestream: the index of '{checkpoint_dir}' lists {len(missing)} tensors not found in their files, "
            "e.g. " + ", ".join(f"'{n}' (in '{weight_map[n]}')" for n in missing[:3])
        )
    return out, meta
