"""PNG plots of an ablation grid (matplotlib, Agg); input: ``trainer.experiments.ablate.summarize`` rows."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data.generate import PLANTED_GROUPS
from data.stats import BUCKETS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(g: dict) -> str:
    return g["mode"] if g["weight"] is None else f"{g['mode']} w={g['weight']:g}"


def _mean(xs) -> float:
    v = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else math.nan


def _std(xs) -> float:
    v = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    by: dict[tuple, list[dict]] = {}
    for g in rows:
        if g["seeds"]:
            by.setdefault((g["model"], g["optimizer"]), []).append(g)
    return by



def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def auc_vs_epoch(out: Path, rows: list[dict]) -> Path | None:
    panels = _panels(rows)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, ((model, opt), gs) in zip(axes[0], panels.items()):
        for g in gs:
            by_epoch: dict[int, list[float]] = {}
            for hist in g["history"]:
                for ep, auc, _ in hist:
                    by_epoch.setdefault(ep, []).append(auc)
            eps = sorted(by_epoch)
            ax.plot(eps, [_mean(by_epoch[e]) for e in eps], marker="o", label=_label(g))
        ax.set_title(f"{model} / {opt}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test AUC (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "auc_vs_epoch.png")


def bucket_bars(out: Path, rows: list[dict], buckets: tuple[str, ...], name: str, title: str) -> Path | None:
    panels = _panels(rows)
    present = [b for b in buckets if any(b in g["auc"] for g in rows)]
    if not panels or not present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, ((model, opt), gs) in zip(axes[0], panels.items()):
        width = 0.8 / max(1, len(gs))
        for i, g in enumerate(gs):
            m = [_mean(g["auc"].get(b, [])) for b in present]
            s = [_std(g["auc"].get(b, [])) for b in present]
            ax.bar(np.arange(len(present)) + i * width, m, width, yerr=s, label=_label(g), capsize=2)
        ax.set_xticks(np.arange(len(present)) + 0.4 - width / 2, present)
        finite = [v for g in gs for b in present for v in g["auc"].get(b, []) if v is not None and not math.isnan(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 0.02), min(1.0, hi + 0.01))
        ax.set_title(f"{model} / {opt}: {title}")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, out / f"{name}.png")


def lambda_grid(out: Path, rows: list[dict], feature_key: str = "transfer_loss") -> Path | None:
    """Transfer loss vs test AUC over the fixed-weight grid (paper's Figure 2 shape); lexico modes and
    the baseline are drawn as reference points."""
    pts = [g for g in rows if g["seeds"] and g["weight"] is not None]
    if not pts:
        return None
    plt = _plt()
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, ((model, opt), gs) in zip(axes[0], panels.items()):
        for g in gs:
            tl = [v for k, vs in g["transfer"].items() if k.endswith("." + feature_key) for v in vs]
            x, y = _mean(tl), _mean(g["auc"].get("all", []))
            if g["mode"] == "baseline":
                ax.axhline(y, color="grey", ls="--", lw=1, label="baseline")
                continue
            if math.isnan(x):
                continue
            marker = "o" if g["weight"] is not None else "*"
            ax.scatter([x], [y], marker=marker, s=60 if marker == "*" else 30,
                       color={"plus_t": "C0", "select": "C1", "lexico": "C2", "both": "C3"}.get(g["mode"], "k"))
            ax.annotate(_label(g), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("transfer loss (mean over the best epoch's steps)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{model} / {opt}: transfer loss vs AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "lambda_grid.png")


def make_all(out: Path, rows: list[dict]) -> list[Path]:
    made = [auc_vs_epoch(out, rows),
            bucket_bars(out, rows, ("all", *BUCKETS), "bucket_auc", "AUC per bucket"),
            bucket_bars(out, rows, PLANTED_GROUPS, "group_auc", "planted groups"),
            lambda_grid(out, rows)]
    return [p for p in made if p is not None]
