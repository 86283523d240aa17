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
    return "\n".join(lines) + "\n"


def write_results(run_dir: str | Path, results: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (run_dir / "results.md").write_text(markdown(results))
    return run_dir / "results.json"
