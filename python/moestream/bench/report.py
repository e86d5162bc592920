"""Output: the terminal table, JSON results, comparison of two result files, plots.

Everything here works on the JSON form of a result (``BenchResult.to_dict()`` or a loaded file),
so a saved run can be printed, compared and plotted later.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

SCHEMA = "moestream-bench/1"
MIN_NOISE = 0.05  # changes under 5% are never flagged by --compare

# ---------------------------------------------------------------------------------------------
# formatting helpers


def fmt_time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 0.1:
        return f"{ms * 1e3:.2f} us"
    if ms < 1000:
        return f"{ms:.4g} ms"
    return f"{ms / 1e3:.3g} s"


def _fmt_rate(giga: float | None, unit: str) -> str:
    """A rate given in giga-units per second, with the prefix that reads best (M, G or T)."""
    if giga is None:
        return "-"
    for scale, prefix in ((1e3, "T"), (1.0, "G")):
        if giga >= scale:
            return f"{giga / scale:.3g} {prefix}{unit}/s"
    return f"{giga * 1e3:.3g} M{unit}/s"


def fmt_flops(gflops: float | None) -> str:
    return _fmt_rate(gflops, "FLOP")


def fmt_gbps(gbps: float | None) -> str:
    return _fmt_rate(gbps, "B")


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _sanitize(o):
    if isinstance(o, float):
        if math.isnan(o):
            return None
        if math.isinf(o):
            return "inf" if o > 0 else "-inf"
        return o
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_sanitize(v) for v in o]
    return o


def _as_dict(result) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


# ---------------------------------------------------------------------------------------------
# JSON


def write_json(result, path: str | Path) -> None:
    data = _sanitize(_as_dict(result))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")


def load_json(path: str | Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise ValueError(f"{path} is not a moestream bench result (no 'meta' and 'rows')")
    return data


# ---------------------------------------------------------------------------------------------
# the table


def _header(meta: dict) -> list[str]:
    dev = meta.get("device", "?")
    name = meta.get("device_name") or ""
    commit = meta.get("commit")
    commit_s = (commit[:10] + (" (modified)" if meta.get("dirty") else "")) if commit else "unknown"
    lines = [
        (
            f"moestream bench | {dev}: {name} | {meta.get('threads')} CPU threads | torch {meta.get('torch')}"
            f" | transformers {meta.get('transformers') or 'not installed'} | moestream {meta.get('moestream')}"
            f" commit {commit_s} | {meta.get('date')}"
        ),
    ]
    shape = meta.get("shape") or {}
    if shape and shape.get("num_experts"):
        lines.append(
            f"shape {shape.get('name')}: hidden {shape.get('hidden')}, intermediate {shape.get('intermediate')}, "
            f"{shape.get('num_experts')} experts, top-{shape.get('top_k')}, {shape.get('kind')}/{shape.get('layout')}"
        )
    elif shape:
        lines.append(
            f"shape {shape.get('name')}: dense, hidden {shape.get('hidden')}, intermediate "
            f"{shape.get('intermediate')}, {shape.get('num_layers')} layers"
        )
    ceil = meta.get("ceilings") or {}
    parts = []
    bw = ceil.get("memory_bandwidth")
    if bw:
        parts.append(
            f"memory bandwidth {fmt_gbps(bw.get('gbps'))} (copy of {bw.get('bytes', 0) / 2**20:.0f} MiB)"
        )
    for dt, mm in (ceil.get("matmul") or {}).items():
        parts.append(
            f"{dt} matmul {fmt_flops(mm.get('gflops'))} (torch.mm {mm.get('m')}x{mm.get('k')}x{mm.get('n')})"
        )
    if parts:
        lines.append("ceilings measured in this run: " + "; ".join(parts))
    return lines


def _group_key(r: dict) -> tuple:
    return (r["suite"], r["op"], r["dtype"], r["tokens"])


def _params_desc(params: dict) -> str:
    keep = [(k, v) for k, v in params.items() if k != "T" and not isinstance(v, dict)]
    return " ".join(f"{k}={v}" for k, v in keep)


def fmt_tokens(tps: float | None) -> str:
    if tps is None:
        return "-"
    return f"{tps:.4g} tok/s" if tps < 1e6 else f"{tps / 1e6:.3g} Mtok/s"


def _rate(r: dict) -> str:
    if r.get("gflops") is not None:
        return fmt_flops(r["gflops"])
    if r.get("gbps") is not None:
        return fmt_gbps(r["gbps"])
    return fmt_tokens(r.get("tokens_per_s"))


def _ceiling(r: dict) -> str:
    frac = r.get("ceiling_fraction")
    if frac is None:
        return "-"
    if r.get("bound") == "weights":
        return f"{fmt_pct(frac)} bw (weights {fmt_gbps(r.get('weight_gbps'))})"
    ceiling = r.get("ceiling")
    if ceiling in ("link", "budget"):  # the stream suite: the link it streams over, the memory budget
        return f"{fmt_pct(frac)} {ceiling}"
    return f"{fmt_pct(frac)} {'mm' if ceiling == 'matmul' else 'bw'}"


def _table(headers: list[str], body: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [len(h) for h in headers]
    for row in body:
        cells = row[:1] if len(row) == 2 else row[: len(headers)]  # a spanning reason sets no width
        for i, c in enumerate(cells):
            widths[i] = max(widths[i], len(c))
    out = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in body:
        if len(row) == 2:  # status + reason spanning the remaining columns
            out.append(indent + row[0].ljust(widths[0]) + "  " + row[1])
        else:
            out.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return out


def format_table(result) -> str:
    data = _as_dict(result)
    rows = data["rows"]
    lines = _header(data["meta"])
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for (suite, op, dtype, tokens), grp in groups.items():
        baselines = [r["impl"] for r in grp if r["role"] == "baseline"]
        lines.append("")
        lines.append(
            f"{suite} / {op} / {dtype} / T={tokens}   {_params_desc(grp[0].get('params') or {})}".rstrip()
        )
        headers = ["impl", "median", "spread", "rate", "of ceiling"] + [f"vs {b}" for b in baselines]
        body = []
        for r in grp:
            if r["status"] != "ok":
                body.append([r["impl"], f"{r['status']}: {r.get('reason', '')}"])
                continue
            sp = r.get("speedup") or {}
            body.append(
                [
                    r["impl"],
                    fmt_time(r.get("median_ms")),
                    "-" if r.get("spread") is None else f"+-{100 * r['spread']:.1f}%",
                    _rate(r),
                    _ceiling(r),
                ]
                + [f"{sp[b]:.2f}x" if b in sp else "-" for b in baselines]
                + ([f"UNRELIABLE: {_unreliable(r)}"] if _unreliable(r) else [])
            )
        if any(len(b) > len(headers) for b in body):
            headers = [*headers, "note"]
        lines.extend(_table(headers, body))
    lines.extend(_summary(rows))
    for s in data.get("skipped") or []:
        lines.append(f"suite {s['suite']}: skipped: {s['reason']}")
    return "\n".join(lines)


def _unreliable(r: dict) -> str:
    """The row's unreliable reason (recomputed for results saved before the field existed)."""
    from .core import unreliable_reason

    if r.get("status") != "ok":
        return ""
    return r.get("unreliable") or unreliable_reason(r.get("ceiling_fraction"), r.get("spread"))


