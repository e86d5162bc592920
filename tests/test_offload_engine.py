"""The streaming engine below the model hooks: exact bytes through every path (host pool, buffered
reads, O_DIRECT into slots, O_DIRECT through bounce buffers), any acquire order, argument checks,
the safetensors reader/writer, save_layered's atomicity and generic (non-transformers) models."""

from __future__ import annotations

import copy
import io
import json
import os
import random

import moestream as ms
import pytest
import torch
from moestream import _C
from moestream.offload import safetensors_io as sio
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


KiB = 1024


def _random_file(path, nbytes, seed=0):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    data.numpy().tofile(path)
    return data


def _plan(num_units, seed):
    """Units of 1-3 segments with odd sizes/offsets, each a (dst, nbytes, src) list, and the slot size."""
    rng = random.Random(seed)
    units, src, slot = [], 5, 0
    for _ in range(num_units):
        segs, dst = [], 0
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 300 * KiB)
            dst += rng.choice([0, 256, 4096, 17])
            segs.append((dst, n, src))
            dst += n
            src += n + rng.choice([0, 0, 3, 4096])
        units.append(segs)
        slot = max(slot, dst)
    return units, slot, src


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("source", ["file", "pool"])
@pytest.mark.parametrize("slots", [1, 3])
def test_streamer_delivers_exact_bytes_in_any_order(tmp_path, direct_io, source, slots, device):
    units, slot_bytes, total = _plan(7, seed=slots)
    path = tmp_path / "data.bin"
    data = _random_file(path, total + 4096)
    chunk = 64 * KiB  # many chunks per segment
    nst = 3
    pin = _C.PinMode.cuda if device == "cuda" else _C.PinMode.none
    pool = None
    if source == "pool":
        pool = _C.HostPool(total + 4096, pin)
        pool.view(0, data.numel()).copy_(data)
        pool.pin()
    dev = "cpu" if device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    cfg = _C.StreamerConfig(
        device=dev,
        slot_bytes=slot_bytes,
        num_slots=slots,
        num_readers=3,
        chunk_bytes=chunk,
        num_staging=nst,
        direct_io=direct_io,
        staging_pin=pin,
    )
    s = _C.Streamer(pool, cfg)
    f = s.add_file(str(path))
    for ui, segs in enumerate(units):
        fidx = f if source == "file" else _C.Segment.FROM_POOL
        assert (
            s.add_unit([_C.Segment(d, n, fidx, o, f"u{ui}.t{k}") for k, (d, n, o) in enumerate(segs)]) == ui
        )
    rng = random.Random(0)
    order = list(range(7)) * 3 + [rng.randrange(7) for _ in range(20)]
    for step, u in enumerate(order):
        ahead = [rng.randrange(7) for _ in range(rng.randint(0, 3))]
        mem, idx = s.acquire(u, ahead)
        assert 0 <= idx < slots and mem.numel() == slot_bytes
        mem = mem.cpu()  # on CUDA: ordered after the copies by the slot's ready event
        for d, n, o in units[u]:
            assert torch.equal(mem[d : d + n], data[o : o + n]), f"step {step} unit {u}"
        s.release(u)
    s.synchronize()
    st = s.stats()
    assert st["acquires"] == len(order)
    if source == "file":
        assert st["bytes_read"] > 0 and st["bytes_copied"] == (0 if device == "cpu" else st["bytes_read"])
    else:
        assert st["bytes_read"] == 0 and st["bytes_copied"] > 0


