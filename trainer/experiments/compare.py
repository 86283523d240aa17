"""``tailrec compare``: named variants of one config x seeds, against the first variant as the control.

    tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset \\
        --out reports/multi_embedding --seeds 0,1,2 \\
        --variant "single: --model.num_embeddings=1" --variant "multi4: --model.num_embeddings=4" \\
        --tables movie_id,user_id  [--jobs 2] [--nproc 2] [--a.b=c ...  passed to every run]

Runs go through ``trainer.experiments.ablate.run_grid`` (one trainer process per run, ``<out>/runs/
<variant>-s<seed>``, finished runs skipped, so an interrupted comparison resumes). The report
(``<out>/README.md``, ``summary.json``, ``compare.png``) gives, per variant, the test AUC / log loss at the
best-valid evaluation overall and per head/torso/tail bucket (mean ± sample std over seeds), the
difference to the control paired by seed, ms/step, and the information abundance of ``--tables``
(trainer/diagnostics.py) at that evaluation; the plot shows valid AUC and abundance per epoch.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.diagnostics import SETS_SUFFIX
from trainer.experiments.ablate import (add_grid_args, fmt_ms, load_runs, mean_std, report_head, run_grid,
                                        save_report)
from trainer.results import compact_json

BUCKETS = ("all", "head", "torso", "tail")
GROUPS = ("twin", "loner")     # planted groups (data.generate), shown when the runs report them


@dataclass(frozen=True)
class Variant:
    label: str
    args: tuple[str, ...]
    seed: int

    @property
    def name(self) -> str:            # run directory (ablate.run_grid's combo interface)
        return f"{self.label}-s{self.seed}"

    def overrides(self) -> list[str]:
        return [*self.args, f"--train.seed={self.seed}"]


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``"label: --a.b=1 --c.d=x"`` -> (label, overrides)."""
    label, sep, rest = text.partition(":")
    label = label.strip()
    if not sep or not label or not all(c.isalnum() or c in "_-." for c in label):
        raise ValueError(f"--variant {text!r}: expected 'label: --a.b=c ...' (label: letters, digits, _ - .)")
    args = tuple(shlex.split(rest))
    bad = [a for a in args if not a.startswith("--") or "=" not in a]
    if bad:
        raise ValueError(f"--variant {label}: overrides must look like --a.b=c, got {bad}")
    return label, args


