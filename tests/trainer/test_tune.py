"""``tailrec tune``: the search space grammar, and a tiny real study (Optuna TPE + median pruning on the
trainer's per-epoch valid AUC, SQLite storage) that resumes where it stopped."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import CONFIG, REPO
from trainer import launch
from trainer.experiments.tune import Param, parse_space, read_progress


def test_space_grammar():
    lr, cap, form, layers = parse_space(["embedding.optimizer.lr=10:1000:log", "embedding.optimizer.lr_max=1:50",
                                         "embedding.optimizer.counter_form=fbgemm,paper", "model.attn_layers=1:4:int"])
    assert lr == Param("embedding.optimizer.lr", "float", 10.0, 1000.0, True)
    assert cap == Param("embedding.optimizer.lr_max", "float", 1.0, 50.0, False)
    assert form.kind == "cat" and form.choices == ("fbgemm", "paper")
    assert layers.kind == "int" and (layers.low, layers.high) == (1, 4)
    for bad in ("lr", "lr=5:1", "lr=0:1:log", "lr=1:2:cubic"):
        with pytest.raises(ValueError, match="--space"):
            parse_space([bad])


def test_progress_lines_are_read_until_a_partial_one(tmp_path):
    (tmp_path / "progress.jsonl").write_text('{"epoch": 1, "valid": {"all": {"auc": 0.7}}}\n{"epoch": 2, "val')
    assert [e["epoch"] for e in read_progress(tmp_path)] == [1]


def _tune(out, tiny_ml, trials):
    cmd = launch.trainer_command("tune", CONFIG, [
        "--out", str(out), "--trials", str(trials), "--startup", "1",
        "--space", "embedding.optimizer.lr=0.01:0.2:log", "--space", "dense_optim.lr=0.0005:0.005:log",
        f"--data.path={tiny_ml}", "--data.batch_size=512", "--data.eval_batch_size=2048", "--train.epochs=2",
        "--train.log_every=1000", "--train.device=cpu"])
    return subprocess.run(cmd, cwd=REPO, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.dist
@pytest.mark.slow
def test_tiny_study_runs_reports_and_resumes(tiny_ml, tmp_path):
    out = tmp_path / "study"
    proc = _tune(out, tiny_ml, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 2 and all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    first = trials[0]
    assert first["state"] == "COMPLETE" and len(first["curve"]) == 2          # per-epoch valid AUC reported
    res = json.loads((out / "trials" / "0000" / "results.json").read_text())
    assert first["value"] == pytest.approx(res["best"]["valid"]["all"]["auc"])
    assert "| # | state | optimizer.lr | dense_optim.lr | valid AUC" in proc.stdout and (out / "tune.png").stat().st_size > 10_000
    # resuming: the study in study.db grows by exactly the missing trial
    proc = _tune(out, tiny_ml, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials in" in proc.stdout and "1 to run" in proc.stdout
    assert len(json.loads((out / "trials.json").read_text())) == 3