def test_streamer_o_direct_into_aligned_slots(tmp_path):
    # block-aligned ranges go straight into the page-aligned slot; the others through bounce buffers
    path = tmp_path / "aligned.bin"
    data = _random_file(path, 1 << 20, seed=3)
    cfg = _C.StreamerConfig(
        slot_bytes=256 * KiB, num_slots=2, num_readers=2, chunk_bytes=4096 * 8, num_staging=2, direct_io=True
    )
    s = _C.Streamer(None, cfg)
    assert s.stats()["staging_buffers"] == 2 and s.stats()["pool_bytes"] == _C.stream_staging_bytes(
        4096 * 8, 2
    )
    f = s.add_file(str(path))
    s.add_unit(
        [_C.Segment(0, 128 * KiB, f, 64 * KiB, "aligned"), _C.Segment(128 * KiB, 1000, f, 12345, "odd")]
    )
    s.add_unit([_C.Segment(4096, 200 * KiB, f, 512 * KiB, "aligned2")])
    for u in (0, 1, 0, 1):
        mem, _ = s.acquire(u, [])
        if u == 0:
            assert torch.equal(mem[: 128 * KiB], data[64 * KiB : 192 * KiB])
            assert torch.equal(mem[128 * KiB : 128 * KiB + 1000], data[12345 : 12345 + 1000])
        else:
            assert torch.equal(mem[4096 : 4096 + 200 * KiB], data[512 * KiB : 712 * KiB])
        s.release(u)


def test_streamer_errors_name_the_argument(tmp_path):
    path = tmp_path / "d.bin"
    data = _random_file(path, 10_000)
    pool = _C.HostPool(4096, _C.PinMode.none)
    one = {"slot_bytes": 4096, "num_slots": 1, "num_readers": 1, "chunk_bytes": 4096}
    s = _C.Streamer(pool, _C.StreamerConfig(**one))
    f = s.add_file(str(path))
    with pytest.raises(
        RuntimeError, match=r"tensor 'w' needs bytes \[9000, 11000\) of .*d\.bin' but the file has 10000"
    ):
        s.add_unit([_C.Segment(0, 2000, f, 9000, "w")])
    with pytest.raises(
        RuntimeError, match=r"tensor 'big' at slot bytes \[0, 5000\) does not fit a slot of 4096"
    ):
        s.add_unit([_C.Segment(0, 5000, f, 0, "big")])
    with pytest.raises(RuntimeError, match=r"tensor 'p' needs pool bytes \[1, 4097\)"):
        s.add_unit([_C.Segment(0, 4096, _C.Segment.FROM_POOL, 1, "p")])
    with pytest.raises(RuntimeError, match="names file 7"):
        s.add_unit([_C.Segment(0, 10, 7, 0, "q")])
    with pytest.raises(RuntimeError, match="cannot open"):
        s.add_file(str(tmp_path / "missing.bin"))
    a = s.add_unit([_C.Segment(0, 100, f, 0, "a")])
    b = s.add_unit([_C.Segment(0, 100, f, 100, "b")])
    with pytest.raises(RuntimeError, match=r"unit must be in \[0, 2\), got 5"):
        s.acquire(5, [])
    with pytest.raises(RuntimeError, match="unit 0 is not acquired"):
        s.release(a)
    mem, _ = s.acquire(a, [b])  # b cannot be prefetched: the only slot is in use (a hint, no error)
    assert torch.equal(mem[:100], data[:100])
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        s.acquire(b, [])
    s.release(a)
    mem, _ = s.acquire(b, [])
    assert torch.equal(mem[:100], data[100:200])
    s.release(b)
    with pytest.raises(RuntimeError, match="slot_bytes must be > 0"):
        _C.Streamer(pool, _C.StreamerConfig(**dict(one, slot_bytes=0)))
    with pytest.raises(RuntimeError, match=r"num_readers must be in \[1, 256\], got 0"):
        _C.Streamer(pool, _C.StreamerConfig(**dict(one, num_readers=0)))
    with pytest.raises(RuntimeError, match="chunk_bytes must be >= 4096, got 100"):
        _C.Streamer(pool, _C.StreamerConfig(**dict(one, chunk_bytes=100)))
    with pytest.raises(TypeError):
        _C.HostPool(4096, 1)  # the pin mode is a PinMode, not a number
    with pytest.raises(RuntimeError, match=r"range \[0, 8192\) is outside the pool of 4096"):
        pool.view(0, 8192)
    if not ms.with_cuda:
        with pytest.raises(RuntimeError, match="needs moestream built with CUDA"):
            _C.Streamer(pool, _C.StreamerConfig(**dict(one, device="cuda:0")))
    # read_into: synchronous reads for resident tensors
    dst = torch.empty(300, dtype=torch.uint8)
    s.read_into(dst, [_C.Segment(0, 100, f, 50, "x"), _C.Segment(100, 200, f, 7000, "y")])
    assert torch.equal(dst[:100], data[50:150]) and torch.equal(dst[100:], data[7000:7200])
    with pytest.raises(RuntimeError, match="does not fit dst of 300 bytes"):
        s.read_into(dst, [_C.Segment(250, 100, f, 0, "z")])


