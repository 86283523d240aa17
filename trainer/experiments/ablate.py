"""``tailrec ablate``: a grid of training runs (modes x optimizers x models x seeds [x lambdas]) and a
Markdown report with tables like the harmless-transfer paper's and PNG plots.

Each combination runs as its own trainer subprocess (``python -m trainer train``, or torchrun with
``--nproc`` > 1) with ``run_dir = OUT/runs/<combo>``; a combination whose ``results.json`` exists is
skipped, so an interrupted grid resumes (a half-finished run resumes from its own checkpoint).
Up to ``--jobs`` runs in parallel. Extra ``--a.b=c`` arguments are passed to every run.
Optimizers may carry a learning rate: ``cfsgd:0.1,rowwise_adagrad:0.05``. ``--lambdas`` is the
fixed transfer weight grid; it only multiplies the plus_t / select runs (lexico modes use 1).

Report (``<out>/README.md``, rebuilt from the results.json files with ``--report-only``): test AUC and
log loss (mean +- sample std over seeds) at the best-valid evaluation, overall and per bucket
(head/torso/tail and, with ``transfer.eval_groups``, twin/loner/other), ms/step with the extra time
against the baseline of the same model/optimizer, the method's metrics (transfer loss, lambda stats,
discriminator accuracy, T'_eta kept/dropped), and plots (trainer/experiments/plots.py).
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import launch
from trainer.evaluation import RESULT_GROUPS
from trainer.results import compact_json

REPO = launch.REPO
MODES = ("baseline", "plus_t", "select", "lexico", "both")
WEIGHTED = ("plus_t", "select")
BUCKET_ORDER = RESULT_GROUPS


@dataclass(frozen=True)
class Combo:
    model: str
    optimizer: str
    lr: float | None
    mode: str
    weight: float | None
    seed: int

    @property
    def group(self) -> tuple:           # what seeds are averaged over
        return (self.model, self.opt_label, self.mode, self.weight)

    @property
    def opt_label(self) -> str:
        return self.optimizer if self.lr is None else f"{self.optimizer}@{self.lr:g}"

    @property
    def name(self) -> str:
        w = "" if self.weight is None else f"-w{self.weight:g}"
        return f"{self.model}-{self.opt_label}-{self.mode}{w}-s{self.seed}"

    def overrides(self) -> list[str]:
        o = [f"--model.name={self.model}", f"--embedding.optimizer.name={self.optimizer}",
             f"--transfer.mode={self.mode}", f"--train.seed={self.seed}"]
        if self.lr is not None:
            o.append(f"--embedding.optimizer.lr={self.lr:g}")
        if self.weight is not None:
            o.append(f"--transfer.weight={self.weight:g}")
        return o


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def expand_grid(modes: list[str], optimizers: list[str], models: list[str], seeds: list[int],
                lambdas: list[float] | None = None) -> list[Combo]:
    out = []
    for model in models:
        for opt in optimizers:
            name, _, lr = opt.partition(":")
            for mode in modes:
                if mode not in MODES:
                    raise ValueError(f"mode {mode!r} not in {MODES}")
                weights = lambdas if (lambdas and mode in WEIGHTED) else [None]
                for w in weights:
                    for seed in seeds:
                        out.append(Combo(model, name, float(lr) if lr else None, mode, w, seed))
    return out


def run_cmd(combo: Combo, config: str, data: str, run_dir: Path, nproc: int, extra: list[str]) -> list[str]:
    # later overrides win: the run's own (variant / grid point, data, run dir) go on top of the command's
    return launch.trainer_command("train", config, [*extra, *combo.overrides(), f"--data.path={data}",
                                                    f"--run_dir={run_dir}"], nproc=nproc)


def run_grid(combos: list[Combo], config: str, data: str, out: Path, jobs: int = 1, nproc: int = 1,
             extra: list[str] | None = None, keep_checkpoints: bool = False, log=print) -> dict:
    """Run the unfinished combos (up to ``jobs`` at once). Returns {"ran": [...], "skipped": [...],
    "failed": [...]}."""
    extra = list(extra or [])
    runs = out / "runs"
    todo = [c for c in combos if not (runs / c.name / "results.json").exists()]
    skipped = [c.name for c in combos if c not in todo]
    env = launch.subprocess_env()
    running: list[tuple[Combo, subprocess.Popen, float, object]] = []
    ran, failed = [], []
    pending = list(todo)
    log(f"ablate: {len(combos)} runs, {len(skipped)} already done, {len(todo)} to run ({jobs} at a time)")
    while pending or running:
        while pending and len(running) < max(1, jobs):
            c = pending.pop(0)
            rd = runs / c.name
            rd.mkdir(parents=True, exist_ok=True)
            cmd = run_cmd(c, config, data, rd, nproc, extra)
            (rd / "command.txt").write_text(launch.shown(cmd) + "\n")
            fh = open(rd / "train.log", "w")
            running.append((c, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT),
                            time.time(), fh))
        time.sleep(0.2)
        for item in list(running):
            c, proc, t0, fh = item
            if proc.poll() is None:
                continue
            running.remove(item)
            fh.close()
            rd = runs / c.name
            if proc.returncode == 0 and (rd / "results.json").exists():
                ran.append(c.name)
                if not keep_checkpoints:
                    shutil.rmtree(rd / "checkpoints", ignore_errors=True)
                log(f"  done {c.name} in {time.time() - t0:.0f}s ({len(ran) + len(failed)}/{len(todo)})")
            else:
                failed.append(c.name)
                log(f"  FAILED {c.name} (rc {proc.returncode}); see {rd / 'train.log'}")
    return {"ran": ran, "skipped": skipped, "failed": failed}


# ------------------------------------------------------------------------------ collect + report
def load_runs(out: Path) -> dict[str, dict]:
    res = {}
    for p in sorted((out / "runs").glob("*/results.json")):
        res[p.parent.name] = json.loads(p.read_text())
    return res


def mean_std(xs: list[float]) -> tuple[float, float, int]:
    v = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt_ms(m: float, s: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _best(r: dict, split: str = "test") -> dict:
    return (r.get("best") or {}).get(split) or {}


def _transfer_at_best(r: dict) -> dict:
    """Transfer metrics of the evaluation entry selected as best (per feature)."""
    best = r.get("best") or {}
    return best.get("transfer") or {}


def summarize(combos: list[Combo], runs: dict[str, dict]) -> list[dict]:
    """One row per (model, optimizer, mode, weight): metric lists over seeds, in grid order."""
    groups: dict[tuple, dict] = {}
    for c in combos:
        r = runs.get(c.name)
        g = groups.setdefault(c.group, {"model": c.model, "optimizer": c.opt_label, "mode": c.mode,
                                        "weight": c.weight, "seeds": [], "auc": {}, "logloss": {},
                                        "ms_per_step": [], "transfer": {}, "history": []})
        if r is None:
            continue
        g["seeds"].append(c.seed)
        for bucket, m in _best(r).items():
            g["auc"].setdefault(bucket, []).append(m.get("auc"))
            g["logloss"].setdefault(bucket, []).append(m.get("logloss"))
        g["ms_per_step"].append(r.get("ms_per_step"))
        g["history"].append([(h["epoch"], h["test"]["all"]["auc"], (h["test"].get("tail") or {}).get("auc"))
                             for h in r.get("history", [])])
        for feat, tm in _transfer_at_best(r).items():
            for k, v in tm.items():
                if k == "domain":
                    for dk in ("source", "target", "kept", "dropped", "target_used"):
                        g["transfer"].setdefault(f"{feat}.{dk}", []).append(v.get(dk))
                else:
                    g["transfer"].setdefault(f"{feat}.{k}", []).append(v)
    return list(groups.values())


def _mode_label(g: dict) -> str:
    return g["mode"] if g["weight"] is None else f"{g['mode']} (w={g['weight']:g})"


def markdown_tables(rows: list[dict]) -> str:
    lines = []
    buckets = [b for b in BUCKET_ORDER if any(b in g["auc"] for g in rows)]
    by_mo: dict[tuple, list[dict]] = {}
    for g in rows:
        by_mo.setdefault((g["model"], g["optimizer"]), []).append(g)
    for (model, opt), gs in by_mo.items():
        base = next((g for g in gs if g["mode"] == "baseline"), None)
        base_ms = mean_std(base["ms_per_step"])[0] if base else math.nan
        lines += [f"### {model} / {opt}", "",
                  "Test AUC at the best-valid epoch, mean ± std over seeds (n = seeds):", "",
                  "| mode | n | " + " | ".join(f"AUC {b}" for b in buckets) + " | log loss all | ms/step | extra time |",
                  "|---|---:|" + "---:|" * (len(buckets) + 3)]
        for g in gs:
            cells = [fmt_ms(*mean_std(g["auc"].get(b, []))[:2]) for b in buckets]
            ll = fmt_ms(*mean_std(g["logloss"].get("all", []))[:2])
            ms = mean_std(g["ms_per_step"])[0]
            extra = "—" if g is base or math.isnan(base_ms) or math.isnan(ms) else f"{100 * (ms / base_ms - 1):+.0f}%"
            lines.append(f"| {_mode_label(g)} | {len(g['seeds'])} | " + " | ".join(cells)
                         + f" | {ll} | {ms:.1f} | {extra} |")
        if base:
            lines += ["", "Difference to the baseline (mean over seeds, AUC points x100):", "",
                      "| mode | " + " | ".join(f"Δ {b}" for b in buckets) + " |",
                      "|---|" + "---:|" * len(buckets)]
            for g in gs:
                if g is base:
                    continue
                cells = []
                for b in buckets:
                    m, _, n = mean_std(g["auc"].get(b, []))
                    mb, _, nb = mean_std(base["auc"].get(b, []))
                    cells.append("n/a" if not n or not nb else f"{100 * (m - mb):+.2f}")
                lines.append(f"| {_mode_label(g)} | " + " | ".join(cells) + " |")
        keys = sorted({k for g in gs for k in g["transfer"]})
        if keys:
            lines += ["", "Method metrics (epoch of the best-valid evaluation, mean over its steps and seeds):", "",
                      "| mode | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
            for g in gs:
                if g["mode"] == "baseline":
                    continue
                cells = []
                for k in keys:
                    m, _, n = mean_std(g["transfer"].get(k, []))
                    cells.append("—" if not n else (f"{m:.0f}" if k.rsplit(".", 1)[1] in
                                                   ("source", "target", "kept", "dropped", "target_used")
                                                   else f"{m:.4g}"))
                lines.append(f"| {_mode_label(g)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report_head(title: str, command: str, notes: str, names: list[str], runs: dict) -> list[str]:
    """A report's first lines (title, command, notes, how many runs finished); shared with compare."""
    missing = [n for n in names if n not in runs]
    text = [f"# {title}", "", "Command (from the repository root):", "", "```", command, "```", ""]
    if notes:
        text += [notes.strip(), ""]
    return text + [f"{len(names) - len(missing)} of {len(names)} runs finished"
                   + (f"; missing: {', '.join(missing)}" if missing else "") + ".", ""]