def _summary(rows: list[dict]) -> list[str]:
    """Geometric-mean speedup of every 'ours' implementation against each baseline."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["role"] != "baseline" and r["status"] == "ok":
            for b, x in (r.get("speedup") or {}).items():
                if x and x > 0:
                    acc.setdefault((r["impl"], b), []).append(x)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out = ["", "rows: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")]
    for (impl, b), xs in sorted(acc.items()):
        gm = math.exp(sum(math.log(x) for x in xs) / len(xs))
        out.append(f"{impl} vs {b}: geometric-mean speedup {gm:.2f}x over {len(xs)} rows")
    shaky = [r for r in rows if _unreliable(r)]
    if shaky:
        out.append(
            f"{len(shaky)} rows UNRELIABLE (above the measured ceiling or a spread beyond +-50%): "
            "rerun them on a quieter machine before trusting their numbers"
        )
    wrong = [r for r in rows if r["status"] in ("WRONG", "error")]
    for r in wrong:
        out.append(
            f"{r['status']}: {r['suite']}/{r['op']} {r['dtype']} T={r['tokens']} {r['impl']}: {r.get('reason')}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# compare


def row_key(r: dict) -> tuple:
    return (r["suite"], r["op"], r["impl"], r["shape"], r["tokens"], r["dtype"], r["device"])


def _iqr_rel(r: dict) -> float:
    m, a, b = r.get("median_ms"), r.get("p25_ms"), r.get("p75_ms")
    if not m or a is None or b is None:
        return 0.0
    return (b - a) / m


def _spread(r: dict) -> float:
    """The row's relative spread: half of p10..p90 over the median (for results saved without it,
    the interquartile range over the median, which the earlier rule used)."""
    sp = r.get("spread")
    return float(sp) if sp is not None else _iqr_rel(r)


def compare_rows(a: dict, b: dict) -> list[dict]:
    """Matching rows of two results: old/new median, ratio new/old and a verdict ('slower',
    'faster', '~' within noise, 'unreliable', or a status change). A row is called slower or faster
    only when the change exceeds both runs' spreads (the intervals median +- spread do not
    overlap) and 5%; a side whose own spread is beyond +-50% or that is above its ceiling makes the
    verdict 'unreliable'."""
    old = {row_key(r): r for r in a["rows"]}
    out = []
    for r in b["rows"]:
        k = row_key(r)
        if k not in old:
            continue
        o = old[k]
        item = {
            "key": k,
            "old_ms": o.get("median_ms"),
            "new_ms": r.get("median_ms"),
            "old_status": o["status"],
            "new_status": r["status"],
            "ratio": None,
            "noise": None,
        }
        ratio = None
        s_old = s_new = 0.0
        if o["status"] == "ok" and r["status"] == "ok" and o.get("median_ms") and r.get("median_ms"):
            ratio = r["median_ms"] / o["median_ms"]
            s_old, s_new = _spread(o), _spread(r)
        elif o["status"] == "ok" and r["status"] == "ok" and o.get("gbps") and r.get("gbps"):
            # rows with a bandwidth and no time (the stream suite's link and streamer): the
            # change in the time to move the same bytes
            ratio = o["gbps"] / r["gbps"]
            item["old_gbps"], item["new_gbps"] = o["gbps"], r["gbps"]
        if ratio is not None:
            # the new interval [ratio (1 - s_new), ratio (1 + s_new)] against the old [1 - s_old, 1 + s_old]
            noise = max(MIN_NOISE, s_old + s_new)
            item["ratio"], item["noise"] = ratio, noise
            if _unreliable(o) or _unreliable(r):
                item["verdict"] = "unreliable"
            elif ratio > 1 + MIN_NOISE and ratio * (1 - s_new) > 1 + s_old:
                item["verdict"] = "slower"
            elif ratio < 1 / (1 + MIN_NOISE) and ratio * (1 + s_new) < 1 - s_old:
                item["verdict"] = "faster"
            else:
                item["verdict"] = "~"
        elif o["status"] != r["status"]:
            item["verdict"] = f"{o['status']} -> {r['status']}"
        else:
            item["verdict"] = r["status"]
        out.append(item)
    return out


def _fmt_side(item: dict, side: str) -> str:
    """One side of a compared row: its median time, or its bandwidth for a row without a time."""
    if item[f"{side}_ms"] is None and f"{side}_gbps" in item:
        return fmt_gbps(item[f"{side}_gbps"])
    return fmt_time(item[f"{side}_ms"])


def format_compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    items = compare_rows(a, b)
    lines = []
    for name, d in ((name_a, a), (name_b, b)):
        m = d["meta"]
        lines.append(
            f"{name}: {m.get('device')} {m.get('device_name')} | torch {m.get('torch')} | commit "
            f"{(m.get('commit') or 'unknown')[:10]} | {m.get('date')}"
        )
    headers = ["suite/op", "impl", "shape", "T", "dtype", "old", "new", "change", "verdict"]
    body = []
    for it in items:
        suite, op, impl, shape, tokens, dtype, _dev = it["key"]
        change = "-" if it["ratio"] is None else f"{100 * (it['ratio'] - 1):+.1f}%"
        verdict = it["verdict"]
        if verdict in ("slower", "faster"):
            verdict = f"{verdict.upper()} (noise {100 * it['noise']:.0f}%)"
        body.append(
            [
                f"{suite}/{op}",
                impl,
                shape,
                str(tokens),
                dtype,
                _fmt_side(it, "old"),
                _fmt_side(it, "new"),
                change,
                verdict,
            ]
        )
    lines.append("")
    lines.extend(_table(headers, body, indent=""))
    keys_a = {row_key(r) for r in a["rows"]}
    keys_b = {row_key(r) for r in b["rows"]}
    only_a, only_b = len(keys_a - keys_b), len(keys_b - keys_a)
    n_slow = sum(1 for it in items if it["verdict"] == "slower")
    n_fast = sum(1 for it in items if it["verdict"] == "faster")
    lines.append("")
    lines.append(
        f"{len(items)} matching rows: {n_fast} faster, {n_slow} slower, "
        f"{sum(1 for it in items if it['verdict'] == '~')} within noise, "
        f"{sum(1 for it in items if it['verdict'] == 'unreliable')} unreliable; "
        f"{only_a} rows only in {name_a}, {only_b} only in {name_b}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plot


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'moestream[plot]')"
        ) from None


def plot(result, path: str | Path) -> list[Path]:
    """One picture per suite of the run, chosen by :data:`PLOTTERS` (:func:`plot_timed` for suites
    without their own). A run of one suite is drawn at ``path``; a run of several at
    ``<stem>-<suite><suffix>`` beside it. Returns the paths written."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    data = _as_dict(result)
    suites = list(OrderedDict.fromkeys(r["suite"] for r in data["rows"])) or [""]
    p = Path(path)
    written = []
    for suite in suites:
        out = p if len(suites) == 1 else p.with_name(f"{p.stem}-{suite}{p.suffix}")
        one = {**data, "rows": [r for r in data["rows"] if r["suite"] == suite]}
        PLOTTERS.get(suite, plot_timed)(one, out)
        written.append(out)
    return written


