"""What a user who gets something wrong sees: exit code 2 and one line naming the field (or the step,
or the run directory) instead of a traceback, a 0-step "success" or a NaN checkpoint."""
from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from tests.helpers import CONFIG, REPO, run_trainer
from trainer import launch
from trainer.cli import main


# in-process runs set MASTER_ADDR/PORT: restore the environment after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("keep_environ")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("--embedding.optimizer.lr=nan", "override --embedding.optimizer.lr=nan: embedding.optimizer.lr: must be a finite number"),
    ("--embedding.tables.movie_id.optimizer.lr=inf", "embedding.tables.movie_id.optimizer.lr: must be a finite number"),
    ("--dense_optim.lr=-0.001", "override --dense_optim.lr=-0.001: dense_optim.lr: must be >= 0"),
    ("--train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("--train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("--transfer.source_frac=1.5", "transfer.source_frac: must be > 0 and <= 1"),
    ("--transfer.target_frac=0", "transfer.target_frac: must be > 0 and <= 1"),
    ("--metrics.base_port=70000", "metrics.base_port: must be >= 1 and <= 65535"),
])
def test_bad_values_exit_2_naming_the_field_and_the_override(capsys, tmp_path, override, message):
    rc, err = _cli(capsys, "train", "--config", str(CONFIG), f"--run_dir={tmp_path}", override)
    assert rc == 2 and message in err, err
    assert str(CONFIG) not in err           # blamed on the override, not on the YAML file
    assert not (tmp_path / "checkpoints").exists()


def test_error_in_the_yaml_file_still_names_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {CONFIG}\ntrain:\n  log_every: 0\n")
    rc, err = _cli(capsys, "train", "--config", str(bad))
    assert rc == 2 and f"{bad}.train.log_every: must be >= 1" in err, err


def test_unknown_table_is_refused(capsys, tiny_ml, tmp_path):
    rc, err = _cli(capsys, "train", "--config", str(CONFIG), f"--data.path={tiny_ml}", f"--run_dir={tmp_path}",
                   "--embedding.tables.moive_id.dim=8", "--train.device=cpu")
    assert rc == 2 and "embedding.tables.moive_id: no such feature in this run" in err and "movie_id" in err, err


def test_metrics_port_in_use_exits_2_with_the_message(capsys, tiny_ml, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err = _cli(capsys, "train", "--config", str(CONFIG), f"--data.path={tiny_ml}", f"--run_dir={tmp_path}",
                       "--metrics.enabled=true", f"--metrics.base_port={port}", "--train.device=cpu")
    assert rc == 2 and f"metrics: cannot serve on 127.0.0.1:{port}" in err and "metrics.base_port" in err, err


def _train(tmp_path, tiny_ml, *overrides):
    cmd = launch.trainer_command("train", CONFIG, [f"--data.path={tiny_ml}", f"--run_dir={tmp_path / 'run'}",
                                                   "--data.batch_size=256", "--train.device=cpu", *overrides])
    env = launch.subprocess_env(threads=1, TAILREC_HEARTBEAT_DIR=str(tmp_path / "hb"))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.dist
def test_nan_loss_stops_before_a_nan_checkpoint(tiny_ml, tmp_path):
    # a dense lr of 1e30 sends the logits to +-inf within a step or two: the loss becomes inf/NaN
    proc = _train(tmp_path, tiny_ml, "--dense_optim.lr=1e30", "--dense_optim.clip_grad_norm=0",
                  "--checkpoint.every_steps=1", "--train.log_every=1", "--train.epochs=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    m = re.search(r"tailrec: error: the training loss became NaN or inf at step (\d+)", proc.stderr)
    assert m, proc.stderr[-3000:]
    bad = int(m.group(1))
    saved = [int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step_*")
             if (p / "COMPLETE").exists()]
    assert all(s < bad for s in saved), (bad, saved)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.dist
def test_relaunching_a_finished_run_says_so(tiny_ml, tmp_path):
    run_trainer(tmp_path / "run", tiny_ml, 1, "--train.epochs=1", "--train.max_steps=3")
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    proc = _train(tmp_path, tiny_ml, "--train.epochs=1", "--train.max_steps=3", "--data.batch_size=256",
                  "--data.eval_batch_size=1024")
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr and "--checkpoint.resume=false" in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == first     # untouched
    # training longer resumes; resume=false starts over
    proc = _train(tmp_path, tiny_ml, "--train.epochs=1", "--train.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 5
    # the Docker HEALTHCHECK's heartbeat: written by the trainer, metrics off
    assert (tmp_path / "hb" / "tailrec-heartbeat-0").read_text().split()[1] in ("checkpoint", "evaluated")


@pytest.mark.dist
def test_resuming_with_another_counter_width_is_refused(tiny_ml, tmp_path):
    opt = ("--embedding.optimizer.name=cfsgd", "--transfer.mode=baseline", "--train.epochs=1")
    run_trainer(tmp_path / "run", tiny_ml, 1, *opt, "--train.max_steps=3")
    proc = _train(tmp_path, tiny_ml, *opt, "--train.max_steps=5", "--embedding.optimizer.counter_bytes=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "counter_bytes=4, this run asks for 1" in proc.stderr and "new --run_dir" in proc.stderr, proc.stderr[-3000:]