def expand(variants: list[tuple[str, tuple[str, ...]]], seeds: list[int]) -> list[Variant]:
    labels = [v[0] for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique: {labels}")
    return [Variant(label, args, s) for label, args in variants for s in seeds]


# ------------------------------------------------------------------------------ collect
def _best(r: dict) -> dict:
    return r.get("best") or {}


def _abundance(entry: dict, table: str, group: str) -> float:
    """A multi-embedding run's feature is its K sets side by side (``<table>__sets``, the same total width
    as the single table), so that is what stands for ``table`` when present."""
    collapse = entry.get("collapse") or {}
    g = (collapse.get(table + SETS_SUFFIX) or collapse.get(table) or {}).get("groups", {}).get(group)
    return math.nan if g is None else g["abundance"]


def collect(variants: list[Variant], runs: dict[str, dict], tables: list[str]) -> list[dict]:
    """One row per label: per-seed metric lists (None where a run is missing) in seed order."""
    rows: dict[str, dict] = {}
    for v in variants:
        row = rows.setdefault(v.label, {"label": v.label, "args": list(v.args), "seeds": [], "auc": {},
                                        "logloss": {}, "ms_per_step": [], "abundance": {}, "history": []})
        r = runs.get(v.name)
        row["seeds"].append(v.seed if r else None)
        best = _best(r) if r else {}
        for b in BUCKETS + GROUPS:
            m = (best.get("test") or {}).get(b) or {}
            row["auc"].setdefault(b, []).append(m.get("auc"))
            row["logloss"].setdefault(b, []).append(m.get("logloss"))
        row["ms_per_step"].append(r.get("ms_per_step") if r else None)
        for t in tables:
            for grp in ("all", "tail"):
                row["abundance"].setdefault(f"{t}.{grp}", []).append(_abundance(best, t, grp) if r else None)
        row["history"].append([] if not r else [
            {"epoch": h["epoch"], "valid_auc": h["valid"]["all"]["auc"],
             **{t: _abundance(h, t, "all") for t in tables},
             **{f"{t}.tail": _abundance(h, t, "tail") for t in tables}} for h in r.get("history", [])])
    return list(rows.values())


def _paired(xs: list, ys: list) -> tuple[float, float, int]:
    d = [y - x for x, y in zip(xs, ys) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    return mean_std(d)


# ------------------------------------------------------------------------------ report
def _columns(rows: list[dict]) -> tuple[str, ...]:
    return BUCKETS + tuple(g for g in GROUPS if any(v is not None for r in rows for v in r["auc"].get(g, [])))


def markdown(rows: list[dict], tables: list[str]) -> str:
    ctrl, cols = rows[0], _columns(rows)
    lines = ["Test AUC at the best-valid evaluation, mean ± std over seeds (n = finished seeds):", "",
             "| variant | n | " + " | ".join(f"AUC {b}" for b in cols) + " | log loss all | ms/step |",
             "|---|---:|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        n = sum(s is not None for s in r["seeds"])
        cells = [fmt_ms(*mean_std(r["auc"][b])[:2]) for b in cols]
        ms = mean_std(r["ms_per_step"])[0]
        lines.append(f"| {r['label']} | {n} | " + " | ".join(cells) + f" | {fmt_ms(*mean_std(r['logloss']['all'])[:2])}"
                     f" | {ms:.1f} |")
    lines += ["", f"Difference to `{ctrl['label']}` paired by seed, AUC points x100 (mean ± std of the "
              "per-seed differences):", "", "| variant | " + " | ".join(f"Δ {b}" for b in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for r in rows[1:]:
        cells = []
        for b in cols:
            m, s, n = _paired(ctrl["auc"][b], r["auc"][b])
            cells.append("n/a" if not n else f"{100 * m:+.2f} ± {100 * s:.2f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if tables:
        keys = [f"{t}.{g}" for t in tables for g in ("all", "tail")]
        lines += ["", "Information abundance at the best-valid evaluation (trained rows; all / tail bucket), "
                  f"mean ± std over seeds (multi-embedding: the K sets side by side, `<table>{SETS_SUFFIX}`):", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['label']} | " + " | ".join(fmt_ms(*mean_std(r["abundance"][k])[:2], digits=2)
                                                         for k in keys) + " |")
    lines += ["", "Variants (overrides on top of the command's):", ""]
    lines += [f"- `{r['label']}`: `{' '.join(r['args']) or '(none)'}`" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], tables: list[str], path: Path) -> Path | None:
    if not any(h for r in rows for h in r["history"]):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    keys = ["valid_auc", *tables]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, r in enumerate(rows):
            # abundance: all trained rows solid, the tail bucket dashed
            for k, style in ((key, "-"), (f"{key}.tail", "--")) if key != "valid_auc" else ((key, "-"),):
                per_epoch: dict[int, list[float]] = {}
                for hist in r["history"]:
                    for h in hist:
                        if h.get(k) is not None and not math.isnan(h[k]):
                            per_epoch.setdefault(h["epoch"], []).append(h[k])
                if per_epoch:
                    ep = sorted(per_epoch)
                    ax.plot(ep, [np.mean(per_epoch[e]) for e in ep], style, marker="o", markersize=3,
                            color=colors[i % len(colors)], label=r["label"] if style == "-" else None)
        ax.set_title("valid AUC (mean over seeds)" if key == "valid_auc"
                     else f"information abundance: {key} (dashed: tail)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def slim_results(out: Path, tables: list[str]) -> int:
    """Keep, in the runs' results.json files, the singular values of ``tables`` (and their multi-embedding
    sets) at the best evaluation only; rows and abundance stay everywhere. A Criteo run's full spectra at
    every evaluation are ~0.4 MB, too much to commit per run. Returns the number of files rewritten."""
    keep = set(tables) | {t + SETS_SUFFIX for t in tables}
    n = 0
    for p in sorted((out / "runs").glob("*/results.json")):
        r = json.loads(p.read_text())
        changed = False
        for i, entry in enumerate([r.get("best") or {}, *r.get("history", [])]):
            for table, c in (entry.get("collapse") or {}).items():
                if i == 0 and table in keep:
                    continue
                for g in c["groups"].values():
                    if g.pop("singular_values", None) is not None:
                        changed = True
        if changed:
            p.write_text(compact_json(r) + "\n")
            n += 1
    return n


def write_report(out: Path, variants: list[Variant], tables: list[str], title: str, command: str,
                 notes: str = "") -> Path:
    runs = load_runs(out)
    rows = collect(variants, runs, tables)
    png = plot(rows, tables, out / "compare.png")
    text = report_head(title, command, notes, [v.name for v in variants], runs) + [markdown(rows, tables)]
    if png:
        text += [f"![valid AUC and information abundance per epoch]({png.name})", ""]
    return save_report(out, text, rows)


# ------------------------------------------------------------------------------ CLI
def _compare(args, overrides: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        variants = expand([parse_variant(v) for v in args.variant], [int(s) for s in args.seeds.split(",") if s])
    except ValueError as e:
        from trainer.config_base import ConfigError

        raise ConfigError(str(e)) from None
    tables = [t for t in args.tables.split(",") if t]
    command = args.command_text or "tailrec " + shlex.join(sys.argv[1:])
    rc = 0
    if not args.report_only:
        res = run_grid(variants, args.config, args.data, out, args.jobs, args.nproc, overrides)
        rc = 1 if res["failed"] else 0
    if args.slim:
        slim_results(out, tables)
    notes = Path(args.notes).read_text() if args.notes else ""
    print(f"report: {write_report(out, variants, tables, args.title or f'Comparison: {out.name}', command, notes)}")
    return rc


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="named config variants x seeds against a control; Markdown report")
    add_grid_args(p)
    p.add_argument("--variant", action="append", required=True, help="'label: --a.b=c ...'; the first is the control")
    p.add_argument("--tables", default="", help="tables whose information abundance the report shows")
    p.add_argument("--slim", action="store_true",
                   help="keep singular values in the runs' results.json only for --tables (abundance is kept)")
    p.set_defaults(func=_compare, takes_overrides=True)
