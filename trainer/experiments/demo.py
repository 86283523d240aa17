"""``tailrec demo``: the main job on the embedded default dataset, stock TorchRec against our method.

Generates a small long-tail dataset in the real raw MovieLens-1M format (with planted twin and loner rare
movies), converts it to Parquet (+ statistics), prints its long-tail profile, then trains DeepFM on
``nproc`` ranks (torchrun, gloo on CPU / NCCL on GPU) twice on the same data and seed:

* **stock**: the config with ``--method=stock`` (FBGEMM fused rowwise Adagrad, no transfer);
* **tailrec**: the config as shipped (CF-SGD and harmless transfer, ``configs/movielens_deepfm.yaml``),

and prints one comparison table (test AUC overall, per head/torso/tail bucket, on the planted twins and
loners, and time per step) plus a plot, ``<out>/comparison.png``.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from trainer import launch

DEMO_CONFIG = launch.REPO / "configs" / "movielens_deepfm.yaml"
RUNS = (("stock", ["--method=stock"]), ("tailrec", []))
COLUMNS = ("all", "head", "torso", "tail", "twin", "loner")


def prepare_dataset(out: Path, rows: int, seed: int = 0) -> Path:
    from data.convert import convert_movielens
    from data.generate import generate_movielens
    from data.stats import format_stats

    raw, ds = out / "raw", out / "dataset"
    if not (ds / "manifest.json").exists():
        generate_movielens(raw, rows=rows, seed=seed)
        convert_movielens(raw, ds)
    print(format_stats(ds))
    return ds


def _row(res: dict) -> dict:
    test = res["best"]["test"]
    out = {c: test.get(c, {}).get("auc", math.nan) for c in COLUMNS}
    return out | {"ms_per_step": res["ms_per_step"], "epoch": res["best"]["epoch"]}


def comparison_table(rows: dict[str, dict]) -> str:
    """Markdown table: one line per run, then our method minus the stock baseline (AUC points)."""
    head = "| run | " + " | ".join(f"{c} AUC" for c in COLUMNS) + " | ms/step | best epoch |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS)
                     + f" | {r['ms_per_step']:.1f} | {r['epoch']} |")
    if {"stock", "tailrec"} <= set(rows):
        a, b = rows["tailrec"], rows["stock"]
        lines.append("| tailrec - stock (pt) | " + " | ".join(f"{100 * (a[c] - b[c]):+.2f}" for c in COLUMNS)
                     + f" | {a['ms_per_step'] / b['ms_per_step']:.2f}x | |")
    return "\n".join(lines)


def comparison_plot(rows: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(np.arange(len(COLUMNS)) + i * width, [r[c] for c in COLUMNS], width, label=name)
    vals = [r[c] for r in rows.values() for c in COLUMNS if not math.isnan(r[c])]
    if vals:
        ax.set_ylim(max(0.0, min(vals) - 0.03), min(1.0, max(vals) + 0.01))
    ax.set_xticks(np.arange(len(COLUMNS)) + 0.4 - width / 2, COLUMNS)
    ax.set_ylabel("test AUC")
    ax.set_title("demo: stock TorchRec (rowwise Adagrad) vs tailrec (CF-SGD + harmless transfer)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_demo(out: str, rows: int, nproc: int, overrides: list[str]) -> int:
    """Trains from scratch every time (``--checkpoint.resume=false``): the demo shows a run, it does
    not continue the previous one (which would be refused as already finished)."""
    out_p = Path(out)
    ds = prepare_dataset(out_p, rows)
    planted = out_p / "raw" / "planted.json"
    results = {}
    for name, extra in RUNS:
        run_dir = out_p / name
        cmd = launch.trainer_command("train", DEMO_CONFIG, [
            f"--data.path={ds}", f"--run_dir={run_dir}", "--checkpoint.resume=false",
            f"--transfer.eval_groups={planted}", *extra, *overrides], nproc=nproc)
        print(f"\n=== {name} ===\n+ {launch.shown(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=launch.subprocess_env())
        if rc != 0:
            return rc
        results[name] = _row(json.loads((run_dir / "results.json").read_text()))
    table = comparison_table(results)
    (out_p / "comparison.md").write_text(table + "\n")
    plot = comparison_plot(results, out_p / "comparison.png")
    print(f"\nTest AUC at the best valid epoch, same data and seed ({nproc} rank(s)):\n{table}\n"
          f"plot: {plot}")
    return 0