def _impl_colors(impls) -> dict[str, str]:
    """One colour per implementation, the same in every panel of a picture."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {impl: cycle[i % len(cycle)] for i, impl in enumerate(OrderedDict.fromkeys(impls))}


def _finish(fig, data: dict, title: str, path: str | Path, handles=None, labels=None) -> None:
    """Title, one legend for the whole picture below the panels (never over the data), save."""
    m = data["meta"]
    fig.suptitle(f"{title} on {m.get('device_name')} ({str(m.get('date'))[:10]})", fontsize=10, wrap=True)
    rect_bottom = 0.0
    if handles:
        ncol = min(len(handles), 4)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rect_bottom = 0.035 * math.ceil(len(handles) / ncol) + 0.01
    fig.tight_layout(rect=(0, rect_bottom, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _no_rows(data: dict, path: str | Path, title: str, why: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.axis("off")
    ax.text(0.5, 0.5, why, ha="center", va="center")
    _finish(fig, data, title, path)


def _log_axis(ax, axis: str, ticks=None) -> None:
    """A log axis labelled with plain numbers (1, 2, 5 per decade), not 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    if ticks is not None:
        (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    else:
        a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def plot_timed(data: dict, path: str | Path) -> None:
    """Suites of timed cases (ops, moe, quant): one column per op and dtype; top, the median time
    per call against tokens (log-log, p10..p90 as error bars); bottom, the fraction of the
    machine's ceiling (matmul or bandwidth) each row reaches, 100% marked."""
    import matplotlib.pyplot as plt

    panels: OrderedDict[tuple, dict[str, list[dict]]] = OrderedDict()
    for r in data["rows"]:
        # rows with a time per call (bandwidth-only rows, e.g. the stream suite's link, have none)
        if r["status"] != "ok" or r.get("median_ms") is None or not r.get("tokens"):
            continue
        panels.setdefault((r["suite"], r["op"], r["dtype"]), {}).setdefault(r["impl"], []).append(r)
    suite = data["rows"][0]["suite"] if data["rows"] else ""
    if not panels:
        return _no_rows(data, path, f"moestream bench {suite}", "no timed rows")
    colors = _impl_colors(i for impls in panels.values() for i in impls)
    has_ceiling = any(
        r.get("ceiling_fraction") is not None
        for impls in panels.values()
        for rs in impls.values()
        for r in rs
    )
    n = len(panels)
    nrows = 2 if has_ceiling else 1
    fig, axes = plt.subplots(nrows, n, figsize=(max(5.0, 3.6 * n), 3.4 * nrows + 0.8), squeeze=False)
    handles: dict[str, object] = {}
    for j, ((_suite, op, dtype), impls) in enumerate(panels.items()):
        ax_t = axes[0][j]
        tokens = sorted({r["tokens"] for rs in impls.values() for r in rs})
        for impl, rs in impls.items():
            rs = sorted(rs, key=lambda r: r["tokens"])
            xs = [r["tokens"] for r in rs]
            ys = [r["median_ms"] for r in rs]
            lo = [max(0.0, y - (r.get("p10_ms") or y)) for y, r in zip(ys, rs)]
            hi = [max(0.0, (r.get("p90_ms") or y) - y) for y, r in zip(ys, rs)]
            c = colors[impl]
            h = ax_t.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=2, color=c, label=impl)
            handles.setdefault(impl, h)
            bad = [(x, y) for x, y, r in zip(xs, ys, rs) if _unreliable(r)]
            if bad:  # unreliable rows ringed in red
                ax_t.scatter(*zip(*bad), s=80, facecolors="none", edgecolors="red", zorder=5)
            if has_ceiling:
                fr = [
                    (r["tokens"], r["ceiling_fraction"]) for r in rs if r.get("ceiling_fraction") is not None
                ]
                if fr:
                    axes[1][j].plot([x for x, _ in fr], [100 * y for _, y in fr], marker="o", ms=4, color=c)
        ax_t.set_title(f"{op} ({dtype})", fontsize=9)
        ax_t.set_ylabel("median time per call (ms)" if j == 0 else "")
        _log_axis(ax_t, "y")
        for ax in axes[:, j]:
            _log_axis(ax, "x", tokens)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("tokens")
        if has_ceiling:
            ax_c = axes[1][j]
            ax_c.axhline(100, color="gray", linewidth=0.8, linestyle="--")
            fracs = [r.get("ceiling_fraction") or 0.0 for rs in impls.values() for r in rs]
            ax_c.set_ylim(0, 112 * max([1.0, *fracs]))
            ax_c.set_ylabel("% of measured ceiling\n(matmul or bandwidth)" if j == 0 else "")
    if any(_unreliable(r) for impls in panels.values() for rs in impls.values() for r in rs):
        from matplotlib.lines import Line2D

        handles["UNRELIABLE row"] = Line2D(
            [], [], marker="o", ms=9, linestyle="", markerfacecolor="none", markeredgecolor="red"
        )
    shape = (data["meta"].get("shape") or {}).get("name", "")
    _finish(fig, data, f"moestream bench {suite}: {shape}", path, list(handles.values()), list(handles))


