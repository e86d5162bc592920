"""The runner's ``model`` and ``stream`` suites (self-measuring suites, ``bench.Measured``): their
rows in the table, JSON, --compare and --plot; tiny real runs on CPU; the plumbing with synthetic
measurements; lazy imports."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from io import StringIO

import pytest
import torch
from moestream import bench
from moestream.bench import plots, report, suite_expert_cache, suite_model, suite_stream
from moestream.bench.__main__ import main
from moestream.bench.timing import Measurement, TimingPolicy, measure

CLI = ["--quick", "--threads", "1", "--no-progress", "--device", "cpu", "--shape", "tiny"]


def run_cli(args):
    out, old = StringIO(), sys.stdout
    sys.stdout = out
    try:
        rc = main(args)
    finally:
        sys.stdout = old
    return rc, out.getvalue()


def rows_of(path, suite):
    data = json.loads(path.read_text())
    return data, [r for r in data["rows"] if r["suite"] == suite]


# ---------------------------------------------------------------------------------------------
# real tiny runs


def test_model_suite_tiny_real_run(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "model.json"
    rc, text = run_cli(CLI + ["--suite", "model", "--json", str(path)])
    assert rc == 0, text
    data, rows = rows_of(path, "model")
    assert data["meta"]["suites"] == ["model"]
    ops = {r["op"] for r in rows}
    assert ops == {f"{m}_{p}" for m in ("qwen3_moe", "mixtral") for p in ("forward", "train")}
    for op in ops:
        grp = {r["impl"]: r for r in rows if r["op"] == op}
        assert {"hf-eager", "hf-grouped_mm", "moestream", "hf-router+moestream"} <= set(grp)
        assert grp["hf-eager"]["role"] == "baseline" and grp["moestream"]["role"] == "ours"
        ours = grp["moestream"]
        assert ours["status"] == "ok", ours
        assert ours["tokens"] == 32 and ours["dtype"] == "float32" and ours["shape"] == "tiny"
        assert ours["p10_ms"] <= ours["median_ms"] <= ours["p90_ms"] and ours["reps"] >= 3
        assert ours["tokens_per_s"] == pytest.approx(32 / (ours["median_ms"] * 1e-3))
        assert ours["error"] < 1e-3  # logits against transformers eager
        eager = grp["hf-eager"]
        assert ours["speedup"]["hf-eager"] == pytest.approx(eager["median_ms"] / ours["median_ms"])
    assert "model / qwen3_moe_train / float32 / T=32" in text
    assert "moestream vs hf-eager: geometric-mean speedup" in text


def test_stream_suite_tiny_real_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = tmp_path / "stream.json"
    rc, text = run_cli(CLI + ["--suite", "stream", "--json", str(path)])
    assert rc == 0, text
    _, rows = rows_of(path, "stream")
    by = {(r["op"], r["impl"]): r for r in rows if r["tokens"] in (0, 1)}
    assert by[("link", "disk O_DIRECT")]["role"] == "ceiling"
    assert by[("link", "disk O_DIRECT")]["gbps"] > 0
    st = by[("streamer", "moestream (disk)")]
    assert st["gbps"] > 0 and st["ceiling"] == "link" and st["ceiling_fraction"] > 0
    dec = by[("decode", "moestream")]
    base = by[("decode", "accelerate.disk_offload")]
    assert dec["status"] == base["status"] == "ok" and dec["tokens"] == 1
    assert base["role"] == "baseline"
    assert dec["speedup"]["accelerate.disk_offload"] == pytest.approx(base["median_ms"] / dec["median_ms"])
    assert dec["ceiling_fraction"] == pytest.approx(dec["params"]["floor_ms"] / dec["median_ms"])
    assert "stream / decode / float32 / T=1" in text
    # throughput: every batch, ours and accelerate's, each against the other at the same batch
    for b in suite_stream.QUICK_BATCHES:  # --quick: batch 1 and 32
        grp = {r["impl"]: r for r in rows if r["op"] == "decode" and r["tokens"] == b}
        assert set(grp) == {"moestream", "accelerate.disk_offload"}, b
        ours = grp["moestream"]
        assert ours["status"] == "ok" and ours["params"]["batch"] == b
        assert ours["tokens_per_s"] == pytest.approx(b / (ours["median_ms"] * 1e-3))
        assert ours["params"]["bytes_per_step"] == dec["params"]["bytes_per_step"] > 0
        assert "accelerate.disk_offload" in ours["speedup"]
        assert f"stream / decode / float32 / T={b}" in text
    # compressed: the bytes streamed per step are the packed ones
    comp = {r["impl"]: r for r in rows if r["op"] == "compressed_decode"}
    assert set(comp) == {"moestream", "moestream int8", "moestream int4"}
    plain = comp["moestream"]["params"]["bytes_per_step"]
    assert plain == dec["params"]["bytes_per_step"]
    i8, i4 = comp["moestream int8"]["params"], comp["moestream int4"]["params"]
    # the layers' linears compressed, their norms not: between the pure ratios and 1
    assert (
        plain / 4 < i8["bytes_per_step"] < plain and plain / 8 < i4["bytes_per_step"] < i8["bytes_per_step"]
    )
    assert i4["bytes_ratio"] == pytest.approx(plain / i4["bytes_per_step"])
    assert i4["loaded_bytes_per_step"] < comp["moestream"]["params"]["loaded_bytes_per_step"]
    for r in comp.values():
        assert (
            r["status"] == "ok"
            and r["params"]["compute_ms"] > 0
            and r["params"]["bound_by"] in ("link", "compute")
        )
        p = r["params"]
        # measured bytes moved per step: the packed ones, at most every streamed unit's
        assert 0 < p["loaded_bytes_per_step"] <= p["bytes_per_step"]
        assert p["floor_ms"] == pytest.approx(p["loaded_bytes_per_step"] / (p["link_gbps"] * 1e6))
        assert p["link_gbps"] == p["files_link_gbps"] > 0
    assert set(comp["moestream int4"]["speedup"]) == {"moestream"}


def test_expert_cache_suite_tiny_real_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("MOESTREAM_BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "xcache.json"
    rc, text = run_cli(CLI + ["--suite", "expert_cache", "--json", str(path)])
    assert rc == 0, text
    _, rows = rows_of(path, "expert_cache")
    links = {r["impl"]: r for r in rows if r["op"] == "link"}
    assert links["disk O_DIRECT"]["role"] == "ceiling" and links["disk O_DIRECT"]["gbps"] > 0
    assert links["disk O_DIRECT expert-sized"]["gbps"] > 0
    link = links["disk O_DIRECT"]["gbps"]
    decode = [r for r in rows if r["op"] != "link"]
    by = {(r["params"]["routing"], r["tokens"], r["impl"]): r for r in decode}
    impls = {
        "moestream experts=cache",
        "moestream experts=layer",
        "accelerate.disk_offload",
        "transformers in memory",
    }
    assert set(by) == {(g, b, i) for g in ("uniform", "zipf(s=1)") for b in (1, 8) for i in impls}
    assert {r["op"] for r in decode} == {"decode_uniform", "decode_zipf"}
    share = {}
    for (routing, batch, impl), r in by.items():
        assert r["status"] in ("ok", "unreliable"), r
        assert r["tokens_per_s"] == pytest.approx(batch / (r["median_ms"] * 1e-3))
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        if impl.startswith("moestream"):
            p = r["params"]
            floor_ms = p["floor_bytes_per_step"] / (link * 1e9) * 1e3
            assert p["floor_ms"] == pytest.approx(floor_ms) and floor_ms > 0
            assert r["ceiling_fraction"] == pytest.approx(floor_ms / r["median_ms"])
            assert (r["status"] == "unreliable") == (r["ceiling_fraction"] > 1.0)
            assert p["bytes_per_token"] == pytest.approx(p["bytes_per_step"] / batch)
        if r["status"] == "ok" and r["role"] == "ours":
            assert set(r["speedup"]) == {
                i for i in impls if i != impl and by[(routing, batch, i)]["status"] == "ok"
            }
        if impl == "moestream experts=cache":
            p = r["params"]
            assert 0.0 <= p["cached_hit_rate"] <= p["hit_rate"] <= 1.0
            # every step's selection: L layers x batch x k (tiny: 6 layers, top-4)
            assert p["selections_per_step"] == 6 * batch * 4
            assert p["lookups_per_step"] <= p["selections_per_step"]
            assert p["experts_read_per_step"] <= p["lookups_per_step"]
            assert p["floor_bytes_per_step"] <= p["cold_floor_bytes_per_step"]
            # the floor's bytes are read: what was read is at least the floor (a little header slack)
            assert p["bytes_per_step"] >= 0.99 * p["floor_bytes_per_step"]
            share[routing, batch] = p["top10_share"]
            layer = by[(routing, batch, "moestream experts=layer")]["params"]
            if batch == 1:  # (at batch 8 the tiny model's 8 x 4 selections cover nearly all 16 experts)
                assert p["bytes_per_step"] < layer["bytes_per_step"]
    assert share[("zipf(s=1)", 8)] > share[("uniform", 8)]  # the skewed routing is skewed
    assert "expert_cache / decode_zipf / float32 / T=8" in text
    if importlib.util.find_spec("matplotlib"):
        png = tmp_path / "x.png"
        plots.plot(json.loads(path.read_text()), png)
        assert png.stat().st_size > 0


def test_expert_cache_rows_faster_than_the_floor_are_unreliable():
    make = suite_expert_cache.CacheRows("tiny", torch.float32, torch.device("cpu"))
    fast = make.decode("uniform", 1, "moestream experts=cache", "ours", _times(1.0), floor_bytes_per_step=4e6)
    slow = make.decode(
        "uniform",
        8,
        "moestream experts=cache",
        "ours",
        _times(4.0),
        floor_bytes_per_step=4e6,
        cold_floor_bytes_per_step=8e6,
    )
    suite_expert_cache.judge([fast, slow], 2.0)  # floors: 2 ms at 2 GB/s
    assert fast.status == "unreliable" and "faster than its floor" in fast.reason
    assert slow.status == "ok" and slow.ceiling_fraction == pytest.approx(0.5)
    assert slow.params["ratio_to_floor"] == pytest.approx(2.0)
    assert slow.params["cold_floor_ms"] == pytest.approx(4.0)
    assert slow.params["floor_tokens_per_s"] == pytest.approx(8 / 2e-3)


def test_zipf_probs_are_a_permuted_zipf():
    p = suite_expert_cache.zipf_probs(64, 1.0, seed=3)
    assert p.sum().item() == pytest.approx(1.0)
    top = p.sort(descending=True).values
    assert torch.allclose(top / top[0], 1.0 / torch.arange(1, 65, dtype=torch.float64))
    assert not torch.equal(p, p.sort(descending=True).values)  # the popular experts are spread out


# ---------------------------------------------------------------------------------------------
# plumbing with synthetic measurements


def _times(median_ms):
    """Five times around ``median_ms``: p10/p90 at -+16%, spread 0.16."""
    return Measurement([median_ms * f for f in (0.8, 0.9, 1.0, 1.1, 1.2)])


def _fake_stream(cfg, dtype):
    make = suite_stream.StreamRows(cfg.shape.name, dtype, cfg.device, model="x/6L")
    ours = [
        make.streamer("disk", 1.5, "fake"),
        make.decode(_times(10.0), bytes_per_step=16_000_000),
        make.decode(_times(20.0), bytes_per_step=16_000_000, batch=32),
    ]
    comp = [  # uncompressed 16 MB per step, int8 8 MB, int4 4 MB; int4's kernels slower than its disk
        make.compressed(None, _times(10.0), 16_000_000, 16_000_000, compute_ms=1.0),
        make.compressed("int8", _times(5.0), 8_000_000, 16_000_000, compute_ms=2.0),
        make.compressed("int4", _times(4.0), 4_000_000, 16_000_000, compute_ms=3.0),
    ]
    suite_stream.judge(ours + comp, 2.0)
    return [
        make.link("disk O_DIRECT", 2.0, "fake"),
        *ours,
        *comp,
        make.baseline("accelerate.disk_offload", _times(30.0)),
        make.baseline("accelerate.disk_offload", _times(120.0), batch=32),
    ]


def _fake_model(cfg, dtype):
    sizes = {"size": "bench", "layers": 1, "batch": 1, "seq": 128}

    def row(phase, impl):
        return suite_model.model_row("qwen3_moe", phase, impl, cfg, dtype, sizes, "small-models")

    rows = []
    for impl, median in (("hf-eager", 40.0), ("hf-grouped_mm", 20.0), ("moestream", 10.0)):
        rows.append(row("forward", impl))
        rows[-1].record(_times(median))
        rows[-1].error = 1e-6
    rows.append(row("train", "hf-grouped_mm"))
    rows[-1].status, rows[-1].reason = bench.core.describe_failure(RuntimeError("no kernel"), "baseline")
    return rows


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(suite_stream, "run_stream_suite", _fake_stream)
    monkeypatch.setattr(suite_model, "run_model_suite", _fake_model)
    monkeypatch.setattr(suite_expert_cache, "run_expert_cache_suite", lambda cfg, dtype: [])


def test_rows_reach_json_table_compare_and_plot(fakes, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rc, text = run_cli(
        CLI
        + [
            "--suite",
            "all",
            "--op",
            "decode,compressed_decode,link,streamer,qwen3_moe_forward,qwen3_moe_train",
            "--json",
            str(a),
        ]
    )
    assert rc == 0, text
    data, stream = rows_of(a, "stream")
    _, model = rows_of(a, "model")
    assert set(data["meta"]["suites"]) >= {"ops", "moe", "model", "stream"}
    by = {(r["op"], r["impl"]): r for r in stream if r["tokens"] in (0, 1)}
    assert set(by) == {
        ("link", "disk O_DIRECT"),
        ("streamer", "moestream (disk)"),
        ("decode", "moestream"),
        ("decode", "accelerate.disk_offload"),
        ("compressed_decode", "moestream"),
        ("compressed_decode", "moestream int8"),
        ("compressed_decode", "moestream int4"),
    }
    # throughput: batch 32 against accelerate at batch 32, tokens/s of all sequences
    b32 = {r["impl"]: r for r in stream if r["op"] == "decode" and r["tokens"] == 32}
    assert b32["moestream"]["speedup"] == {"accelerate.disk_offload": pytest.approx(6.0)}
    assert b32["moestream"]["tokens_per_s"] == pytest.approx(1600.0)
    assert b32["moestream"]["params"]["bytes_per_token"] == pytest.approx(16e6 / 32)
    assert b32["moestream"]["params"]["floor_ms"] == pytest.approx(8.0)  # the same bytes per step
    # compressed: speedup against the uncompressed model, the packed bytes' floor, what bounds it
    i4, i8 = by[("compressed_decode", "moestream int4")], by[("compressed_decode", "moestream int8")]
    assert i4["speedup"] == {"moestream": pytest.approx(2.5)} and i8["speedup"] == {
        "moestream": pytest.approx(2.0)
    }
    assert i4["params"]["bytes_ratio"] == pytest.approx(4.0) and i4["params"]["floor_ms"] == pytest.approx(
        2.0
    )
    assert i4["params"]["bound_by"] == "compute" and i8["params"]["bound_by"] == "link"
    assert by[("compressed_decode", "moestream")]["role"] == "baseline"
    dec = by[("decode", "moestream")]
    assert dec["speedup"] == {"accelerate.disk_offload": pytest.approx(3.0)}
    assert dec["ceiling_fraction"] == pytest.approx(0.8) and dec["spread"] == pytest.approx(0.16)
    assert dec["params"]["floor_ms"] == pytest.approx(8.0) and dec["gbps"] == pytest.approx(1.6)
    assert dec["tokens_per_s"] == pytest.approx(100.0)
    assert by[("streamer", "moestream (disk)")]["ceiling_fraction"] == pytest.approx(0.75)
    mb = {(r["op"], r["impl"]): r for r in model}
    ours = mb[("qwen3_moe_forward", "moestream")]
    assert ours["speedup"] == {"hf-eager": pytest.approx(4.0), "hf-grouped_mm": pytest.approx(2.0)}
    assert ours["error"] == pytest.approx(1e-6) and ours["params"]["seq"] == 128
    skipped = mb[("qwen3_moe_train", "hf-grouped_mm")]
    assert skipped["status"] == "skipped" and "no kernel" in skipped["reason"]
    # the table
    assert "stream / decode / float32 / T=1" in text and "80% link" in text and "75% link" in text
    assert "3.00x" in text and "2 GB/s" in text and "1.28e+04 tok/s" in text
    # compare: a slower decode and a faster link
    data2 = json.loads(a.read_text())
    for r in data2["rows"]:
        if r["op"] == "decode" and r["impl"] == "moestream":
            r["median_ms"] *= 2
        if r["op"] == "link":
            r["gbps"] *= 2
    b.write_text(json.dumps(data2))
    items = {it["key"][1:3]: it for it in report.compare_rows(data, data2)}
    assert items[("decode", "moestream")]["verdict"] == "slower"
    assert items[("link", "disk O_DIRECT")]["verdict"] == "faster"
    assert items[("qwen3_moe_forward", "moestream")]["verdict"] == "~"
    assert main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "stream/link" in out and "4 GB/s" in out
    if importlib.util.find_spec("matplotlib"):  # plot: rows without a time (link) are left out
        written = plots.plot(data, tmp_path / "p.png")  # one picture per suite
        suites = {r["suite"] for r in data["rows"]}
        assert (
            sorted(written) == sorted(tmp_path / f"p-{s}.png" for s in suites)
            if len(suites) > 1
            else [tmp_path / "p.png"]
        )
        assert all(p.stat().st_size > 0 for p in written)


def test_missing_dependency_skips_and_a_crash_is_an_error(monkeypatch):
    def no_accelerate(*a, **k):
        raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")

    def crash(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(suite_stream, "run_stream_suite", no_accelerate)
    monkeypatch.setattr(suite_model, "run_model_suite", crash)
    cfg = bench.BenchConfig(
        shape=bench.get_shape("tiny"),
        device="cpu",
        dtypes=[torch.float32],
        tokens=[4],
        quick=True,
        progress=False,
    )
    res = bench.run(cfg, ["stream", "model"])
    reasons = {s["suite"]: s["reason"] for s in res.skipped}
    assert "accelerate" in reasons["stream"]
    (row,) = res.rows
    assert row.suite == "model" and row.status == "error" and "boom" in row.reason
    assert run_cli(CLI + ["--suite", "model"])[0] == 1


def test_suites_import_no_transformers_or_accelerate():
    code = (
        "import sys, moestream.bench as b; b.load_suites(); "
        "assert {'model', 'stream'} <= set(b.SUITES), b.core.SUITE_IMPORT_ERRORS; "
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_slow_calls_warm_up_once():
    calls = []

    def mk(i):
        def f():
            calls.append(i)
            x = 0
            for _ in range(20000):
                x += 1

        return f

    pol = TimingPolicy(budget_s=1e-6, warmup_s=0.0, min_reps=5, max_reps=10, slow_reps=3)
    m = measure([mk(i) for i in range(4)], torch.device("cpu"), pol)
    assert m.reps == 3
    assert calls == [0, 0, 1, 2]  # one warm-up call, then the timed calls rotate through the sets
