"""Streaming from checkpoints on disk: ``load_offloaded`` (any safetensors checkpoint, read in place),
and the layered format: ``save_layered`` / ``load_layered``.

Layered format (a directory)::

    model-rest.safetensors           everything outside the repeated blocks (embeddings, norms, head)
    model-layer-00000.safetensors    block 0's tensors, contiguous, data 4 KiB aligned
    ...
    model.safetensors.index.json     written last: {"metadata": {"format": "moestream-layered", ...},
                                     "weight_map": {name: file}} (the transformers sharded index)
    config.json                      when the model has a transformers config

so it also loads with ``transformers.AutoModel*.from_pretrained``. Every file is written to a
temporary name, fsynced and renamed; an existing index is removed before anything is written, so an
interrupted save leaves no index, and load_layered refuses a directory without one.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import safetensors_io as sio
from .api import install
from .materialize import progress_bar
from .model_view import Piece, Source, collect_entries, find_blocks
from .options import ByteSize, OffloadOptions

LAYERED_FORMAT = "moestream-layered"
QUANT_KEY = "moestream.quant"  # safetensors __metadata__ key of the compressed tensors (moestream.quant)
_LAYER_FILE = "model-layer-{:05d}.safetensors"
_REST_FILE = "model-rest.safetensors"
_OURS = re.compile(r"^(model-layer-\d{5}|model-rest)\.safetensors$")
_OUR_TMP = re.compile(
    r"^\.(model-layer-\d{5}|model-rest)\.safetensors\.tmp-\d+$|^\.(config|generation_config)\.json\.tmp-\d+$"
)


def _infer_block_prefix(names: Iterable[str], sizes: Mapping[str, int]) -> str | None:
    """The name prefix P of the repeated blocks ("P.<i>.<rest>") holding the most bytes."""
    total: dict[str, int] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", "." + n)
        if m is None or m.start() == 0:
            continue
        p = n[: m.start() - 1]
        total[p] = total.get(p, 0) + sizes.get(n, 0)
    return max(total, key=total.get) if total else None


def _atomic_config(obj, path: str) -> None:
    with sio.atomic_path(path) as tmp:
        obj.to_json_file(tmp)


def save_layered(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    blocks: str | None = None,
    progress: bool = True,
    compress=None,
) -> str:
    """Writes a model (or a state dict) as per-block safetensors shards plus an index, tensor by
    tensor (only one tensor is ever copied, and only when it is not on the CPU). Tensors shared by
    several names (tied weights) are written once; the other names are recorded as aliases.
    blocks: name prefix of the repeated blocks (e.g. "model.layers"); found automatically.
    compress: None, "int8", "int4" or a ``moestream.quant.QuantScheme``: the blocks' linears and
    experts are written in the packed format (``NAME.qweight``, ``NAME.scale`` [, ``NAME.zero``]),
    described by ``__metadata__["moestream.quant"]`` in each shard and ``"quant"`` in the index; the
    model itself is not changed (the packed tensors are computed up front: about 0.3x / 0.55x of the
    bf16 model in RAM for int4 / int8). A model quantized with ``moestream.quant.quantize_model`` is
    written compressed whatever ``compress`` says. load_layered / load_offloaded read it directly.
    Returns out_dir."""
    from ..quant import QuantScheme, metadata_of, quantized_state_dict

    scheme = QuantScheme.parse(compress)
    out_dir = os.fspath(out_dir)
    config = gen_config = None
    quant_meta: dict[str, dict] = {}
    if isinstance(model_or_state, nn.Module):
        model = model_or_state
        if getattr(model, "_moestream_offload", None) is not None:
            raise ValueError(
                "moestream.save_layered: this model is offloaded (its streamed weights are not in memory); "
                "save the model before offloading it, or stream its checkpoint with ms.load_offloaded"
            )
        if blocks is None:
            try:
                blocks = find_blocks(model)[0]
            except ValueError:
                blocks = None
        if scheme is not None:
            state, quant_meta = quantized_state_dict(model, scheme, blocks)
        else:
            state = model.state_dict(keep_vars=True)  # references, no copies
            quant_meta = metadata_of(model)
        config = getattr(model, "config", None)
        gen_config = getattr(model, "generation_config", None)
    elif isinstance(model_or_state, Mapping):
        if scheme is not None:
            raise ValueError(
                "moestream.save_layered: compress needs the model (its modules say what to compress)"
            )
        state = dict(model_or_state)
    else:
        raise TypeError(
            f"moestream.save_layered: expected an nn.Module or a dict of tensors, got {type(model_or_state)}"
        )
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moestream.save_layered: '{name}' is not a tensor ({type(t)})")
        if t.device.type == "meta":
            raise ValueError(f"moestream.save_layered: '{name}' has no data (meta tensor)")
    sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
    if blocks is None:
        blocks = _infer_block_prefix(state.keys(), sizes)

    # tied tensors: the first name is stored, the others point to it
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (
            (id(t),)
            if t.numel() == 0
            else (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        )
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t

    files: dict[str, list[tuple[str, torch.Tensor]]] = {}
    num_blocks = 0
    pre = f"{blocks}." if blocks else None
    for name, t in unique.items():
        fname = _REST_FILE
        if pre and name.startswith(pre):
            idx = name[len(pre) :].split(".", 1)[0]
            if idx.isdigit():
                fname = _LAYER_FILE.format(int(idx))
                num_blocks = max(num_blocks, int(idx) + 1)
        files.setdefault(fname, []).append((name, t))

    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, sio.INDEX_NAME)
    if os.path.exists(index_path):
        os.unlink(index_path)  # from here until the new index lands, the directory is incomplete
        sio.fsync_dir(out_dir)
    for f in os.listdir(out_dir):
        if _OUR_TMP.match(f):
            os.unlink(os.path.join(out_dir, f))
    if config is not None and hasattr(config, "to_json_file"):
        _atomic_config(config, os.path.join(out_dir, "config.json"))
    if gen_config is not None and hasattr(gen_config, "to_json_file"):
        try:
            _atomic_config(gen_config, os.path.join(out_dir, "generation_config.json"))
        except Exception as e:  # noqa: BLE001 - an invalid generation config is not worth failing the save
            warnings.warn(f"moestream.save_layered: generation_config.json not written ({e})", stacklevel=2)

    total = sum(sizes[n] for n in unique)
    bar = progress_bar(total, "moestream: save_layered", progress)
    order = sorted(files, key=lambda f: (f != _REST_FILE, f))
    try:
        for fname in order:
            metadata = {"format": "pt", "layout": LAYERED_FORMAT}
            names = {n for n, _ in files[fname]}
            here = {n: e for n, e in quant_meta.items() if f"{n}.qweight" in names}
            if here:
                metadata[QUANT_KEY] = json.dumps(here, separators=(",", ":"))
            sio.write_safetensors(
                os.path.join(out_dir, fname),
                files[fname],
                metadata=metadata,
                on_tensor=bar.update if bar is not None else None,
            )
    finally:
        if bar is not None:
            bar.close()
    sio.fsync_dir(out_dir)
    weight_map = {name: fname for fname in order for name, _ in files[fname]}
    index = {
        "metadata": {
            "total_size": total,
            "format": LAYERED_FORMAT,
            "version": 1,
            "blocks": blocks,
            "num_blocks": num_blocks,
            "aliases": aliases,
            **({"quant": quant_meta} if quant_meta else {}),
        },
        "weight_map": weight_map,
    }
    sio.write_json_atomic(index_path, index)
    for f in os.listdir(out_dir):  # shards of an earlier, larger save in the same directory
        if _OURS.match(f) and f not in files:
            os.unlink(os.path.join(out_dir, f))
    return out_dir


def _resolve(model: nn.Module, ckpt: dict[str, sio.TensorInfo], names: set[str], aliases: dict[str, str]):
    placements: dict[str, Source] = {}
    used: set[str] = set()
    for name in names:
        key = name if name in ckpt else aliases.get(name)
        info = ckpt.get(key) if key is not None else None
        if info is not None:
            placements[name] = Source(
                info.dtype, info.shape, pieces=[Piece(info.path, info.offset, info.nbytes, 0)]
            )
            used.add(info.name)
    rest = {k: v for k, v in ckpt.items() if k not in used}
    if rest and any(n not in placements for n in names):
        from ..integrations.hf_checkpoint import resolve_conversions

        for n, src in resolve_conversions(model, rest, [n for n in names if n not in placements]).items():
            placements.setdefault(n, src)
    return placements


def _check_dtypes(entries, sources: dict[int, Source], checkpoint_dir: str) -> None:
    """Parameters take the checkpoint's dtypes (a bfloat16 checkpoint makes a float32 skeleton
    bfloat16), but a tensor whose checkpoint dtype is neither the model's for it nor the one the
    rest of the model converts to would fail only at the forward (mixed dtypes in one matmul):
    name it now. Tensors the model keeps in a dtype of their own (a float32 router bias in a
    bfloat16 model) may keep it or convert."""
    floats = [
        (e, sources[id(e.obj)]) for e in entries if id(e.obj) in sources and e.obj.dtype.is_floating_point
    ]

    def main(pairs) -> torch.dtype | None:
        total: dict[torch.dtype, int] = {}
        for dtype, nbytes in pairs:
            total[dtype] = total.get(dtype, 0) + nbytes
        return max(total, key=total.get) if total else None

    model_main = main((e.obj.dtype, s.nbytes) for e, s in floats)
    ckpt_main = main((s.dtype, s.nbytes) for e, s in floats)
    for e in entries:
        src = sources.get(id(e.obj))
        m = e.obj.dtype
        if src is None or src.dtype == m:
            continue
        if (
            m.is_floating_point
            and src.dtype.is_floating_point
            and (m != model_main or src.dtype == ckpt_main)
        ):
            continue
        raise ValueError(
            f"moestream.load_offloaded: '{e.names[0]}' is {src.dtype} in the checkpoint '{checkpoint_dir}' but "
            f"{m} in the model"
            + (
                f" (the rest of the checkpoint is {ckpt_main}: a tensor of another dtype would fail at the forward)"
                if m.is_floating_point and src.dtype.is_floating_point
                else ""
            )
        )


def _quant_metadata(ckpt: dict[str, sio.TensorInfo], meta: dict) -> dict[str, dict]:
    """The moestream.quant metadata of a checkpoint: the index's "quant", else every shard's
    __metadata__["moestream.quant"] merged."""
    q = meta.get("quant")
    if isinstance(q, str):
        q = json.loads(q)
    if q:
        return dict(q)
    out: dict[str, dict] = {}
    for path in sorted({i.path for i in ckpt.values()}):
        raw = sio.read_header(path)[1].get(QUANT_KEY)
        if raw:
            try:
                out.update(json.loads(raw))
            except json.JSONDecodeError as e:
                raise ValueError(f"moestream: '{path}': bad {QUANT_KEY} metadata ({e})") from None
    return out


def _read_source(src: Source) -> torch.Tensor:
    """The values of a checkpoint tensor (its file byte ranges) as a CPU tensor."""
    buf = bytearray(src.nbytes)
    for p in src.pieces or []:
        with open(p.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), p.nbytes, p.offset)
        if len(data) != p.nbytes:
            raise OSError(
                f"moestream: short read of '{p.path}' at {p.offset} ({len(data)} of {p.nbytes} bytes)"
            )
        buf[p.dst : p.dst + p.nbytes] = data
    if src.nbytes == 0:
        return torch.empty(src.shape, dtype=src.dtype)
    return torch.frombuffer(buf, dtype=src.dtype).reshape(src.shape)


def _quantize_on_load(model: nn.Module, ckpt, aliases, scheme, blocks) -> set[str]:
    """An uncompressed checkpoint loaded with compress=...: each weight that quantize_model would
    compress is read from the files, one at a time, and replaced by its packed tensors in host
    memory (they are then streamed from there, or from offload files with storage="disk").
    Returns the checkpoint byte ranges consumed ("path@offset")."""
    from types import SimpleNamespace

    from ..quant import _quantized_module, _set_module, _targets

    targets = _targets(model, blocks)
    wanted = {
        f"{full}.{n}"
        for full, _, spec in targets
        for n in (("weight",) if spec is None else ("gate_up_proj", "down_proj"))
    }
    placements = _resolve(model, ckpt, wanted, aliases)
    used: set[str] = set()

    def read(name: str) -> torch.Tensor:
        src = placements.get(name)
        if src is None:
            raise ValueError(
                f"moestream.load_offloaded: '{name}' (to be compressed) is not in the checkpoint"
            )
        used.update(f"{p.path}@{p.offset}" for p in src.pieces or [])
        return _read_source(src)

    with torch.no_grad():
        for full, m, spec in targets:
            if spec is None:
                view = SimpleNamespace(weight=read(f"{full}.weight"), bias=m.bias)
            else:
                view = SimpleNamespace(
                    gate_up_proj=read(f"{full}.gate_up_proj"), down_proj=read(f"{full}.down_proj")
                )
            _set_module(model, full, _quantized_module(full, view, spec, scheme))
    return used


def load_offloaded(
    checkpoint_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    max_device_memory: ByteSize = None,
    storage: str = "disk",
    prefetch: int = 2,
    *,
    model: nn.Module | None = None,
    model_cls=None,
    trust_remote_code: bool = False,
    options: OffloadOptions | None = None,
    **kwargs,
) -> nn.Module:
    """Builds the model with its parameters on the meta device (from config.json with transformers,
    or `model`, any module skeleton) and streams its blocks from the safetensors checkpoint in place
    (model.safetensors, or shards with model.safetensors.index.json): the full model is never in RAM.
    storage="disk" reads the files at every forward; storage="cpu" reads them once into host memory.
    The other options (blocks, num_readers, chunk_bytes, pin, direct_io, progress, compress) are
    those of ``ms.offload``, as keywords or as one ``OffloadOptions``. Parameters take the
    checkpoint's dtypes. A compressed checkpoint (``save_layered(..., compress=...)``) is streamed
    compressed as it is; compress=... on an uncompressed one quantizes its blocks' weights while
    loading (read once from the files, the packed tensors kept in host memory or offload files)."""
    opts = (options or OffloadOptions()).replace(
        "load_offloaded",
        device=device,
        max_device_memory=max_device_memory,
        storage=storage,
        prefetch=prefetch,
        **kwargs,
    )
    opts.resolve()  # bad options fail before the model is built
    checkpoint_dir = os.fspath(checkpoint_dir)
    ckpt, meta = sio.checkpoint_tensors(checkpoint_dir)
    if model is None:
        from ..integrations.hf_checkpoint import empty_model

        model = empty_model(checkpoint_dir, model_cls, trust_remote_code)
    aliases = meta.get("aliases", {}) if meta.get("format") == LAYERED_FORMAT else {}
    if isinstance(aliases, str):
        try:
            aliases = json.loads(aliases)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"moestream.load_offloaded: the \"aliases\" of '{os.path.join(checkpoint_dir, sio.INDEX_NAME)}' "
                f"are not valid JSON ({e})"
            ) from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(
            f"moestream.load_offloaded: the \"aliases\" of '{os.path.join(checkpoint_dir, sio.INDEX_NAME)}' "
            "must map tensor names to tensor names"
        )
    if opts.blocks is None and meta.get("format") == LAYERED_FORMAT and meta.get("blocks"):
        try:
            model.get_submodule(meta["blocks"])
            opts = opts.replace(blocks=meta["blocks"])
        except AttributeError:
            pass
    from ..quant import QuantScheme, apply_metadata, check_metadata

    used: set[str] = set()
    quant_meta = _quant_metadata(ckpt, meta)
    if quant_meta:
        check_metadata(quant_meta, {n: (i.dtype, i.shape) for n, i in ckpt.items()}, checkpoint_dir)
        want = QuantScheme.parse(opts.compress)
        have = {
            QuantScheme(e["scheme"], int(e["group_size"]), bool(e["symmetric"])) for e in quant_meta.values()
        }
        if want is not None and have != {want}:
            raise ValueError(
                f"moestream.load_offloaded: compress={opts.compress!r} but '{checkpoint_dir}' is compressed with "
                f"{sorted(str(h) for h in have)}; pass compress=None to stream it as it is"
            )
        apply_metadata(model, quant_meta)
    elif opts.compress is not None:
        used |= _quantize_on_load(model, ckpt, aliases, QuantScheme.parse(opts.compress), opts.blocks)
    entries, by_name = collect_entries(model)
    placements = _resolve(model, ckpt, set(by_name), aliases)
    sources: dict[int, Source] = {}
    missing: list[str] = []
    for e in entries:
        src = next((placements[n] for n in e.names if n in placements), None)
        if src is None:
            if e.obj.device.type == "meta":
                missing.append(e.names[0])
            continue
        if tuple(src.shape) != tuple(e.obj.shape):
            raise ValueError(
                f"moestream.load_offloaded: '{e.names[0]}' is {list(e.obj.shape)} in the model but "
                f"{list(src.shape)} in the checkpoint '{checkpoint_dir}'"
            )
        sources[id(e.obj)] = src
        used.update(p.path + f"@{p.offset}" for p in src.pieces)
    _check_dtypes(entries, sources, checkpoint_dir)
    if missing:
        raise ValueError(
            f"moestream.load_offloaded: {len(missing)} tensors of the model are not in the checkpoint "
            f"'{checkpoint_dir}', e.g. {missing[:5]}"
        )
    unused = [k for k, i in ckpt.items() if f"{i.path}@{i.offset}" not in used and i.nbytes > 0]
    if unused:
        warnings.warn(
            f"moestream.load_offloaded: {len(unused)} checkpoint tensors are not used by the model, "
            f"e.g. {unused[:5]}",
            stacklevel=2,
        )
    install(model, opts, sources, entries)
    model.eval()
    return model


def load_layered(
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    max_device_memory: ByteSize = None,
    storage: str = "disk",
    prefetch: int = 2,
    **kwargs,
) -> nn.Module:
    """Streams a directory written by ``save_layered`` (see ``load_offloaded`` for the arguments;
    pass model=<skeleton> for models without a transformers config)."""
    out_dir = os.fspath(out_dir)
    index_path = os.path.join(out_dir, sio.INDEX_NAME)
    if not os.path.exists(index_path):
        raise FileNotFoundError(
            f"moestream.load_layered: '{out_dir}' holds no complete layered checkpoint (no {sio.INDEX_NAME}: "
            "never written, or the save was interrupted)"
        )
    meta = sio.read_json(index_path, "the checkpoint index").get("metadata", {}) or {}
    if meta.get("format") != LAYERED_FORMAT:
        raise ValueError(
            f"moestream.load_layered: '{out_dir}' is not a layered checkpoint (index format {meta.get('format')!r}); "
            "use ms.load_offloaded for ordinary safetensors checkpoints"
        )
    return load_offloaded(out_dir, device, max_device_memory, storage, prefetch, **kwargs)