def test_host_pool_pins_and_reports():
    pool = _C.HostPool(
        1 << 20, _C.PinMode.mlock
    )  # mlock; refused under a small memlock limit (see test_offload_rss)
    assert pool.capacity == 1 << 20 and not pool.pinned
    assert pool.pin() == pool.pinned
    assert pool.pinned or "mlock" in pool.pin_error
    assert pool.pin() == pool.pinned  # idempotent
    pool.populate(0, 1 << 20)
    host, _ = _C.stream_live_bytes()
    assert host >= 1 << 20
    v = pool.view(4096, 100)
    v.fill_(7)
    del pool
    assert int(v.sum()) == 700  # the view keeps the pool alive
    del v
    assert _C.stream_live_bytes()[0] == host - (1 << 20)


# ---------------------------------------------------------------------------------------------- files


ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]


def test_safetensors_writer_matches_the_reference_reader(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = []
    for i, dt in enumerate(ALL_DTYPES):
        t = torch.randn(3, 5, generator=g) * 4
        tensors.append((f"t{i}", t.to(dt)))
    tensors.append(("scalar", torch.tensor(3.5)))
    tensors.append(("empty", torch.empty(0, 4)))
    tensors.append(("noncontig", torch.randn(6, 4, generator=g).t()))
    path = str(tmp_path / "x.safetensors")
    sio.write_safetensors(path, tensors, metadata={"a": "b"})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"a": "b"}
        for name, t in tensors:
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(
                got.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got,
                t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
            ), name
    infos, meta = sio.read_header(path)
    assert meta == {"a": "b"}
    first = min(i.offset for i in infos.values())
    assert first % sio.DATA_ALIGN == 0  # data section is block aligned
    assert infos["t0"].nbytes == 15 * 4 and infos["t0"].shape == (3, 5)