def _bar_label(ax, x: float, y: float, text: str, fontsize: float = 7) -> None:
    ax.annotate(
        text, (x, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=fontsize
    )


def plot_model(data: dict, path: str | Path) -> None:
    """The model suite at a glance: one panel per phase (forward, train) and dtype; per model a
    group of bars, tokens/s of every implementation, each labelled with its speedup against
    transformers eager (the first baseline); failed rows named at the foot of their group."""
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["suite"] == "model"]
    if not rows:
        return _no_rows(data, path, "moestream bench model", "no model rows")
    phase = lambda r: (r.get("params") or {}).get("phase") or r["op"].rsplit("_", 1)[-1]
    model = lambda r: (r.get("params") or {}).get("model") or r["op"].rsplit("_", 1)[0]
    panels = list(OrderedDict.fromkeys((phase(r), r["dtype"]) for r in rows))
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    colors = _impl_colors(impls)
    base = next((r["impl"] for r in rows if r["role"] == "baseline"), None)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 5.2 * len(panels)), 4.8), squeeze=False)
    width = 0.8 / len(impls)
    handles: dict[str, object] = {}
    for ax, (ph, dtype) in zip(axes[0], panels):
        rs = [r for r in rows if phase(r) == ph and r["dtype"] == dtype]
        models = list(OrderedDict.fromkeys(model(r) for r in rs))
        top = 0.0
        for gi, mdl in enumerate(models):
            failed = []
            for ii, impl in enumerate(impls):
                r = next((r for r in rs if model(r) == mdl and r["impl"] == impl), None)
                if r is None:
                    continue
                x = gi - 0.4 + width * (ii + 0.5)
                if r["status"] != "ok" or not r.get("tokens_per_s"):
                    failed.append(f"{impl}: {r['status']}")
                    continue
                tps = r["tokens_per_s"]
                top = max(top, tps)
                bad = bool(_unreliable(r))
                h = ax.bar(x, tps, width * 0.92, color=colors[impl], hatch="//" if bad else None, label=impl)
                handles.setdefault(impl, h)
                sp = (r.get("speedup") or {}).get(base)
                _bar_label(ax, x, tps, f"{sp:.2f}x" if sp else ("1x" if impl == base else ""))
            if failed:
                ax.text(
                    gi, 0.02, "\n".join(failed), transform=ax.get_xaxis_transform(), ha="center", fontsize=6
                )
        r0 = rs[0]
        p0 = r0.get("params") or {}
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, fontsize=9)
        ax.set_ylim(0, top * 1.15 if top else 1)
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(
            f"{ph} ({dtype}): batch {p0.get('batch')} x seq {p0.get('seq')}, "
            f"{p0.get('layers')} layer{'' if p0.get('layers') == 1 else 's'}",
            fontsize=9,
        )
        ax.grid(True, axis="y", alpha=0.3)
    if any(_unreliable(r) for r in rows):
        from matplotlib.patches import Patch

        handles["hatched: UNRELIABLE (see the table)"] = Patch(
            facecolor="white", edgecolor="black", hatch="//"
        )
    title = "moestream bench model: tokens/s, bars labelled with the speedup vs " + (base or "-")
    _finish(fig, data, title, path, list(handles.values()), list(handles))


