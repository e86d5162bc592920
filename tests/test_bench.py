"""The benchmark runner (python -m moestream.bench): its machinery on tiny shapes, on CPU.

The bulk runs on the reference and on fake implementations registered by the tests. One test runs
moestream's own ops: where this build has no CPU kernel for an op yet, it registers a
reference-backed kernel for the duration of the test, so the 'moestream' rows go through the real
op schemas, fake kernels and autograd; once the native kernels are built, it runs them instead.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from io import StringIO

import pytest
import torch
from moestream import bench, reference, testing
from moestream.bench import plots, report
from moestream.bench.__main__ import main
from moestream.bench.core import Impl, Unavailable
from moestream.bench.progress import Progress
from moestream.bench.shapes import Shape
from moestream.bench.timing import Measurement, TimingPolicy, measure, quantile, repetitions

FAST = TimingPolicy(budget_s=0.002, warmup_s=0.0, min_reps=3, max_reps=6)
CLI = ["--quick", "--threads", "1", "--sets", "2", "--no-progress", "--device", "cpu"]

TINY_SHAPES = {
    "tiny-mixtral": Shape("tiny-mixtral", 48, 40, 4, 2, normalize=True, hf_family="mixtral"),
    # the routing and expert variants of the real models, at toy sizes
    "tiny-deepseek": replace(
        bench.get_shape("deepseek-v3"),
        name="tiny-deepseek",
        hidden=64,
        intermediate=24,
        num_experts=16,
        top_k=4,
        num_groups=4,
        topk_groups=2,
    ),
    "tiny-gptoss": replace(
        bench.get_shape("gpt-oss-20b"), name="tiny-gptoss", hidden=40, intermediate=24, num_experts=8, top_k=2
    ),
    "tiny-nohf": Shape("tiny-nohf", 32, 16, 4, 2),
}
for _s in TINY_SHAPES.values():
    bench.register_shape(_s, replace=True)


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(suites, shape="tiny", ops=None, dtypes=(torch.float32,), tokens=(4, 24), impls=None):
    cfg = bench.BenchConfig(
        shape=bench.get_shape(shape),
        device="cpu",
        dtypes=list(dtypes),
        tokens=list(tokens),
        quick=True,
        threads=1,
        ops=ops,
        impls=impls,
        sets=2,
        policy=FAST,
        progress=False,
    )
    return bench.run(cfg, suites)


def by_impl(rows, op=None, tokens=None):
    out = {}
    for r in rows:
        r = r if isinstance(r, dict) else r.to_dict()
        if (op is None or r["op"] == op) and (tokens is None or r["tokens"] == tokens):
            out.setdefault(r["impl"], []).append(r)
    return out


@pytest.fixture
def extra_impls():
    """Register implementations for the test; always removed afterwards."""
    added = []

    def add(suite, op, impl):
        bench.register_impl(suite, op, impl)
        added.append((suite, op, impl.name))

    yield add
    for suite, op, name in added:
        bench.unregister_impl(suite, op, name)


# ---------------------------------------------------------------------------------------------
# a full CLI run: JSON schema, ratios, rates


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "a.json"
    out = StringIO()
    old = sys.stdout
    sys.stdout = out
    try:
        rc = main(
            CLI
            + [
                "--shape",
                "tiny",
                "--tokens",
                "4,24",
                "--op",
                "grouped_mm,gated_activation,experts_fwd",
                "--json",
                str(path),
            ]
        )
    finally:
        sys.stdout = old
    return rc, out.getvalue(), path


META_KEYS = {
    "schema",
    "date",
    "device",
    "device_name",
    "cpu_model",
    "gpu_name",
    "torch",
    "transformers",
    "moestream",
    "commit",
    "dirty",
    "threads",
    "shape",
    "suites",
    "dtypes",
    "tokens",
    "quick",
    "timing",
    "ceilings",
    "argv",
}
ROW_KEYS = {
    "suite",
    "op",
    "impl",
    "role",
    "shape",
    "tokens",
    "dtype",
    "device",
    "status",
    "reason",
    "error",
    "tol",
    "median_ms",
    "p10_ms",
    "p25_ms",
    "p75_ms",
    "p90_ms",
    "spread",
    "reps",
    "sets",
    "flops",
    "bytes",
    "weight_bytes",
    "gflops",
    "gbps",
    "weight_gbps",
    "bound",
    "ceiling",
    "ceiling_fraction",
    "speedup",
    "params",
}


def test_json_schema(cli_result):
    rc, stdout, path = cli_result
    assert rc == 0, stdout
    data = json.loads(path.read_text())
    meta = data["meta"]
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["schema"] == "moestream-bench/1"
    assert meta["device"] == "cpu" and meta["threads"] == 1
    assert meta["torch"] == torch.__version__
    assert meta["shape"]["name"] == "tiny" and meta["dtypes"] == ["float32"] and meta["tokens"] == [4, 24]
    assert meta["ceilings"]["memory_bandwidth"]["gbps"] > 0
    assert meta["ceilings"]["matmul"]["float32"]["gflops"] > 0
    assert data["rows"], "no rows"
    for r in data["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["status"] in ("ok", "WRONG", "skipped", "error"), r
        if r["status"] == "ok":
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["reps"] >= FAST.min_reps and r["error"] <= r["tol"]
        else:
            assert r["reason"], r
    ops = {(r["op"], r["tokens"]) for r in data["rows"]}
    assert ops == {(op, t) for op in ("grouped_mm", "gated_activation", "experts_fwd") for t in (4, 24)}
    # the baselines of each op are all present (measured or listed as skipped with a reason)
    gmm = by_impl(data["rows"], "grouped_mm")
    assert {"moestream", "reference", "torch._grouped_mm"} <= set(gmm)
    assert {"moestream", "reference", "hf-eager", "hf-grouped_mm"} <= set(
        by_impl(data["rows"], "experts_fwd")
    )
    assert all(r["status"] == "ok" for r in gmm["reference"])


def test_ratios_and_rates_consistent_with_times(cli_result):
    _, _, path = cli_result
    rows = json.loads(path.read_text())["rows"]
    bw = json.loads(path.read_text())["meta"]["ceilings"]["memory_bandwidth"]["gbps"]
    checked = 0
    for r in rows:
        if r["status"] != "ok":
            assert r["speedup"] == {} and r["median_ms"] is None
            continue
        peers = {
            p["impl"]: p
            for p in rows
            if (p["op"], p["tokens"], p["dtype"]) == (r["op"], r["tokens"], r["dtype"])
        }
        expected = {
            n: p["median_ms"] / r["median_ms"]
            for n, p in peers.items()
            if p["role"] == "baseline" and p["status"] == "ok" and n != r["impl"]
        }
        assert set(r["speedup"]) == set(expected)
        for n, x in expected.items():
            assert r["speedup"][n] == pytest.approx(x, rel=1e-9)
            checked += 1
        t = r["median_ms"] * 1e-3
        if r["op"] in ("grouped_mm", "experts_fwd"):
            assert r["gflops"] == pytest.approx(r["flops"] / t / 1e9, rel=1e-9)
            assert r["weight_gbps"] == pytest.approx(r["weight_bytes"] / t / 1e9, rel=1e-9)
            assert r["bound"] in ("compute", "weights")
        else:
            assert r["gbps"] == pytest.approx(r["bytes"] / t / 1e9, rel=1e-9)
            assert r["ceiling_fraction"] == pytest.approx(r["gbps"] / bw, rel=1e-9)
    assert checked > 0
    # flops of the expert path: two GEMMs per routed row
    fwd = by_impl(rows, "experts_fwd", 24)["reference"][0]
    assert fwd["flops"] == reference.dense_flops(24, 64, 32, 2)


def test_table_printed(cli_result):
    _, stdout, _ = cli_result
    assert "ops / grouped_mm / float32 / T=24" in stdout
    assert "moe / experts_fwd / float32 / T=4" in stdout
    for col in (
        "median",
        "spread",
        "rate",
        "of ceiling",
        "vs reference",
        "vs torch._grouped_mm",
        "vs hf-eager",
    ):
        assert col in stdout
    assert "ceilings measured in this run" in stdout


# ---------------------------------------------------------------------------------------------
# the correctness gate


def test_wrong_implementation_flagged_and_not_timed(extra_impls):
    calls = {"wrong": 0, "right": 0}

    def wrong(case, inp):
        def run():
            calls["wrong"] += 1
            return reference.gated_activation(inp["x"], "swiglu", "concat") * 1.01

        return run

    def right(case, inp):
        def run():
            calls["right"] += 1
            return reference.gated_activation(inp["x"], "swiglu", "concat")

        return run

    extra_impls("ops", "gated_activation", Impl("fake-wrong", wrong))
    extra_impls("ops", "gated_activation", Impl("fake-right", right))
    res = run_bench(["ops"], ops=["gated_activation"], tokens=(8,))
    rows = by_impl(res.rows)
    bad = rows["fake-wrong"][0]
    assert bad["status"] == "WRONG"
    assert bad["error"] == pytest.approx(0.01, rel=1e-3) and bad["tol"] == 1e-4
    assert "relative error" in bad["reason"]
    assert bad["median_ms"] is None and bad["reps"] == 0 and bad["speedup"] == {}
    assert calls["wrong"] == 1  # checked once, never timed
    good = rows["fake-right"][0]
    assert good["status"] == "ok" and good["error"] < 1e-6
    assert calls["right"] > FAST.min_reps
    assert set(good["speedup"]) == {"reference"}
    assert "WRONG" in report.format_table(res)


def test_cli_exit_status_for_a_wrong_implementation_of_ours(extra_impls, capsys):
    extra_impls(
        "ops", "gated_activation", Impl("fake-wrong", lambda c, i: lambda: i["x"][:, : i["x"].shape[1] // 2])
    )
    rc = main(
        CLI
        + ["--shape", "tiny", "--tokens", "4", "--op", "gated_activation", "--impl", "fake-wrong,reference"]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "fake-wrong  WRONG: relative error" in out


def test_exceptions_become_rows(extra_impls):
    def raises(msg, exc=RuntimeError):
        def prepare(case, inp):
            def run():
                raise exc(msg)

            return run

        return prepare

    extra_impls("ops", "gated_activation", Impl("broken", raises("boom")))
    extra_impls("ops", "gated_activation", Impl("absent", raises("not here", Unavailable)))
    extra_impls(
        "ops", "gated_activation", Impl("broken-baseline", raises("unsupported dtype"), role="baseline")
    )
    extra_impls(
        "ops",
        "gated_activation",
        Impl("needs-x", lambda c, i: lambda: None, role="baseline", requires=lambda c: "x is not installed"),
    )
    rows = by_impl(run_bench(["ops"], ops=["gated_activation"], tokens=(4,)).rows)
    assert rows["broken"][0]["status"] == "error" and "RuntimeError: boom" in rows["broken"][0]["reason"]
    assert rows["absent"][0]["status"] == "skipped" and rows["absent"][0]["reason"] == "not here"
    # a baseline that cannot run is absent, not our bug
    assert rows["broken-baseline"][0]["status"] == "skipped"
    assert rows["needs-x"][0]["status"] == "skipped" and rows["needs-x"][0]["reason"] == "x is not installed"
    assert set(rows["reference"][0]["speedup"]) == set()


# ---------------------------------------------------------------------------------------------
# skipped baselines and suites


def test_skipped_baselines_are_listed_with_reasons(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    res = run_bench(["ops", "moe"], shape="tiny-nohf", ops=["grouped_mm", "experts_fwd"], tokens=(4,))
    gmm = by_impl(res.rows, "grouped_mm")
    assert gmm["torch._grouped_mm"][0]["status"] == "skipped"
    assert "no torch._grouped_mm" in gmm["torch._grouped_mm"][0]["reason"]
    fwd = by_impl(res.rows, "experts_fwd")
    for name in ("hf-eager", "hf-grouped_mm"):
        assert fwd[name][0]["status"] == "skipped"
        assert "no transformers experts module for shape tiny-nohf" in fwd[name][0]["reason"]
    text = report.format_table(res)
    assert "torch._grouped_mm  skipped: torch" in text


def test_unavailable_and_declined_suites():
    res = run_bench(["no-such-suite", "ops"], shape="llama-3-8b")
    reasons = {s["suite"]: s["reason"] for s in res.skipped}
    assert "not available yet" in reasons["no-such-suite"]
    assert "dense shape" in reasons["ops"]
    assert res.rows == []
    bench.load_suites()
    for name in ("model", "stream"):
        if name not in bench.SUITES:  # others add these; until then they are listed as unavailable
            assert "not available yet" in bench.core.suite_unavailable_reason(name)


def test_cli_list_and_usage_errors(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "ops",
        "moe",
        "model",
        "stream",
        "qwen3-moe-small",
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "deepseek-v3",
        "gpt-oss-20b",
        "llama-3-8b",
        "llama-3-70b",
    ):
        assert word in out
    for bad in (["--shape", "nope"], ["--dtype", "int8"], ["--suite", "nope"], ["--tokens", "4,x"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2


def test_shapes_match_the_models():
    s = bench.get_shape("deepseek-v3")
    assert (s.hidden, s.intermediate, s.num_experts, s.top_k) == (7168, 2048, 256, 8)
    assert (s.score, s.router_bias, s.num_groups, s.topk_groups, s.scale) == ("sigmoid", True, 8, 4, 2.5)
    g = bench.get_shape("gpt-oss-20b")
    assert (g.kind, g.layout, g.expert_bias, g.transpose_b, g.topk_first) == (
        "gptoss",
        "interleaved",
        True,
        False,
        True,
    )
    assert (bench.get_shape("qwen3-30b-a3b").num_experts, bench.get_shape("qwen3-30b-a3b").top_k) == (128, 8)
    assert (bench.get_shape("mixtral-8x7b").intermediate, bench.get_shape("mixtral-8x7b").top_k) == (14336, 2)
    assert not bench.get_shape("llama-3-70b").is_moe


# ---------------------------------------------------------------------------------------------
# transformers' experts modules as baselines: same weights, same results


@pytest.mark.skipif(not has_transformers(), reason="transformers is not installed")
@pytest.mark.parametrize("shape", ["tiny", "tiny-mixtral", "tiny-deepseek", "tiny-gptoss"])
def test_transformers_baselines_agree_with_the_reference(shape):
    res = run_bench(
        ["moe", "ops"], shape=shape, ops=["experts_fwd", "experts_fwd_bwd", "router_topk"], tokens=(12,)
    )
    for op in ("experts_fwd", "experts_fwd_bwd"):
        rows = by_impl(res.rows, op)
        for name in ("reference", "hf-eager", "hf-grouped_mm"):
            r = rows[name][0]
            assert r["status"] == "ok", (op, name, r["reason"])
            assert r["error"] < 1e-4
    assert by_impl(res.rows, "router_topk")["reference"][0]["status"] == "ok"


def test_low_precision_tolerance():
    res = run_bench(
        ["ops", "moe"],
        ops=["grouped_mm", "gated_activation", "unpermute", "experts_fwd"],
        dtypes=(torch.bfloat16, torch.float16),
        tokens=(16,),
    )
    for r in res.rows:
        r = r.to_dict()
        if r["impl"] in ("reference", "torch._grouped_mm"):
            assert r["status"] in ("ok", "skipped"), r
            if r["status"] == "ok":
                assert r["tol"] == 5e-2 and r["error"] < 5e-2
    assert any(r.status == "ok" and r.dtype == "bfloat16" and r.impl == "reference" for r in res.rows)


# ---------------------------------------------------------------------------------------------
# compare and plot


def test_compare_two_results(cli_result, tmp_path, capsys):
    _, _, path_a = cli_result
    a = json.loads(path_a.read_text())
    b = json.loads(path_a.read_text())
    ok = [r for r in b["rows"] if r["status"] == "ok"]
    assert len(ok) >= 3
    slow, fast = ok[0], ok[1]
    for r, f in ((slow, 2.0), (fast, 0.25)):
        for k in ("median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms"):
            r[k] *= f
    for rows in (a["rows"], b["rows"]):  # a quiet machine: the verdicts do not depend on this run's noise
        for r in rows:
            r["spread"], r["ceiling_fraction"], r["unreliable"] = 0.02, None, ""
    b["rows"].append(dict(ok[2], tokens=999))  # only in B
    path_a, path_b = tmp_path / "a.json", tmp_path / "b.json"  # A as quieted above, not as measured
    path_a.write_text(json.dumps(a))
    path_b.write_text(json.dumps(b))
    items = {it["key"]: it for it in report.compare_rows(a, b)}
    assert items[report.row_key(slow)]["verdict"] == "slower"
    assert items[report.row_key(slow)]["ratio"] == pytest.approx(2.0)
    assert items[report.row_key(fast)]["verdict"] == "faster"
    assert items[report.row_key(ok[2])]["verdict"] == "~"
    assert main(["--compare", str(path_a), str(path_b)]) == 0
    out = capsys.readouterr().out
    assert "+100.0%" in out and "SLOWER" in out and "FASTER" in out and "-75.0%" in out
    n = len(a["rows"])
    assert f"{n} matching rows: 1 faster, 1 slower" in out
    assert f"0 rows only in {path_a}, 1 only in {path_b}" in out


def test_noise_threshold():
    base = {
        "suite": "s",
        "op": "o",
        "impl": "i",
        "shape": "x",
        "tokens": 1,
        "dtype": "float32",
        "device": "cpu",
        "status": "ok",
        "median_ms": 1.0,
        "p25_ms": 0.9,
        "p75_ms": 1.1,
    }
    a = {"meta": {}, "rows": [base]}
    # saved without a spread: the 20% IQR each side -> [0.8, 1.2] around each median
    for factor, verdict in ((1.3, "~"), (1.6, "slower"), (0.6, "faster")):
        b = {"meta": {}, "rows": [dict(base, median_ms=factor, p25_ms=0.9 * factor, p75_ms=1.1 * factor)]}
        (it,) = report.compare_rows(a, b)
        assert it["verdict"] == verdict, factor


def test_compare_needs_the_change_to_exceed_both_spreads():
    base = {
        "suite": "s",
        "op": "o",
        "impl": "i",
        "shape": "x",
        "tokens": 1,
        "dtype": "float32",
        "device": "cpu",
        "status": "ok",
        "median_ms": 1.0,
        "spread": 0.1,
    }
    a = {"meta": {}, "rows": [base]}
    cases = [
        (dict(median_ms=1.15), "~"),  # [1.035, 1.265] overlaps [0.9, 1.1]
        (dict(median_ms=1.3), "slower"),
        (dict(median_ms=0.75), "faster"),
        (dict(median_ms=1.03, spread=0.001), "~"),  # under 5%: never called
        (dict(median_ms=1.3, spread=0.3), "~"),  # the new run's own spread covers the change
        (dict(median_ms=0.001, spread=290.0), "unreliable"),  # a stall: +-29,000%
        (dict(median_ms=0.5, ceiling_fraction=2.12), "unreliable"),  # faster than the machine allows
    ]
    for change, verdict in cases:
        (it,) = report.compare_rows(a, {"meta": {}, "rows": [dict(base, **change)]})
        assert it["verdict"] == verdict, change


def test_unreliable_rows_are_flagged_in_the_table():
    from moestream.bench.core import unreliable_reason

    assert unreliable_reason(0.8, 0.05) == ""
    assert "212% of its ceiling" in unreliable_reason(2.12, 0.05)
    assert "spread +-29000%" in unreliable_reason(None, 290.0)
    row = {
        "suite": "s",
        "op": "o",
        "impl": "moestream",
        "role": "ours",
        "shape": "x",
        "tokens": 1,
        "dtype": "float32",
        "device": "cpu",
        "status": "ok",
        "median_ms": 1.0,
        "spread": 0.05,
        "ceiling": "matmul",
        "ceiling_fraction": 2.12,
        "gflops": 10.0,
    }
    text = report.format_table({"meta": {}, "rows": [row, dict(row, impl="other", ceiling_fraction=0.5)]})
    lines = [ln for ln in text.splitlines() if ln.startswith(("  moestream ", "  other "))]
    assert "UNRELIABLE: 212% of its ceiling" in lines[0] and "UNRELIABLE" not in lines[1]
    assert "1 rows UNRELIABLE" in text


def test_plot_written(cli_result, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, _, path = cli_result
    png = tmp_path / "plot.png"
    assert main(["--load", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for suite in ("ops", "moe"):  # one picture per suite, beside the path given
        one = tmp_path / f"plot-{suite}.png"
        assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot written to {one}" in out
    assert not png.exists()


def _synthetic_row(suite, op, impl, role, tokens, median_ms, **extra):
    row = {"suite": suite, "op": op, "impl": impl, "role": role, "shape": "s", "tokens": tokens}
    row.update(dtype="float32", device="cpu", status="ok", median_ms=median_ms, p10_ms=median_ms)
    row.update(p90_ms=median_ms, speedup={}, params={}, tokens_per_s=median_ms and tokens / median_ms * 1e3)
    row.update(extra)
    return row


def test_plot_picks_a_picture_per_suite(tmp_path):
    """Each suite's rows go to its own plotter (model: bars per phase; ep: step time and
    all-to-all bytes), a run of one suite is drawn at the path itself, and a row that failed does
    not break its picture."""
    pytest.importorskip("matplotlib")
    R = _synthetic_row
    model = [
        R("model", f"{m}_{ph}", impl, role, 128, t, params={"model": m, "phase": ph, "batch": 1, "seq": 128})
        for m in ("qwen3_moe", "mixtral")
        for ph in ("forward", "train")
        for impl, role, t in (("hf-eager", "baseline", 90.0), ("moestream", "ours", 30.0))
    ]
    model.append(dict(model[0], impl="hf-grouped_mm", status="skipped", median_ms=None, tokens_per_s=None))
    ep = [
        R("ep", "train_step", impl, role, T, t * T)
        for T in (16, 1024)
        for impl, role, t in (("single-process", "baseline", 1.0), ("moestream-ep2", "ours", 1.5))
    ]
    ep += [
        R(
            "ep",
            "a2a_bytes",
            "moestream-ep2",
            "ours",
            T,
            None,
            params={"measured_bytes": 1e5 * T, "theoretical_bytes": 1e5 * T, "ratio": 1.0},
        )
        for T in (16, 1024)
    ]
    meta = {"device_name": "cpu", "date": "today", "shape": {"name": "s"}}
    written = plots.plot({"meta": meta, "rows": model + ep}, tmp_path / "run.png")
    assert written == [tmp_path / "run-model.png", tmp_path / "run-ep.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert plots.plot({"meta": meta, "rows": ep}, tmp_path / "ep.png") == [tmp_path / "ep.png"]


def test_plot_without_matplotlib_says_so(monkeypatch, cli_result, tmp_path, capsys):
    _, _, path = cli_result
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["--load", str(path), "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# timing, progress, extension points


def test_measure_rotates_sets_and_respects_rep_limits():
    seen = [0, 0, 0]

    def call(i):
        def run():
            seen[i] += 1

        return run

    pol = TimingPolicy(budget_s=0.001, warmup_s=0.0, min_reps=4, max_reps=9)
    m = measure([call(0), call(1), call(2)], torch.device("cpu"), pol)
    assert pol.min_reps <= m.reps <= pol.max_reps
    assert all(c >= 2 for c in seen)  # every set: warm-up and timed calls
    assert m.p10_ms <= m.median_ms <= m.p90_ms


def test_quantiles():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile(xs, 0.5) == 3.0 and quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 5.0
    assert quantile(xs, 0.1) == pytest.approx(1.4)
    m = Measurement([4.0, 1.0, 3.0, 2.0, 5.0])
    assert m.median_ms == 3.0 and m.spread == pytest.approx((4.6 - 1.4) / 6)
    assert math.isnan(quantile([], 0.5))


def test_progress_bar_lines():
    buf = StringIO()
    p = Progress(4, stream=buf)
    p.advance(1, "ops grouped_mm T=4 float32 reference", "0.1 ms")
    p.advance(3, "done", "ok")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[") and " 25%" in lines[0] and "reference: 0.1 ms" in lines[0]
    assert "100%" in lines[1]


def test_register_a_suite():
    """The extension point another suite uses: one module with @register_suite."""

    @bench.register_suite("unit-axpy", help="y = 2x + y")
    def axpy_suite(cfg):
        def case(T):
            def make(seed):
                g = torch.Generator().manual_seed(seed)
                return {"x": torch.randn(T, generator=g), "y": torch.randn(T, generator=g)}

            return bench.Case(
                "unit-axpy",
                "axpy",
                cfg.shape,
                T,
                torch.float32,
                cfg.device,
                make,
                reference=lambda i: 2 * i["x"].double() + i["y"].double(),
                check=lambda out, ref, i: bench.Check(testing.rel_err(out, ref), 1e-6),
                work=lambda i: bench.Work(bytes=3 * 4 * T),
                impls=[
                    Impl("mine", lambda c, i: lambda: torch.add(i["y"], i["x"], alpha=2)),
                    Impl("plain", lambda c, i: lambda: 2 * i["x"] + i["y"], role="baseline"),
                ],
            )

        return [case(T) for T in cfg.tokens]

    try:
        res = run_bench(["unit-axpy"], tokens=(100, 1000))
        rows = by_impl(res.rows)
        assert [r["status"] for r in rows["mine"]] == ["ok", "ok"]
        assert set(rows["mine"][0]["speedup"]) == {"plain"}
        assert rows["mine"][0]["bound"] == "memory"
    finally:
        bench.SUITES.pop("unit-axpy", None)


def test_memory_precheck_skips_cases_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(bench.core, "available_memory", lambda device: 1 << 10)
    rows = run_bench(["ops"], ops=["grouped_mm"], tokens=(4,)).rows
    assert rows and all(r.status == "skipped" and "GiB available" in r.reason for r in rows)


# ---------------------------------------------------------------------------------------------
# moestream's own ops through the bench


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _act_grad(grad, x, kind, layout, alpha, limit):
    acc = _acc(x)
    xf, gf = x.to(acc), grad.to(acc)
    if layout == "concat":
        g, u = xf.chunk(2, dim=-1)
    else:
        g, u = xf[..., ::2], xf[..., 1::2]
    if kind == "swiglu":
        s = torch.sigmoid(g)
        dg, du = gf * u * s * (1 + g * (1 - s)), gf * g * s
    elif kind == "geglu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        pdf = torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
        dg, du = gf * u * (cdf + g * pdf), gf * g * cdf
    else:
        gc, uc = g.clamp(max=limit), u.clamp(-limit, limit)
        s = torch.sigmoid(alpha * gc)
        dg = gf * (uc + 1) * (s + gc * alpha * s * (1 - s)) * (g <= limit)
        du = gf * gc * s * ((u >= -limit) & (u <= limit))
    d = torch.cat([dg, du], -1) if layout == "concat" else torch.stack([dg, du], -1).flatten(-2)
    return d.to(x.dtype)


def _unpermute_backward(grad_y, y_sorted, perm, weights, needs_weights_grad):
    acc = _acc(y_sorted)
    g = torch.zeros(y_sorted.shape, dtype=acc)
    gy = grad_y.to(acc)
    for s in range(perm.shape[1]):
        g.index_add_(0, perm[:, s], gy if weights is None else gy * weights[:, s : s + 1].to(acc))
    if weights is not None and needs_weights_grad:
        gw = (gy.unsqueeze(1) * y_sorted[perm].to(acc)).sum(-1)
    else:
        gw = torch.empty(0, dtype=acc)
    return g.to(y_sorted.dtype), gw


def _weight_grad(a, grad_out, offsets, transpose_b):
    acc = _acc(a)
    E, K, N = offsets.shape[0], a.shape[1], grad_out.shape[1]
    out = torch.zeros((E, N, K) if transpose_b else (E, K, N), dtype=acc)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            w = a[start:end].to(acc).t() @ grad_out[start:end].to(acc)
            out[g] = w.t() if transpose_b else w
        start = end
    return out.to(a.dtype)


def _bias_grad(grad_out, offsets):
    acc = _acc(grad_out)
    out = torch.zeros(offsets.shape[0], grad_out.shape[1], dtype=acc)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[g] = grad_out[start:end].to(acc).sum(0)
        start = end
    return out.to(grad_out.dtype)


_REFERENCE_KERNELS = {
    "router_topk": reference.router_topk,
    "permute": reference.permute,
    "unpermute": reference.unpermute,
    "unpermute_backward": _unpermute_backward,
    "grouped_mm": reference.grouped_mm,
    "grouped_mm_weight_grad": _weight_grad,
    "grouped_bias_grad": _bias_grad,
    "gated_activation": reference.gated_activation,
    "gated_activation_backward": _act_grad,
    "moe_experts": reference.moe_experts,
}


@pytest.fixture
def moestream_cpu_ops():
    """moestream's CPU kernels; reference-backed stand-ins for the ones this build lacks."""
    lib = torch.library.Library("moestream", "IMPL")
    stand_ins = []
    for name, fn in _REFERENCE_KERNELS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moestream::{name}", "CPU"):
            lib.impl(name, fn, "CPU")
            stand_ins.append(name)
    yield stand_ins
    lib._destroy()


