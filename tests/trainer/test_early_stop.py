"""Early stopping on valid AUC: a run that cannot improve stops after `patience` evaluations."""
import pytest

from tests.helpers import results, run_trainer

pytestmark = pytest.mark.dist


def test_early_stopping_stops_a_run_that_does_not_improve(tiny_ml, tmp_path):
    # nothing can change (FM: no BatchNorm statistics; dense lr 0, embedding lr ~0): valid AUC is flat
    run_trainer(tmp_path / "es", tiny_ml, 1, "--model.name=fm", "--train.epochs=6", "--train.early_stop_patience=2",
                "--dense_optim.lr=0.0", "--embedding.optimizer.name=exact_sgd", "--embedding.optimizer.lr=1e-12",
                "--transfer.mode=baseline")
    res = results(tmp_path / "es")
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]     # 1 best + 2 bad evaluations, not 6
    assert res["best"]["epoch"] == 1
    steps_per_epoch = res["history"][0]["step"]
    assert res["steps"] == 3 * steps_per_epoch
