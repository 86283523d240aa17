"""Real training runs (torchrun, gloo): rank-count invariance, exact resume, resharding on load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import results, run_trainer

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# one table per sharding type and one of our kernels, so every path is exercised
MIXED = ["--embedding.tables.movie_id.sharding_type=row_wise", "--embedding.tables.zip.sharding_type=column_wise",
         "--embedding.tables.user_id.optimizer.name=cfsgd", "--embedding.tables.user_id.optimizer.lr=0.05"]


def _weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=True)
    return {f"model.{k}": v for k, v in sd["model"].items()} | _flatten("fused", sd["fused_optim"])


def _flatten(prefix: str, d) -> dict:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flatten(f"{prefix}.{k}", v).items()}
    return {prefix: d} if torch.is_tensor(d) else {}


def _last_ckpt(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*[0-9]"))[-1]


def test_one_and_two_ranks_reach_the_same_auc(tiny_ml, tmp_path):
    # same global batch (512): 1 rank x 512 vs 2 ranks x 256
    run_trainer(tmp_path / "r1", tiny_ml, 1, "--train.epochs=3", "--data.batch_size=512", *MIXED)
    run_trainer(tmp_path / "r2", tiny_ml, 2, "--train.epochs=3", "--data.batch_size=256", *MIXED)
    a1, a2 = (results(tmp_path / r)["best"]["test"]["all"]["auc"] for r in ("r1", "r2"))
    assert a1 > 0.70 and a2 > 0.70, (a1, a2)     # both learned something real
    assert abs(a1 - a2) < 0.01, (a1, a2)           # and the same thing, up to data order / float sums


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_ml, tmp_path):
    common = ["--train.epochs=2", "--checkpoint.every_steps=7", *MIXED]
    run_trainer(tmp_path / "full", tiny_ml, 2, *common)
    steps = results(tmp_path / "full")["steps"]
    # stop mid-epoch (not on a checkpoint boundary of the full run), then resume in a new job
    run_trainer(tmp_path / "cut", tiny_ml, 2, *common, f"--train.max_steps={steps // 2 + 3}")
    proc = run_trainer(tmp_path / "cut", tiny_ml, 2, *common)
    assert "loaded" in proc.stderr and f"step {steps // 2 + 3}" in proc.stderr
    full, cut = _weights(_last_ckpt(tmp_path / "full"), tmp_path), _weights(_last_ckpt(tmp_path / "cut"), tmp_path)
    assert full.keys() == cut.keys() and any("user_id" in k and "momentum1" in k for k in full)
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0, msg=k)   # bit-identical
    assert results(tmp_path / "cut")["steps"] == steps
    r_full, r_cut = results(tmp_path / "full")["best"], results(tmp_path / "cut")["best"]
    assert r_cut["test"]["all"]["auc"] == pytest.approx(r_full["test"]["all"]["auc"], abs=1e-6)


def test_checkpoint_saved_by_two_ranks_loads_with_one(tiny_ml, tmp_path):
    run_trainer(tmp_path / "two", tiny_ml, 2, "--train.epochs=1", *MIXED)
    ck = _last_ckpt(tmp_path / "two")
    proc = run_trainer(tmp_path / "two", tiny_ml, 1, "--checkpoint", str(ck), "--split", "test", command="evaluate")
    got = json.loads(proc.stdout[proc.stdout.index("{"):])["metrics"]["all"]
    want = results(tmp_path / "two")["history"][-1]["test"]["all"]
    assert got["examples"] == want["examples"]
    # same weights, other reduction order (row/column-wise partial sums): equal up to float reassociation
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-5)
    assert got["logloss"] == pytest.approx(want["logloss"], abs=1e-6)


def test_evaluate_writes_per_example_predictions_as_parquet(tiny_ml, tmp_path):
    """--predictions: one file on 1 rank, one part per rank on 2; rows index the split in file order,
    every example exactly once, and the predictions give back the reported metrics."""
    import pyarrow.parquet as pq
    from sklearn.metrics import log_loss, roc_auc_score

    run_trainer(tmp_path / "run", tiny_ml, 1, "--train.epochs=1", "--train.max_steps=5")
    ck = _last_ckpt(tmp_path / "run")
    one, two = tmp_path / "pred.parquet", tmp_path / "pred2"
    proc = run_trainer(tmp_path / "run", tiny_ml, 1, "--checkpoint", str(ck), "--split", "valid",
                       "--predictions", str(one), command="evaluate")
    got = json.loads(proc.stdout[proc.stdout.index("{"):])
    t = pq.read_table(one)
    n = got["metrics"]["all"]["examples"]
    assert t.column_names == ["row", "label", "prediction", "logit"] and t.num_rows == n
    assert t.column("row").to_pylist() == list(range(n))
    y, p = t.column("label").to_numpy(), t.column("prediction").to_numpy()
    labels = pq.read_table(tiny_ml / "valid").column("label").to_numpy()
    assert (y == labels).all()                               # row i is the split's row i
    assert roc_auc_score(y, p) == pytest.approx(got["metrics"]["all"]["auc"], abs=1e-4)
    assert log_loss(y, p.astype(float)) == pytest.approx(got["metrics"]["all"]["logloss"], abs=1e-4)
    run_trainer(tmp_path / "run", tiny_ml, 2, "--checkpoint", str(ck), "--split", "valid",
                "--predictions", str(two), command="evaluate")
    parts = sorted(p.name for p in two.iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    t2 = pq.read_table(two).sort_by("row")
    assert t2.column("row").to_pylist() == list(range(n))
    assert abs(t2.column("logit").to_numpy() - t.column("logit").to_numpy()).max() < 1e-4
