"""Config validation of the issue-15 options (loss, diagnostics, multi-embedding, din): exit 2 and one
line naming the field."""
from __future__ import annotations

import pytest

from tests.helpers import CONFIG
from trainer.cli import main
from trainer.config import load_config


# in-process runs set MASTER_ADDR/PORT: restore the environment after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("keep_environ")


def test_defaults():
    cfg = load_config(None, [])
    assert (cfg.loss.ranking, cfg.loss.weight, cfg.diagnostics.collapse, cfg.model.num_embeddings) == \
        ("none", 1.0, True, 1)
    assert cfg.model.attention_embedding == "decoupled"


@pytest.mark.parametrize("override, message", [
    ("--loss.ranking=hinge", "loss.ranking: 'hinge' is not one of ['none', 'pairwise', 'listwise']"),
    ("--loss.weight=-1", "loss.weight: must be >= 0"),
    ("--loss.temperature=0", "loss.temperature: must be > 0"),
    ("--diagnostics.sample_rows=-5", "diagnostics.sample_rows: must be >= 0"),
    ("--model.num_embeddings=0", "model.num_embeddings: must be an integer >= 1"),
    ("--model.name=autoint --model.num_embeddings=2", "model.num_embeddings: multi-embedding is implemented for"),
    ("--model.attention_embedding=both", "model.attention_embedding: 'both' is not one of"),
    ("--model.history_len=-1", "model.history_len: must be >= 0"),
    ("--model.attention_embedding=shared --model.attention_dim=8", "model.attention_dim: a shared attention table"),
])
def test_bad_values_exit_2_naming_the_field(capsys, tmp_path, override, message):
    rc = main(["train", "--config", str(CONFIG), f"--run_dir={tmp_path}", *override.split()])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


@pytest.mark.parametrize("overrides, message", [
    (["--model.num_embeddings=3"], "embedding dim 16 is not divisible by 3"),
    (["--model.num_embeddings=8"], "fused tables need a positive multiple of 4"),
    (["--model.name=din"], "model.history_feature: 'history' is not a feature of this run"),
    (["--diagnostics.tables=[movie_id,nope]"], "diagnostics.tables: ['nope'] are not tables of this run"),
    (["--embedding.tables.movie_id__att.dim=8"], "embedding.tables.movie_id__att: no such table in this run"),
    (["--model.num_embeddings=2", "--transfer.mode=plus_t", "--transfer.features=[movie_id]"],
     "transfer.mode=plus_t is not supported with model 'deepfm' (num_embeddings=2)"),
])
def test_options_checked_against_the_dataset(capsys, tiny_ml, tmp_path, overrides, message):
    rc = main(["train", "--config", str(CONFIG), f"--data.path={tiny_ml}", f"--run_dir={tmp_path}",
               "--train.device=cpu", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "checkpoints").exists()
