"""Run results as JSON and a Markdown table (overall and per frequency bucket)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(results: dict) -> str:
    best = results.get("best") or {}
    lines = [f"Best valid AUC at epoch {best.get('epoch')} (step {best.get('step')}); test numbers at that point.",
             "", "| split | bucket | examples | AUC | log loss | NE |", "|---|---|---:|---:|---:|---:|"]
    for split in ("valid", "test"):
        for bucket, m in (best.get(split) or {}).items():
            lines.append(f"| {split} | {bucket} | {m['examples']} | {_fmt(m['auc'])} | {_fmt(m['logloss'])} "
                         f"| {_fmt(m['ne'])} |")
    return "\n".join(lines + _collapse_lines(best.get("collapse"))) + "\n"


def _collapse_lines(collapse: dict | None) -> list[str]:
    """Information abundance per table and row group at the selected evaluation (trainer/diagnostics.py)."""
    if not collapse:
        return []
    groups = ("all", "head", "torso", "tail")
    lines = ["", "Information abundance (sum of singular values / largest) of the trained rows:", "",
             "| table | method | dim | " + " | ".join(groups) + " |", "|---|---|---:|" + "---:|" * len(groups)]
    for table, r in collapse.items():
        g = r["groups"]
        dim = len(g["all"]["singular_values"])
        cells = [_fmt(g[k]["abundance"]) if k in g else "—" for k in groups]
        lines.append(f"| {table} | {r['method']} | {dim} | " + " | ".join(cells) + " |")
    return lines


def compact_json(obj, width: int = 110, indent: str = "") -> str:
    """JSON with every value that fits in ``width`` characters on one line (nested ones broken up):
    the same data as ``json.dumps(indent=...)`` in a fraction of the lines."""
    flat = json.dumps(obj, default=float)
    if len(flat) + len(indent) <= width or not isinstance(obj, (dict, list)) or not obj:
        return flat
    inner = indent + "  "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(str(k))}: {compact_json(v, width, inner).lstrip()}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    items = [inner + compact_json(v, width, inner).lstrip() for v in obj]
    return "[\n" + ",\n".join(items) + f"\n{indent}]"


def write_results(run_dir: str | Path, results: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(compact_json(results) + "\n")
    (run_dir / "results.md").write_text(markdown(results))
    return run_dir / "results.json"


PROGRESS = "progress.jsonl"


def append_progress(run_dir: str | Path, entry: dict) -> None:
    """One JSON line per evaluation (epoch, step, valid/test metrics) while the run goes on: what
    `tailrec tune` reads to prune a trial early, and a record of a run that is later killed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / PROGRESS).open("a") as f:
        f.write(json.dumps({k: entry[k] for k in ("epoch", "step", "valid", "test")}, default=float) + "\n")