def save_report(out: Path, text: list[str], rows: list[dict]) -> Path:
    """README.md from ``text`` and summary.json from ``rows`` (without their per-epoch history)."""
    (out / "summary.json").write_text(compact_json([{k: v for k, v in r.items() if k != "history"} for r in rows])
                                      + "\n")
    readme = out / "README.md"
    readme.write_text("\n".join(text))
    return readme


def write_report(out: Path, combos: list[Combo], title: str, command: str, notes: str = "") -> Path:
    from trainer.experiments import plots

    runs = load_runs(out)
    rows = summarize(combos, runs)
    pngs = plots.make_all(out, rows)
    text = report_head(title, command, notes, [c.name for c in combos], runs)
    text += ["Numbers: global test AUC / log loss at the evaluation with the best validation AUC; buckets by "
             "the training frequency of `data.bucket_feature` (head = top 20% of ids, tail = rarest); "
             "ms/step = training wall time / steps on this machine's shared CPU (noisy).", "",
             markdown_tables(rows)]
    for p in pngs:
        text += [f"![{p.stem}]({p.name})", ""]
    return save_report(out, text, rows)


# ------------------------------------------------------------------------------ CLI
def _ablate(args, overrides: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    combos = expand_grid(_csv(args.modes), _csv(args.optimizers), _csv(args.models),
                         [int(s) for s in _csv(args.seeds)],
                         [float(x) for x in _csv(args.lambdas)] if args.lambdas else None)
    command = "tailrec ablate " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "ablate"
                                            else _reconstruct(args, overrides))
    if args.command_text:
        command = args.command_text
    rc = 0
    if not args.report_only:
        res = run_grid(combos, args.config, args.data, out, args.jobs, args.nproc, overrides,
                       args.keep_checkpoints)
        rc = 1 if res["failed"] else 0
    notes = Path(args.notes).read_text() if args.notes else ""
    readme = write_report(out, combos, args.title or f"Ablation: {out.name}", command, notes)
    print(f"report: {readme}")
    return rc


def _reconstruct(args, overrides: list[str]) -> list[str]:
    a = ["--config", args.config, "--data", args.data, "--modes", args.modes, "--optimizers", args.optimizers,
         "--models", args.models, "--seeds", args.seeds, "--out", args.out, "--jobs", str(args.jobs)]
    if args.lambdas:
        a += ["--lambdas", args.lambdas]
    return a + list(overrides)


def add_grid_args(p) -> None:
    """The options of a grid of runs with a report (ablate and compare)."""
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="converted dataset directory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun)")
    p.add_argument("--title", default="")
    p.add_argument("--notes", default="", help="Markdown file inserted into the report")
    p.add_argument("--command-text", default="", help="command line to print in the report")
    p.add_argument("--report-only", action="store_true", help="only rebuild README.md from finished runs")


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="run a grid of transfer modes x optimizers x models x seeds; "
                                             "write a Markdown report with plots")
    add_grid_args(p)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--optimizers", default="cfsgd", help="comma list; name[:lr]")
    p.add_argument("--models", default="deepfm")
    p.add_argument("--lambdas", default="", help="fixed transfer weights for plus_t/select (grid)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.set_defaults(func=_ablate, takes_overrides=True)
