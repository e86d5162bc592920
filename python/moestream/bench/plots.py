"""Plots: one picture per suite of a result (its JSON form, as :mod:`moestream.bench.report` reads
it). ``plot`` routes each suite to its picture (``PLOTTERS``; the timed suites' generic one
otherwise); matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

from .report import _as_dict, _unreliable


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
