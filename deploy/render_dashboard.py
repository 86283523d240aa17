"""Render the Grafana dashboard's panels to a PNG from recorded scrapes, without Prometheus/Grafana.

A scrape sample is ``(timestamp, exposition text)``; for several ranks, the texts of all ranks'
``/metrics`` scraped at one time are concatenated (every series carries ``rank``). The panels'
PromQL from ``deploy/grafana/dashboard.json`` is evaluated by a small evaluator covering the subset
the dashboard uses -- selectors with matchers, ``rate``/``increase`` over a range, ``sum/max/min/avg/
count [by (...)]``, ``histogram_quantile``, ``time()``, numbers and ``+ - * /`` -- so the picture
shows what the dashboard shows. Unsupported PromQL raises ``PromQLError`` naming the query.

    python -m deploy.render_dashboard record --url http://127.0.0.1:9400/metrics \\
        --url http://127.0.0.1:9401/metrics --interval 2 --count 60 --out runs/demo/scrapes.jsonl
    python -m deploy.render_dashboard render runs/demo/scrapes.jsonl --out runs/demo/dashboard.png
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).with_name("grafana") / "dashboard.json"
# Values for dashboard variables: all ranks, validation split.
VARIABLES = {"rank": ".*", "split": "valid"}
Frame = tuple[float, dict]  # (timestamp, {(name, frozenset(labels)): value})
Vector = dict  # frozenset(labels) -> float


class PromQLError(ValueError):
    pass


# ---------------------------------------------------------------- input
def parse_scrape(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): float(s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def load_samples(items) -> list[tuple[float, str]]:
    """Accepts ``(timestamp, text)`` pairs and/or paths to JSONL files of {"timestamp", "text"}."""
    out: list[tuple[float, str]] = []
    for item in items if isinstance(items, (list, tuple)) else [items]:
        if isinstance(item, (str, Path)):
            for line in Path(item).read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    out.append((float(rec["timestamp"]), rec["text"]))
        else:
            ts, text = item
            out.append((float(ts), text))
    return sorted(out, key=lambda s: s[0])


def scrape(urls: list[str], timeout: float = 5.0) -> tuple[float, str]:
    """One sample: every URL scraped now, texts concatenated (unreachable ranks are skipped)."""
    texts = []
    for url in urls:
        try:
            texts.append(urllib.request.urlopen(url, timeout=timeout).read().decode())
        except OSError:
            pass
    return time.time(), "\n".join(texts)


def record(urls: list[str], out_jsonl: str | Path, interval: float = 2.0, count: int = 30) -> None:
    with open(out_jsonl, "a") as f:
        for i in range(count):
            ts, text = scrape(urls)
            f.write(json.dumps({"timestamp": ts, "text": text}) + "\n")
            f.flush()
            if i + 1 < count:
                time.sleep(interval)


# ---------------------------------------------------------------- PromQL subset
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<str>\"[^\"]*\")|(?P<dur>\[[^\]]+\])"
                    r"|(?P<op>=~|!~|!=|[-+*/(){},=])|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*))")
_AGGS = {"sum": sum, "max": max, "min": min, "avg": statistics.fmean, "count": len}


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise PromQLError(f"cannot tokenize {expr!r} at {expr[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _seconds(dur: str, step: float) -> float:
    body = dur.strip("[]").strip()
    if body == "$__rate_interval":  # Grafana: at least 4 scrape intervals
        return 4 * step
    m = re.fullmatch(r"(\d+)([smhd])", body)
    if not m:
        raise PromQLError(f"unsupported range {dur}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class _Eval:
    """Recursive-descent evaluation of one expression at frame index ``i`` (instant query)."""

    def __init__(self, expr: str, frames: list[Frame], i: int, step: float):
        self.expr, self.toks, self.p = expr, _tokens(expr), 0
        self.frames, self.i, self.step = frames, i, step

    def peek(self, k: int = 0):
        return self.toks[self.p + k] if self.p + k < len(self.toks) else (None, None)

    def take(self, want: str | None = None) -> str:
        kind, val = self.peek()
        if val is None or (want is not None and val != want):
            raise PromQLError(f"{self.expr!r}: expected {want or 'more'}, got {val!r}")
        self.p += 1
        return val

    def run(self):
        v = self.expr_()
        if self.p != len(self.toks):
            raise PromQLError(f"{self.expr!r}: trailing {self.toks[self.p:]}")
        return v

    def expr_(self):
        v = self.term()
        while self.peek()[1] in ("+", "-"):
            v = _binop(self.take(), v, self.term())
        return v

    def term(self):
        v = self.atom()
        while self.peek()[1] in ("*", "/"):
            v = _binop(self.take(), v, self.atom())
        return v

    def atom(self):
        kind, val = self.peek()
        if kind == "num":
            self.p += 1
            return float(val)
        if val == "(":
            self.take("(")
            v = self.expr_()
            self.take(")")
            return v
        if kind != "id":
            raise PromQLError(f"{self.expr!r}: unexpected {val!r}")
        if val in _AGGS:
            return self.aggregate()
        if val == "time":
            self.p += 1
            self.take("(")
            self.take(")")
            return self.frames[self.i][0]
        if val in ("rate", "increase"):
            self.p += 1
            self.take("(")
            name, match = self.selector()
            window = _seconds(self.take_kind("dur"), self.step)
            self.take(")")
            return self.range_fn(val, name, match, window)
        if val == "histogram_quantile":
            self.p += 1
            self.take("(")
            q = float(self.take_kind("num"))
            self.take(",")
            v = self.expr_()
            self.take(")")
            return _histogram_quantile(q, v)
        name, match = self.selector()
        return {lbl: val for (n, lbl), val in self.frames[self.i][1].items() if n == name and match(lbl)}

    def take_kind(self, kind: str) -> str:
        if self.peek()[0] != kind:
            raise PromQLError(f"{self.expr!r}: expected {kind}, got {self.peek()[1]!r}")
        return self.take()

    def aggregate(self):
        fn = _AGGS[self.take()]
        by: tuple[str, ...] = ()
        if self.peek()[1] == "by":
            self.take()
            self.take("(")
            labels = []
            while self.peek()[1] != ")":
                labels.append(self.take_kind("id"))
                if self.peek()[1] == ",":
                    self.take()
            self.take(")")
            by = tuple(labels)
        self.take("(")
        v = self.expr_()
        self.take(")")
        groups = defaultdict(list)
        for lbl, x in v.items():
            if not math.isnan(x):
                groups[frozenset((k, val) for k, val in lbl if k in by)].append(x)
        return {g: float(fn(xs)) for g, xs in groups.items()}

    def selector(self):
        name = self.take_kind("id")
        matchers = []
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                label, op = self.take_kind("id"), self.take()
                raw = self.take_kind("str")[1:-1]
                raw = re.sub(r"\$(\w+)", lambda m: VARIABLES.get(m.group(1), m.group(0)), raw)
                matchers.append((label, op, raw))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")

        def match(lbl: frozenset) -> bool:
            d = dict(lbl)
            for label, op, want in matchers:
                have = d.get(label, "")
                ok = have == want if op in ("=", "!=") else re.fullmatch(want, have) is not None
                if ok == (op in ("!=", "!~")):
                    return False
            return True

        return name, match

    def range_fn(self, fn: str, name: str, match, window: float) -> Vector:
        t_now = self.frames[self.i][0]
        points = defaultdict(list)
        for t, values in self.frames[: self.i + 1]:
            if t_now - t <= window:
                for (n, lbl), val in values.items():
                    if n == name and match(lbl):
                        points[lbl].append((t, val))
        out = {}
        for lbl, pts in points.items():
            if len(pts) < 2:
                continue
            inc = sum(b if b < a else b - a for (_, a), (_, b) in zip(pts, pts[1:]))  # counter resets
            out[lbl] = inc / (pts[-1][0] - pts[0][0]) if fn == "rate" else inc
        return out


def _binop(op: str, a, b):
    def f(x: float, y: float) -> float:
        if op == "/":
            return x / y if y else math.nan
        return {"+": x + y, "-": x - y, "*": x * y}[op]

    if isinstance(a, float) and isinstance(b, float):
        return f(a, b)
    if isinstance(a, float):
        return {k: f(a, y) for k, y in b.items()}
    if isinstance(b, float):
        return {k: f(x, b) for k, x in a.items()}
    return {k: f(a[k], b[k]) for k in a.keys() & b.keys()}  # one-to-one on identical label sets


def _histogram_quantile(q: float, v: Vector) -> Vector:
    groups = defaultdict(list)
    for lbl, x in v.items():
        d = dict(lbl)
        le = d.pop("le")
        groups[frozenset(d.items())].append((float(le), x))
    out = {}
    for g, buckets in groups.items():
        buckets.sort()
        total = buckets[-1][1]
        if not total:
            continue
        rank, lo, prev = q * total, 0.0, 0.0
        for upper, cum in buckets:
            if cum >= rank:
                if math.isinf(upper):  # Prometheus returns the largest finite bound
                    out[g] = lo
                else:
                    out[g] = lo + (upper - lo) * ((rank - prev) / (cum - prev) if cum > prev else 1.0)
                break
            lo, prev = upper, cum
    return out


def evaluate(expr: str, frames: list[Frame]) -> dict[frozenset, list[tuple[float, float]]]:
    """Range query over all frames: series (label set) -> [(t, value)]."""
    if not frames:
        return {}
    gaps = [b[0] - a[0] for a, b in zip(frames, frames[1:])]
    step = statistics.median(gaps) if gaps else 15.0
    series = defaultdict(list)
    for i, (t, _) in enumerate(frames):
        v = _Eval(expr, frames, i, step).run()
        for lbl, x in ({frozenset(): v} if isinstance(v, float) else v).items():
            if not math.isnan(x):
                series[lbl].append((t, x))
    return dict(series)


def legend(fmt: str, labels: frozenset) -> str:
    d = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt) or "value"


# ---------------------------------------------------------------- drawing
def panels(dashboard: str | Path = DASHBOARD) -> list[dict]:
    return [p for p in json.loads(Path(dashboard).read_text())["panels"] if p.get("type") != "row"]


def render(scrape_files_or_series, out_png: str | Path, dashboard: str | Path = DASHBOARD) -> dict[str, int]:
    """One subplot per dashboard panel; returns {panel title: number of series drawn}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [(t, parse_scrape(text)) for t, text in load_samples(scrape_files_or_series)]
    ps = panels(dashboard)
    cols = 3
    rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    t0 = frames[0][0] if frames else 0.0
    drawn = {}
    for ax, panel in zip(axes.flat, ps):
        n = 0
        for target in panel["targets"]:
            for lbl, pts in sorted(evaluate(target["expr"], frames).items(), key=lambda kv: sorted(kv[0])):
                ax.plot([t - t0 for t, _ in pts], [x for _, x in pts], marker="." if len(pts) < 3 else None,
                        label=legend(target.get("legendFormat", ""), lbl))
                n += 1
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"] + (f"  [{unit}]" if unit not in ("", "short", "none") else ""), fontsize=10)
        ax.set_xlabel("seconds since first scrape", fontsize=8)
        ax.tick_params(labelsize=8)
        if n:
            ax.legend(fontsize=7, loc="upper left")  # "best" costs seconds on 18 panels
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        drawn[panel["title"]] = n
    for ax in list(axes.flat)[len(ps):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.05, right=0.98, top=0.96, bottom=0.05, hspace=0.45, wspace=0.2)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.render_dashboard", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="scrape rank endpoints periodically into a JSONL file")
    rec.add_argument("--url", action="append", required=True)
    rec.add_argument("--interval", type=float, default=2.0)
    rec.add_argument("--count", type=int, default=30)
    rec.add_argument("--out", required=True)
    ren = sub.add_parser("render", help="draw the dashboard's panels from recorded scrapes")
    ren.add_argument("scrapes", nargs="+")
    ren.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.url, args.out, args.interval, args.count)
    else:
        for title, n in render(args.scrapes, args.out).items():
            print(f"{n:3d} series  {title}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