def test_safetensors_reader_rejects_corrupt_headers(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not a safetensors file"):
        sio.read_header(str(p))
    p.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length 1000"):
        sio.read_header(str(p))
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8)  # 8 of 16 data bytes
    with pytest.raises(ValueError, match="tensor 'w' .* do not fit the file"):
        sio.read_header(str(p))
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 16)
    with pytest.raises(ValueError, match="tensor 'w'"):
        sio.read_header(str(p))
    hdr = json.dumps({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 16)
    with pytest.raises(ValueError, match=r"bad header entry for tensor 'w' \(unsupported dtype 'Q4'\)"):
        sio.read_header(str(p))
    p.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(ValueError, match="not valid JSON"):
        sio.read_header(str(p))


# ---------------------------------------------------------------------------------------------- generic models


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, 3 * h)
        self.fc2 = nn.Linear(3 * h, h, bias=False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return x + self.scale * self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, h=24, n=5, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.small = nn.ModuleList([nn.Linear(h, h) for _ in range(2)])  # not the blocks: fewer parameters
        self.blocks = nn.ModuleList([Block(h) for _ in range(n)])
        self.head = nn.Linear(h, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        for s in self.small:
            x = s(x)
        return self.head(x)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offload_generic_module_list_model(storage, tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        ref = net(ids)
    from moestream.offload import find_blocks

    assert find_blocks(net)[0] == "blocks"
    ms.offload(
        net,
        device="cpu",
        storage=storage,
        prefetch=1,
        offload_dir=str(tmp_path / "o") if storage == "disk" else None,
    )
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(net(ids), ref)
    assert ms.offload_stats(net)["units"] == 5


def test_save_layered_state_dict_and_skeleton_load(tmp_path):
    torch.manual_seed(1)
    net = Net().eval()
    net.head.weight = net.emb.weight  # tied: stored once, recorded as an alias
    ids = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        ref = net(ids)
    ms.save_layered(net.state_dict(), tmp_path, progress=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["blocks"] == "blocks" and index["metadata"]["num_blocks"] == 5
    assert index["metadata"]["aliases"] == {"head.weight": "emb.weight"}
    assert "head.weight" not in index["weight_map"]
    with torch.device("meta"):
        skeleton = Net()
    skeleton.head.weight = skeleton.emb.weight
    loaded = ms.load_layered(tmp_path, device="cpu", prefetch=2, model=skeleton).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    # an untied skeleton takes the alias too
    with torch.device("meta"):
        untied = Net()
    loaded2 = ms.load_layered(tmp_path, device="cpu", prefetch=2, model=untied, storage="cpu").eval()
    with torch.no_grad():
        assert torch.equal(loaded2(ids), ref)


def test_save_layered_is_atomic(tmp_path, monkeypatch):
    torch.manual_seed(2)
    net = Net().eval()
    ids = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        ref = net(ids)
    ms.save_layered(net, tmp_path, progress=False)
    assert (tmp_path / "model.safetensors.index.json").exists()

    calls = {"n": 0}
    real = sio.write_safetensors

    def failing(path, tensors, metadata=None, on_tensor=None):
        calls["n"] += 1
        if calls["n"] == 3:

            def boom(n):
                raise KeyboardInterrupt("interrupted")

            return real(path, tensors, metadata, on_tensor=boom)
        return real(path, tensors, metadata, on_tensor)

    torch.manual_seed(3)
    other = Net().eval()
    monkeypatch.setattr(sio, "write_safetensors", failing)
    with pytest.raises(KeyboardInterrupt):
        ms.save_layered(other, tmp_path, progress=False)
    monkeypatch.undo()
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" not in files  # nothing looks complete
    assert not [f for f in files if ".tmp-" in f]  # no temporary files left behind
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ms.load_layered(tmp_path, model=Net())
    ms.save_layered(net, tmp_path, progress=False)
    with torch.device("meta"):
        skeleton = Net()
    loaded = ms.load_layered(tmp_path, device="cpu", model=skeleton).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    # a smaller model saved into the same directory drops the extra shards
    small = Net(n=2).eval()
    ms.save_layered(small, tmp_path, progress=False)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model-layer")) == [
        "model-layer-00000.safetensors",
        "model-layer-00001.safetensors",
    ]


def test_load_offloaded_reports_missing_and_mismatched(tmp_path):
    net = Net()
    ms.save_layered(net, tmp_path, progress=False)
    with torch.device("meta"):
        bigger = Net(h=32)
    with pytest.raises(ValueError, match=r"'emb.weight' is \[50, 32\] in the model but \[50, 24\]"):
        ms.load_offloaded(tmp_path, device="cpu", model=bigger)
    partial = tmp_path / "partial"
    partial.mkdir()
    blocks = [(k, v) for k, v in net.state_dict().items() if k.startswith("blocks.")]
    sio.write_safetensors(str(partial / "model.safetensors"), blocks)
    with torch.device("meta"):
        skeleton = Net()
    with pytest.raises(ValueError, match="not in the checkpoint"):
        ms.load_offloaded(partial, device="cpu", model=skeleton)


class Reversed(Net):
    def forward(self, ids):
        x = self.emb(ids)
        for b in list(self.blocks)[::-1]:  # not the order the prefetch assumes: loads on demand
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_blocks_run_out_of_order_still_correct(prefetch):
    torch.manual_seed(4)
    net = Reversed().eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ref = net(ids)
    ms.offload(net, device="cpu", storage="cpu", prefetch=prefetch)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(net(ids), ref)
    assert ms.offload_stats(net)["num_slots"] == prefetch + 1


# ---------------------------------------------------------------------------------------------- hardening


def _st_file(path, entries, data_bytes):
    """A safetensors file with the header `entries` and `data_bytes` bytes of data."""
    hdr = json.dumps(entries).encode()
    path.write_bytes(
        len(hdr).to_bytes(8, "little")
        + hdr
        + bytes(range(256)) * (data_bytes // 256)
        + b"\1" * (data_bytes % 256)
    )


def test_corrupt_safetensors_headers_are_refused_like_the_safetensors_library(tmp_path):
    safetensors = pytest.importorskip("safetensors")

    def f32(shape, b, e):
        return {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}

    cases = {
        "shifted by 4 bytes": (
            {"a": f32([4], 4, 20), "b": f32([4], 20, 36)},
            36,
            "does not start at the beginning",
        ),
        "same byte range": ({"a": f32([4], 0, 16), "b": f32([4], 0, 16)}, 16, "overlaps tensor 'a'"),
        "overlap": ({"a": f32([4], 0, 16), "b": f32([4], 12, 28)}, 28, "overlaps tensor 'a'"),
        "gap": ({"a": f32([4], 0, 16), "b": f32([4], 20, 36)}, 36, "leaves a gap after tensor 'a'"),
        "trailing data": ({"a": f32([4], 0, 16)}, 20, "cover 16 bytes of data but the file holds 20"),
        "fractional shape": (
            {"a": f32([64.5], 0, 256)},
            256,
            "shape must be a list of non-negative integers",
        ),
        "string shape": ({"a": f32(["4"], 0, 16)}, 16, "shape must be a list of non-negative integers"),
        "negative dimension": ({"a": f32([-4], 0, 16)}, 16, "shape must be a list of non-negative integers"),
        "fractional offsets": (
            {"a": f32([4], 0.0, 16)},
            16,
            "data_offsets must be two non-negative integers",
        ),
        "not an object": ({"a": [1, 2]}, 0, "not a JSON object"),
    }
    for what, (entries, nbytes, msg) in cases.items():
        p = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        _st_file(p, entries, nbytes)
        with pytest.raises(ValueError, match=msg):
            sio.read_header(str(p))
        # the reference rejects it too (with its own error types)
        with pytest.raises(Exception), safetensors.safe_open(str(p), "pt") as f:  # noqa: B017
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open has no __contains__/__iter__
    # what the writer produces (tensors of every size, zero-sized ones included) is accepted by both
    good = tmp_path / "good.safetensors"
    tensors = [
        ("e", torch.empty(0)),
        ("a", torch.randn(3, 5)),
        ("z", torch.zeros(0, 4)),
        ("b", torch.arange(7)),
    ]
    sio.write_safetensors(str(good), tensors)
    infos, _ = sio.read_header(str(good))
    with safetensors.safe_open(str(good), "pt") as f:
        for name, t in tensors:
            assert torch.equal(f.get_tensor(name), t) and infos[name].shape == tuple(t.shape)


def test_a_tensor_in_two_files_without_an_index_is_an_error(tmp_path):
    sio.write_safetensors(str(tmp_path / "a.safetensors"), [("w", torch.ones(3)), ("x", torch.ones(2))])
    sio.write_safetensors(str(tmp_path / "b.safetensors"), [("w", torch.zeros(3))])
    with pytest.raises(
        ValueError, match=r"tensor 'w' is in two files of .*: 'a.safetensors' and 'b.safetensors'"
    ):
        sio.checkpoint_tensors(str(tmp_path))
    # an index says which file holds it: fine
    sio.write_json_atomic(
        str(tmp_path / sio.INDEX_NAME), {"weight_map": {"w": "b.safetensors", "x": "a.safetensors"}}
    )
    infos, _ = sio.checkpoint_tensors(str(tmp_path))
    assert infos["w"].path.endswith("b.safetensors")


def test_load_after_an_interrupted_save_layered_over_an_older_checkpoint_is_refused(tmp_path, monkeypatch):
    torch.manual_seed(3)
    ms.save_layered(Net(), tmp_path, progress=False)
    real = sio.write_safetensors
    written = []

    def dies_after_two(path, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed mid-way
        written.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sio, "write_safetensors", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ms.save_layered(Net(), tmp_path, progress=False)  # another model over the old files
    monkeypatch.undo()
    with torch.device("meta"):
        skeleton = Net()
    with pytest.raises(
        ValueError, match="files of a layered checkpoint .* but no model.safetensors.index.json"
    ):
        ms.load_offloaded(tmp_path, device="cpu", model=skeleton)
    with pytest.raises(FileNotFoundError, match="no complete layered checkpoint"):
        ms.load_layered(tmp_path, device="cpu", model=skeleton)


def test_index_entries_outside_the_checkpoint_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sio.write_safetensors(str(outside / "x.safetensors"), [("w", torch.ones(3))])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for bad in (
        "../outside/x.safetensors",
        str(outside / "x.safetensors"),
        "sub/../../outside/x.safetensors",
    ):
        sio.write_json_atomic(str(ckpt / sio.INDEX_NAME), {"weight_map": {"w": bad}})
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            sio.checkpoint_tensors(str(ckpt))
    # a subdirectory inside it is fine
    (ckpt / "sub").mkdir()
    sio.write_safetensors(str(ckpt / "sub" / "x.safetensors"), [("w", torch.ones(3))])
    sio.write_json_atomic(str(ckpt / sio.INDEX_NAME), {"weight_map": {"w": "sub/./x.safetensors"}})
    assert sio.checkpoint_tensors(str(ckpt))[0]["w"].shape == (3,)


def test_malformed_indexes_and_paths_are_named(tmp_path):
    net = Net()
    ms.save_layered(net, tmp_path, progress=False)
    index = tmp_path / sio.INDEX_NAME
    good = json.loads(index.read_text())
    with torch.device("meta"):
        skeleton = Net()
    index.write_text('{"weight_map": {"emb.weight": ')
    with pytest.raises(ValueError, match=rf"the checkpoint index '.*{sio.INDEX_NAME}' is not valid JSON"):
        ms.load_offloaded(tmp_path, device="cpu", model=skeleton)
    with pytest.raises(ValueError, match="is not valid JSON"):
        ms.load_layered(tmp_path, device="cpu", model=skeleton)
    index.write_text(json.dumps({"metadata": good["metadata"]}))
    with pytest.raises(ValueError, match=r"has no \"weight_map\" object"):
        ms.load_offloaded(tmp_path, device="cpu", model=skeleton)
    index.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        ms.load_offloaded(tmp_path, device="cpu", model=skeleton)
    bad = dict(good, metadata=dict(good["metadata"], aliases="{not json"))
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"the \"aliases\" of '.*' are not valid JSON"):
        ms.load_offloaded(tmp_path, device="cpu", model=skeleton)
    index.write_text(json.dumps(good))
    with pytest.raises(NotADirectoryError, match="is a file; pass the directory"):
        ms.load_offloaded(tmp_path / "model-rest.safetensors", device="cpu", model=skeleton)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ms.load_offloaded(tmp_path, device="cpu")
    assert ms.load_offloaded(tmp_path, device="cpu", model=skeleton) is skeleton


def test_a_checkpoint_tensor_of_another_dtype_is_named_at_load(tmp_path):
    torch.manual_seed(4)
    net = Net()
    state = dict(net.state_dict())
    state["blocks.2.fc1.weight"] = state["blocks.2.fc1.weight"].half()
    ms.save_layered(state, tmp_path / "mixed", progress=False)
    with torch.device("meta"):
        skeleton = Net()
    with pytest.raises(
        ValueError, match=r"'blocks.2.fc1.weight' is torch.float16 in the checkpoint .* but torch.float32"
    ):
        ms.load_offloaded(tmp_path / "mixed", device="cpu", model=skeleton)
    state["blocks.2.fc1.weight"] = torch.zeros(state["blocks.2.fc1.weight"].shape, dtype=torch.int32)
    ms.save_layered(state, tmp_path / "int", progress=False)
    with pytest.raises(ValueError, match=r"'blocks.2.fc1.weight' is torch.int32 in the checkpoint"):
        ms.load_offloaded(tmp_path / "int", device="cpu", model=skeleton)
    # a whole checkpoint in another float dtype converts the model, as documented
    ms.save_layered({k: v.bfloat16() for k, v in net.state_dict().items()}, tmp_path / "bf16", progress=False)
    with torch.device("meta"):
        skeleton = Net()
    model = ms.load_offloaded(tmp_path / "bf16", device="cpu", model=skeleton)
    ids = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), net.bfloat16()(ids).float())


def test_failed_disk_offload_removes_its_temporary_directory(monkeypatch):
    from moestream.offload import materialize

    made = []
    real_mkdtemp, real_write = materialize.tempfile.mkdtemp, sio.write_safetensors

    def mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    calls = []

    def disk_full(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(materialize.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(sio, "write_safetensors", disk_full)
    net = Net()
    with pytest.raises(OSError, match="No space left"):
        ms.offload(net, device="cpu", storage="disk")
    assert len(made) == 1 and not os.path.exists(made[0])
    assert getattr(net, "_moestream_offload", None) is None


def test_blocks_must_name_a_list_of_blocks():
    for blocks, msg in (
        ("blocks.0", "names a single Block, not the nn.ModuleList"),
        ("nothing", "names no submodule"),
    ):
        with pytest.raises(ValueError, match=msg):
            ms.offload(Net(), device="cpu", blocks=blocks)
    net = Net()
    with pytest.raises(ValueError, match="is a single Block, not a list of blocks"):
        ms.offload(net, device="cpu", blocks=net.blocks[0])
    with pytest.raises(TypeError, match="blocks must be a module name"):
        ms.offload(net, device="cpu", blocks=3)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_model_refuses_state_dict_moves_and_training(storage):
    torch.manual_seed(5)
    net = Net().eval()
    ids = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        ref = net(ids)
    keys = list(net.state_dict())
    ms.offload(net, device="cpu", storage=storage, prefetch=1)
    for call in (
        net.state_dict,
        net.blocks[1].state_dict,
        lambda: torch.save(net.state_dict(), io.BytesIO()),
    ):
        with pytest.raises(RuntimeError, match="state_dict.* would hold placeholders"):
            call()
    assert list(net.state_dict(keep_vars=True)) == keys  # the Parameter objects, for introspection
    with pytest.raises(RuntimeError, match="load_state_dict.* is not supported"):
        net.load_state_dict({k: torch.zeros(()) for k in keys})
    for move in (
        lambda: net.to(torch.float16),
        lambda: net.half(),
        lambda: net.to("meta"),
        lambda: net.blocks[0].to("cpu"),
        lambda: net.blocks[0].double(),
        lambda: net.float(),
    ):
        with pytest.raises(RuntimeError, match="offloaded model cannot be moved or cast"):
            move()
    assert net.to("cpu") is net and net.to(torch.device("cpu")) is net  # where it is: a no-op
    # grad mode on: the forward works (inference), a backward through a streamed block is refused
    out = net(ids)
    assert torch.equal(out.detach(), ref) and out.requires_grad
    with pytest.raises(
        RuntimeError, match=r"backward through the streamed block 'blocks\.\d' .* inference-only"
    ):
        out.sum().backward()
    net.requires_grad_(True)  # even with the streamed parameters asking for gradients
    with pytest.raises(RuntimeError, match="inference-only"):
        net(ids).sum().backward()
    with torch.no_grad():
        assert torch.equal(net(ids), ref)
    assert ms.offload_stats(net)["units"] == 5  # every refusal left the model working


def test_disk_offload_under_a_budget_smaller_than_the_default_read_buffers(tmp_path):
    # the default bounce buffers (5 x 4 MiB) are far larger than this model; a budget that holds the
    # resident weights, two slots and the smallest buffer streams correctly with small buffers
    from moestream.offload.planner import MIN_CHUNK

    torch.manual_seed(6)
    net = Net().eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ref = net(ids)
    probe = ms.offload(copy.deepcopy(net), device="cpu", storage="disk", direct_io=True, prefetch=2)
    st = ms.offload_stats(probe)
    smallest = _C.stream_staging_bytes(MIN_CHUNK, 1)
    assert st["read_buffer_bytes"] > 10 * smallest
    budget = st["resident_bytes"] + 2 * st["slot_bytes"] + smallest
    ms.offload(net, device="cpu", storage="disk", direct_io=True, prefetch=1, max_device_memory=budget)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(net(ids), ref)
    st = ms.offload_stats(net)
    assert st["device_bytes"] <= budget and st["num_slots"] == 2 and st["read_buffer_bytes"] == smallest
