"""tailrec ablate: a tiny grid runs, resumes without re-running finished combos, and its tables carry
the numbers of the runs' results.json files."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trainer import launch
from trainer.experiments.ablate import Combo, expand_grid, fmt_ms, mean_std

REPO = launch.REPO


def test_expand_grid_weights_only_for_fixed_weight_modes():
    g = expand_grid(["baseline", "plus_t", "lexico"], ["cfsgd:0.1"], ["deepfm"], [0, 1], [0.01, 1.0])
    names = [c.name for c in g]
    assert len(g) == 2 + 4 + 2
    assert "deepfm-cfsgd@0.1-plus_t-w0.01-s1" in names and "deepfm-cfsgd@0.1-lexico-s0" in names
    assert all(c.lr == 0.1 for c in g)
    c = Combo("autoint", "rowwise_adagrad", None, "both", None, 2)
    assert "--transfer.mode=both" in c.overrides() and "--train.seed=2" in c.overrides()


def _ablate(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = launch.trainer_command("ablate", REPO / "configs/movielens_deepfm.yaml", [
        "--data", str(data), "--modes", "baseline,lexico", "--optimizers", "cfsgd:0.1", "--models", "deepfm",
        "--seeds", "0", "--out", str(out), "--jobs", "2", "--train.epochs=1", "--train.max_steps=4",
        "--data.batch_size=256", "--data.eval_batch_size=2048", "--transfer.features=[movie_id]",
        "--train.log_every=1000", *extra])
    proc = subprocess.run(cmd, cwd=REPO, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.dist
def test_tiny_grid_runs_resumes_and_reports(tiny_ml, tmp_path):
    out = tmp_path / "abl"
    first = _ablate(out, tiny_ml)
    assert "2 to run" in first.stdout
    res = {n: json.loads((out / "runs" / n / "results.json").read_text())
           for n in ("deepfm-cfsgd@0.1-baseline-s0", "deepfm-cfsgd@0.1-lexico-s0")}
    assert not (out / "runs" / "deepfm-cfsgd@0.1-baseline-s0" / "checkpoints").exists()
    lex = res["deepfm-cfsgd@0.1-lexico-s0"]["best"]
    assert "lambda_active_ratio" in lex["transfer"]["movie_id"]
    assert lex["transfer"]["movie_id"]["domain"]["target_used"] > 0
    mtime = (out / "runs" / "deepfm-cfsgd@0.1-lexico-s0" / "results.json").stat().st_mtime
    second = _ablate(out, tiny_ml)
    assert "2 already done, 0 to run" in second.stdout
    assert (out / "runs" / "deepfm-cfsgd@0.1-lexico-s0" / "results.json").stat().st_mtime == mtime
    readme = (out / "README.md").read_text()
    for name, r in res.items():
        auc = r["best"]["test"]["all"]["auc"]
        assert fmt_ms(*mean_std([auc])[:2]) in readme, (name, auc)
        tail = r["best"]["test"]["tail"]["auc"]
        assert fmt_ms(*mean_std([tail])[:2]) in readme
    assert (out / "auc_vs_epoch.png").stat().st_size > 1000
    assert (out / "bucket_auc.png").exists()


def test_mean_std_is_sample_std():
    m, s, n = mean_std([0.7, 0.8, 0.9, float("nan")])
    assert n == 3 and abs(m - 0.8) < 1e-12 and abs(s - 0.1) < 1e-12