@pytest.mark.parametrize("shape", ["tiny", "tiny-gptoss"])
def test_moestream_rows(moestream_cpu_ops, shape):
    suites_ops = None if shape == "tiny" else ["grouped_mm", "gated_activation", "experts_fwd_bwd"]
    res = run_bench(["ops", "moe"], shape=shape, ops=suites_ops, tokens=(6,))
    ours = [r for r in res.rows if r.impl == "moestream"]
    assert ours
    for r in ours:
        assert r.status == "ok", (r.op, r.status, r.reason)
        peers = [p for p in res.rows if p.op == r.op and p.role == "baseline" and p.status == "ok"]
        assert peers and set(r.speedup) == {p.impl for p in peers}
        for p in peers:
            assert r.speedup[p.impl] == pytest.approx(p.median_ms / r.median_ms)


def test_repetition_count_follows_the_budget():
    pol = TimingPolicy(budget_s=1.0, warmup_s=0.0, min_reps=5, max_reps=100, slow_reps=3)
    assert repetitions(0.001, pol) == 100  # capped
    assert repetitions(0.05, pol) == 20  # budget / call time
    assert repetitions(0.3, pol) == 5  # at least min_reps while that stays within twice the budget
    assert repetitions(2.0, pol) == 3  # very slow calls: slow_reps