def plot_ep(data: dict, path: str | Path) -> None:
    """The ep suite at a glance, per dtype: left, the training step's time against tokens for one
    process and for two ranks (log-log, the speedup labelled); right, the bytes the forward
    all-to-alls moved per step against the theoretical bytes of uniform routing."""
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["suite"] == "ep" and r["status"] == "ok"]
    if not rows:
        return _no_rows(data, path, "moestream bench ep", "no ep rows")
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rows))
    colors = _impl_colors([r["impl"] for r in rows if r["op"] == "train_step"] + ["measured", "theoretical"])
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(10, 4.2 * len(dtypes) + 0.6), squeeze=False)
    handles: dict[str, object] = {}
    for (ax_t, ax_b), dtype in zip(axes, dtypes):
        steps = [r for r in rows if r["op"] == "train_step" and r["dtype"] == dtype and r.get("median_ms")]
        tokens = sorted({r["tokens"] for r in steps})
        for impl in OrderedDict.fromkeys(r["impl"] for r in steps):
            rs = sorted((r for r in steps if r["impl"] == impl), key=lambda r: r["tokens"])
            ys = [r["median_ms"] for r in rs]
            lo = [max(0.0, y - (r.get("p10_ms") or y)) for y, r in zip(ys, rs)]
            hi = [max(0.0, (r.get("p90_ms") or y) - y) for y, r in zip(ys, rs)]
            h = ax_t.errorbar(
                [r["tokens"] for r in rs], ys, yerr=[lo, hi], marker="o", ms=4, capsize=2, color=colors[impl]
            )
            handles.setdefault(impl, h)
            for r in rs:
                for x in (r.get("speedup") or {}).values():
                    _bar_label(ax_t, r["tokens"], r["median_ms"], f"{x:.2f}x", 7)
        ax_t.set_title(f"train step ({dtype}), world 2 vs one process (speedups labelled)", fontsize=9)
        ax_t.set_ylabel("median step time (ms)")
        ax_t.set_xlabel("tokens in total")
        if tokens:
            _log_axis(ax_t, "x", tokens)
            pad = 1.6 if len(tokens) == 1 else 1.15
            ax_t.set_xlim(tokens[0] / pad, tokens[-1] * pad)
        _log_axis(ax_t, "y")
        ax_t.grid(True, which="major", alpha=0.3)

        a2a = sorted(
            (r for r in rows if r["op"] == "a2a_bytes" and r["dtype"] == dtype), key=lambda r: r["tokens"]
        )
        for gi, r in enumerate(a2a):
            p = r.get("params") or {}
            for ii, (what, v) in enumerate(
                (("measured", p.get("measured_bytes")), ("theoretical", p.get("theoretical_bytes")))
            ):
                if v is None:
                    continue
                x = gi - 0.2 + 0.4 * ii
                h = ax_b.bar(x, v / 2**20, 0.38, color=colors[what])
                handles.setdefault(f"all-to-all bytes {what}", h)
            if p.get("ratio") is not None and p.get("measured_bytes") is not None:
                _bar_label(ax_b, gi - 0.2, p["measured_bytes"] / 2**20, f"{p['ratio']:.2f}x", 7)
        ax_b.set_xticks(range(len(a2a)))
        ax_b.set_xticklabels([f"T={r['tokens']}" for r in a2a])
        ax_b.set_ylabel("MiB per forward step (both ranks)")
        ax_b.set_title(f"forward all-to-all bytes ({dtype}), measured / theoretical labelled", fontsize=9)
        ax_b.grid(True, axis="y", alpha=0.3)
        if a2a:
            ax_b.set_ylim(0, ax_b.get_ylim()[1] * 1.12)
    shape = (data["meta"].get("shape") or {}).get("name", "")
    _finish(fig, data, f"moestream bench ep: {shape}", path, list(handles.values()), list(handles))


