"""``tailrec tune``: hyper-parameter search for one config with Optuna, driving the real trainer.

    tailrec tune --config configs/ml_latest_deepfm.yaml --out reports/tune_x --trials 20 \\
        --space embedding.optimizer.lr=10:1000:log --space embedding.optimizer.lr_max=1:50:log \\
        --space embedding.optimizer.counter_form=fbgemm,paper  [--nproc 2] [--a.b=c ...]

* Search: Optuna's TPE sampler (seeded), median pruning on the validation AUC of each epoch
  (``MedianPruner``: a trial whose valid AUC after epoch k is below the median of earlier trials at k is
  stopped), SQLite storage in ``<out>/study.db``: an interrupted study resumes where it stopped (the
  interrupted trial is marked failed and re-drawn).
* Each trial is one trainer run (``python -m trainer train`` or torchrun with ``--nproc``) with run_dir
  ``<out>/trials/<number>``, built by trainer.launch; the trainer writes one line per evaluation to
  ``progress.jsonl``, which is what the pruner reads while the trial runs. The trial's value is its best
  valid AUC (model selection is on valid; test numbers are reported, never optimised).
* ``--space NAME=LOW:HIGH[:log]`` (float), ``NAME=LOW:HIGH:int`` (integer), ``NAME=a,b,c`` (categorical);
  NAME is any dotted config field.
* Output: a table of every trial (printed and ``<out>/README.md``), ``trials.json``, and ``tune.png``
  (valid AUC per epoch of every trial, and the value against each parameter).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer import launch
from trainer.results import PROGRESS


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                  # float | int | cat
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "cat":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def parse_space(items: list[str]) -> list[Param]:
    out = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--space {item!r}: expected NAME=LOW:HIGH[:log|:int] or NAME=a,b,c")
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "int")):
                raise ValueError(f"--space {item!r}: expected LOW:HIGH, LOW:HIGH:log or LOW:HIGH:int")
            low, high = float(parts[0]), float(parts[1])
            if not low < high:
                raise ValueError(f"--space {item!r}: LOW must be below HIGH")
            kind = "int" if len(parts) == 3 and parts[2] == "int" else "float"
            log = len(parts) == 3 and parts[2] == "log"
            if log and low <= 0:
                raise ValueError(f"--space {item!r}: a log range needs LOW > 0")
            out.append(Param(name, kind, low, high, log))
        else:
            out.append(Param(name, "cat", choices=tuple(_scalar(c) for c in spec.split(","))))
    return out


def _scalar(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_progress(run_dir: Path) -> list[dict]:
    path = run_dir / PROGRESS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:     # a line being written right now
            break
    return out


def run_trial(trial, params: list[Param], a: argparse.Namespace, extra: list[str]) -> float:
    import optuna

    values = {p.name: p.suggest(trial) for p in params}
    run_dir = Path(a.out) / "trials" / f"{trial.number:04d}"
    overrides = [f"--run_dir={run_dir}", "--checkpoint.resume=false", *extra,
                 *(f"--{k}={v}" for k, v in values.items())]
    cmd = launch.trainer_command("train", a.config, overrides, nproc=a.nproc)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(launch.shown(cmd) + "\n")
    with (run_dir / "train.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=launch.REPO, env=launch.subprocess_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    reported = 0
    try:
        while True:
            done = proc.poll() is not None
            prog = read_progress(run_dir)
            for e in prog[reported:]:
                trial.report(e["valid"]["all"]["auc"], e["epoch"])
                reported += 1
                if trial.should_prune():
                    raise optuna.TrialPruned(f"valid AUC {e['valid']['all']['auc']:.4f} after epoch {e['epoch']}")
            if done:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"trial {trial.number} failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    res = json.loads((run_dir / "results.json").read_text())
    best = res["best"]
    trial.set_user_attr("test", {k: v.get("auc") for k, v in best["test"].items()})
    trial.set_user_attr("best_epoch", best["epoch"])
    trial.set_user_attr("ms_per_step", res["ms_per_step"])
    return float(best["valid"]["all"]["auc"])


def summarize(study, out: Path, params: list[Param], command: str) -> str:
    import optuna

    rows = []
    for t in study.trials:
        test = t.user_attrs.get("test", {})
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "best_epoch": t.user_attrs.get("best_epoch"), "test": test,
                     "curve": [v for _, v in sorted(t.intermediate_values.items())]})
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=float))
    names = [p.name for p in params]
    buckets = sorted({b for r in rows for b in r["test"]}, key=lambda b: ("all", "head", "torso", "tail").index(b)
                     if b in ("all", "head", "torso", "tail") else 9)
    head = ["#", "state", *_short(names), "valid AUC", "epoch", *[f"test {b}" for b in buckets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = [r for r in rows if r["value"] is not None]
    for r in sorted(done, key=lambda r: -r["value"]) + [r for r in rows if r["value"] is None]:
        cells = [str(r["number"]), r["state"].lower()]
        cells += [_fmt_param(r["params"].get(n)) for n in names]
        cells += ["—" if r["value"] is None else f"{r['value']:.4f}", str(r["best_epoch"] or "—")]
        cells += [f"{r['test'][b]:.4f}" if r["test"].get(b) is not None else "—" for b in buckets]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = f"best trial {study.best_trial.number}: {study.best_trial.params}, valid AUC {study.best_value:.4f}" \
        if complete else "no complete trial"
    (out / "README.md").write_text(f"# tailrec tune: {out.name}\n\nCommand:\n\n```\n{command}\n```\n\n{best}\n\n"
                                   "Value = best validation AUC of the trial; trials sorted by it. Pruned trials "
                                   "stopped early by the median rule.\n\n" + table + "\n\n![tune](tune.png)\n")
    _plot(out, rows, names)
    return best + "\n" + table


def _short(names: list[str]) -> list[str]:
    """Column names: the last part of each dotted name, or the last two where the last parts collide."""
    last = [n.split(".")[-1] for n in names]
    return [".".join(n.split(".")[-2:]) if last.count(x) > 1 else x for n, x in zip(names, last)]


def _fmt_param(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _plot(out: Path, rows: list[dict], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = [n for n in names if any(isinstance(r["params"].get(n), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(num), figsize=(4.5 * (1 + len(num)), 3.6), squeeze=False)
    ax = axes[0][0]
    for r in rows:
        if r["curve"]:
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], alpha=0.6,
                    ls="--" if r["state"] == "PRUNED" else "-")
    ax.set(xlabel="epoch", ylabel="valid AUC", title="trials (dashed: pruned)")
    for ax, n in zip(axes[0][1:], num):
        pts = [(r["params"][n], r["value"]) for r in rows if r["value"] is not None and n in r["params"]]
        if pts:
            ax.scatter(*zip(*pts))
            vals = [p for p, _ in pts]
            if min(vals) > 0 and max(vals) / min(vals) > 20:
                ax.set_xscale("log")
        ax.set(xlabel=n.split(".")[-1], ylabel="best valid AUC")
    fig.tight_layout()
    fig.savefig(out / "tune.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    a, extra = _parser().parse_known_args(argv)
    return run(a, extra)


def run(a: argparse.Namespace, extra: list[str]) -> int:
    import optuna

    params = parse_space(a.space)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=a.study or out.name, storage=f"sqlite:///{out.resolve() / 'study.db'}", load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=a.seed, n_startup_trials=a.startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=a.startup, n_warmup_steps=a.warmup_epochs))
    for t in study.trials:                       # a trial cut off by an interrupted study: mark it failed
        if t.state == optuna.trial.TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    todo = a.trials - sum(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in study.trials)
    print(f"tune: {len(study.trials)} trials in {out / 'study.db'}, {max(todo, 0)} to run", flush=True)
    if todo > 0:
        study.optimize(lambda t: run_trial(t, params, a, extra), n_trials=todo, catch=(RuntimeError,))
    command = "tailrec tune " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["tune"] else [])
    print(summarize(study, out, params, command))
    return 0


def _parser(prog: str = "tailrec tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="study directory (study.db, trials/, README.md, tune.png)")
    p.add_argument("--space", action="append", default=[], required=True,
                   help="NAME=LOW:HIGH[:log|:int] or NAME=a,b,c (repeat)")
    p.add_argument("--trials", type=int, default=20, help="complete+pruned trials wanted in the study")
    p.add_argument("--nproc", type=int, default=1, help="ranks per trial (torchrun)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--startup", type=int, default=4, help="random trials before TPE; also the pruner's startup")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs before a trial may be pruned")
    p.add_argument("--study", default="", help="study name in the database (default: the out folder's name)")


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="Optuna search (TPE, median pruning, SQLite resume) over config "
                                           "fields; drives the real trainer")
    _add_args(p)
    p.set_defaults(func=lambda args, overrides: run(args, overrides), takes_overrides=True)


if __name__ == "__main__":
    sys.exit(main())
