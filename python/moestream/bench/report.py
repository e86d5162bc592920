"""Output: the terminal table, JSON results, comparison of two result files (the plots:
:mod:`moestream.bench.plots`).

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