def plot_expert_cache(data: dict, path: str | Path) -> None:
    """The expert_cache suite at a glance: tokens/s of every method (bars, log scale) for each
    routing and batch, one panel per dtype, with the cache's floor (bytes it must read over the
    measured link) and its cold floor (every selected expert read) marked; unreliable rows hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["suite"] == "expert_cache" and r["op"].startswith("decode")]
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(10 * len(dtypes), 5.6), squeeze=False)
    handles: dict[str, object] = {}
    for ax, dtype in zip(axes[0], dtypes):
        notes: dict[int, str] = {}
        rs = [r for r in rows if r["dtype"] == dtype]
        groups = list(OrderedDict.fromkeys((r["params"].get("routing", r["op"]), r["tokens"]) for r in rs))
        impls = list(OrderedDict.fromkeys(r["impl"] for r in rs))
        width = 0.8 / max(1, len(impls))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for gi, (routing, batch) in enumerate(groups):
            for ii, impl in enumerate(impls):
                r = next(
                    (
                        r
                        for r in rs
                        if r["impl"] == impl
                        and r["tokens"] == batch
                        and r["params"].get("routing", r["op"]) == routing
                    ),
                    None,
                )
                if r is None or not r.get("tokens_per_s"):
                    continue
                x = gi - 0.4 + width * (ii + 0.5)
                bad = r["status"] != "ok"
                ax.bar(
                    x,
                    r["tokens_per_s"],
                    width,
                    color=colors[ii % len(colors)],
                    hatch="//" if bad else None,
                    alpha=0.5 if bad else 1.0,
                    label=impl if gi == 0 else None,
                )
                ax.text(
                    x,
                    r["tokens_per_s"] * 1.05,
                    f"{r['tokens_per_s']:.3g}" + ("?" if bad else ""),
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    rotation=90,
                )
                p = r.get("params") or {}
                if r["role"] == "ours" and p.get("floor_ms"):
                    ax.hlines(
                        batch / (p["floor_ms"] * 1e-3),
                        gi - 0.45,
                        gi + 0.45,
                        colors="black",
                        linewidth=1.6,
                        label="floor (cache: bytes it must read / link)" if gi == 0 else None,
                    )
                    if p.get("cold_floor_ms"):
                        ax.hlines(
                            batch / (p["cold_floor_ms"] * 1e-3),
                            gi - 0.45,
                            gi + 0.45,
                            colors="gray",
                            linestyles="dashed",
                            linewidth=1.2,
                            label="cold floor (no cache: every selected expert read)" if gi == 0 else None,
                        )
                    hr = p.get("hit_rate")
                    if hr is not None:  # under the group's name, not over its bars
                        notes[gi] = (
                            f"cache hit {100 * hr:.0f}%\ntop 10% of experts: {100 * p.get('top10_share', 0):.0f}%"
                        )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [f"routing={g}, batch {b}\n{notes.get(gi, '')}".rstrip() for gi, (g, b) in enumerate(groups)],
            fontsize=7.5,
        )
        _log_axis(ax, "y")
        ax.set_ylabel("decode tokens/s (log; higher is better)")
        ax.set_title(
            f"{rs[0]['shape']} {dtype} on {rs[0]['device']}: {(rs[0].get('params') or {}).get('model', '')}",
            fontsize=9,
        )
        ax.grid(True, axis="y", which="major", alpha=0.3)
        ymin, ymax = ax.get_ylim()
        ax.set_ylim(ymin, ymax * 1.6)  # room for the value labels above the tallest bar
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _finish(fig, data, "moestream expert cache: decode", path, list(handles.values()), list(handles))


def plot_stream(data: dict, path: str | Path) -> None:
    """The stream suite at a glance, one row of panels per dtype. Left: decode tokens/s (all
    sequences; bars, log scale, each with its value) of moestream and accelerate at every batch,
    and of the uncompressed and compressed models at batch 1; over moestream's bars a black tick
    at the link's floor (the most tokens/s the bytes streamed per step allow) and a dashed one at
    compute alone (the steps' time not spent waiting for weights). Right: the measured
    link rates (gray) against what the streamer and each moestream decode row move over the link,
    with their fraction of it. Unreliable or failed rows are hatched and marked '?'; legends sit
    below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [r for r in data["rows"] if r["suite"] == "stream"]
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(
        len(dtypes),
        2,
        figsize=(14, 5.6 * len(dtypes)),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: dict[str, str] = {}

    def color(impl: str) -> str:
        return color_of.setdefault(impl, palette[len(color_of) % len(palette)])

    def shaky(r: dict) -> bool:
        return r["status"] != "ok" or bool(_unreliable(r))

    floor_label, compute_label = (
        "link floor: bytes per step / link",
        "compute alone: step time minus its wait for weights",
    )
    for (ax, ax_bw), dtype in zip(axes, dtypes):
        rs = [r for r in rows if r["dtype"] == dtype]
        timed = [r for r in rs if r["op"] in ("decode", "compressed_decode") and r.get("tokens_per_s")]
        groups = sorted(
            OrderedDict.fromkeys((r["op"], r["tokens"]) for r in timed),
            key=lambda g: (g[0] != "decode", g[1]),
        )
        impls: list[str] = []  # of this panel, for its legend
        any_bad = False
        for gi, (op, batch) in enumerate(groups):
            grp = [r for r in timed if r["op"] == op and r["tokens"] == batch]
            width = 0.8 / len(grp)
            for ii, r in enumerate(grp):
                x = gi - 0.4 + width * (ii + 0.5)
                tps, bad, p = r["tokens_per_s"], shaky(r), r.get("params") or {}
                any_bad |= bad
                if r["impl"] not in impls:
                    impls.append(r["impl"])
                ax.bar(
                    x,
                    tps,
                    width * 0.9,
                    color=color(r["impl"]),
                    hatch="//" if bad else None,
                    alpha=0.5 if bad else 1.0,
                )
                ax.text(
                    x, tps * 1.08, f"{tps:.3g}" + ("?" if bad else ""), ha="center", va="bottom", fontsize=7
                )
                if r["impl"].startswith("moestream") and p.get("floor_ms"):
                    ax.hlines(
                        batch / (p["floor_ms"] * 1e-3),
                        x - width * 0.45,
                        x + width * 0.45,
                        colors="black",
                        linewidth=2,
                    )
                if p.get("compute_ms"):
                    ax.hlines(
                        batch / (p["compute_ms"] * 1e-3),
                        x - width * 0.45,
                        x + width * 0.45,
                        colors="dimgray",
                        linestyles="dashed",
                        linewidth=1.5,
                    )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [
                f"batch {b}" if op == "decode" else f"batch {b}, from disk:\n{dtype} vs int8 / int4"
                for op, b in groups
            ],
            fontsize=8,
        )
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s, all sequences (log)")
        model = (rs[0].get("params") or {}).get("model", "") if rs else ""
        ax.set_title(f"{dtype}: offloaded decode, {model}", fontsize=9)
        ax.grid(True, axis="y", which="major", alpha=0.3)
        if groups:
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 2.0)  # room for the value labels
            # proxies, so that an entry never takes the look of an unreliable (hatched) bar
            handles = [Patch(color=color(i), label=i) for i in impls]
            handles += [
                Line2D([], [], color="black", linewidth=2, label=floor_label),
                Line2D([], [], color="dimgray", linestyle="dashed", linewidth=1.5, label=compute_label),
            ]
            if any_bad:
                handles.append(
                    Patch(facecolor="white", edgecolor="black", hatch="//", label="unreliable (?)")
                )
            ax.legend(
                handles=handles,
                fontsize=7,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.13),
                ncol=3,
                frameon=False,
            )
        else:
            ax.text(0.5, 0.5, "no decode rows", ha="center", va="center", transform=ax.transAxes)

        # bandwidths: the link rows (gray) and what moestream moves over it
        bars: list[tuple[str, float, str, dict]] = []
        for r in rs:
            if not r.get("gbps") or r["status"] != "ok":
                continue
            if r["op"] == "link":
                bars.append((f"link: {r['impl']}", r["gbps"], "lightgray", r))
            elif r["op"] == "streamer":
                bars.append((f"streamer: {r['impl']}, no compute", r["gbps"], "gray", r))
            elif r["op"] == "decode" and r["impl"].startswith("moestream"):
                bars.append((f"decode, batch {r['tokens']}", r["gbps"], color(r["impl"]), r))
            elif r["op"] == "compressed_decode":
                what = (r.get("params") or {}).get("compress") or dtype
                bars.append((f"decode from disk, {what}", r["gbps"], color(r["impl"]), r))
        ys = list(range(len(bars)))[::-1]
        top = max([b[1] for b in bars] or [1.0])
        for y, (_, gbps, c, r) in zip(ys, bars):
            bad = shaky(r)
            ax_bw.barh(y, gbps, color=c, height=0.7, hatch="//" if bad else None, alpha=0.5 if bad else 1.0)
            frac = r.get("ceiling_fraction") if r["op"] != "link" else None
            note = f"{gbps:.2f} GB/s" + (f", {100 * frac:.0f}% of link" if frac is not None else "")
            ax_bw.text(gbps + top * 0.01, y, note + ("?" if bad else ""), va="center", fontsize=7)
        ax_bw.set_yticks(ys)
        ax_bw.set_yticklabels([b[0] for b in bars], fontsize=7)
        ax_bw.set_xlim(0, top * 1.5)
        ax_bw.set_xlabel("GB/s (decode: bytes streamed per step / time per step)", fontsize=8)
        ax_bw.set_title(f"{dtype}: the link and what moestream moves over it", fontsize=9)
        ax_bw.grid(True, axis="x", alpha=0.3)
    if not dtypes:
        axes[0][0].text(0.5, 0.5, "no stream rows", ha="center", va="center")
    m = data["meta"]
    fig.suptitle(f"moestream stream suite on {m.get('device_name')} ({str(m.get('date'))[:10]})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# suite -> its picture (suites without an entry: plot_timed)
PLOTTERS = {"model": plot_model, "ep": plot_ep, "expert_cache": plot_expert_cache, "stream": plot_stream}