def test_ceilings_best_of_start_and_end(monkeypatch, tmp_path, capsys):
    # the ceilings are measured before the first row and after the last; the better measurement
    # judges every row, and both measurements are kept in the JSON
    from moestream.bench import ceilings as _ceilings

    rates = iter([50.0, 80.0])
    bws = iter([10.0, 7.0])
    monkeypatch.setattr(
        _ceilings,
        "measure_matmul",
        lambda *a, **k: {"op": "torch.mm", "m": 1, "k": 1, "n": 1, "gflops": next(rates)},
    )
    monkeypatch.setattr(
        _ceilings, "measure_bandwidth", lambda *a, **k: {"op": "copy", "bytes": 1, "gbps": next(bws)}
    )
    path = tmp_path / "c.json"
    args = ["--shape", "tiny", "--tokens", "8", "--op", "grouped_mm,gated_activation", "--json", str(path)]
    assert main(CLI + args) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())
    ceil = data["meta"]["ceilings"]
    assert ceil["matmul"]["float32"]["gflops"] == 80.0 and ceil["memory_bandwidth"]["gbps"] == 10.0
    assert [m["matmul"]["float32"]["gflops"] for m in ceil["measurements"]] == [50.0, 80.0]
    judged = 0
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        if r["gflops"] is not None:
            assert r["matmul_fraction"] == pytest.approx(r["gflops"] / 80.0)
            judged += 1
        elif r["gbps"] is not None:
            assert r["bandwidth_fraction"] == pytest.approx(r["gbps"] / 10.0)
            judged += 1
    assert judged >= 2
