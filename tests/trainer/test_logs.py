"""Logs a user can read: ours at INFO, libraries at WARNING, rank 0 only, levels from --log-level or
$LOGLEVEL, known-harmless library warnings hidden, progress bars only on a terminal."""
from __future__ import annotations

import logging
import warnings

import pytest

from trainer import logs


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogRecordFactory())
    monkeypatch.delenv("LOGLEVEL", raising=False)
    monkeypatch.delenv("TAILREC_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TAILREC_LOG_ALL_RANKS", raising=False)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.setLogRecordFactory(saved[2])
    for name in logs.OURS + ("torchrec.x", "torchrec.distributed.planner.storage_reservations"):
        logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger(name).filters.clear()
    logging.captureWarnings(False)


def _emit():
    logging.getLogger("tailrec.train").info("ours-info")
    logging.getLogger("trainer.optim.kernel").info("kernel-info")
    logging.getLogger("torchrec.x").info("lib-info")
    logging.getLogger("torchrec.x").warning("lib-warning")


def test_rank0_ours_info_libraries_warning(capsys):
    assert logs.setup_logging(0) == logging.INFO
    _emit()
    err = capsys.readouterr().err
    assert "ours-info" in err and "kernel-info" in err and "[rank 0]" in err
    assert "lib-info" not in err and "lib-warning" in err


def test_other_ranks_only_warn(capsys, monkeypatch):
    logs.setup_logging(1)
    _emit()
    err = capsys.readouterr().err
    assert "ours-info" not in err and "lib-warning" in err and "[rank 1]" in err
    monkeypatch.setenv("TAILREC_LOG_ALL_RANKS", "1")
    logs.setup_logging(1)
    _emit()
    assert "ours-info" in capsys.readouterr().err


def test_loglevel_env_and_flag(capsys, monkeypatch):
    monkeypatch.setenv("LOGLEVEL", "WARNING")
    logs.setup_logging(0)
    _emit()
    assert "ours-info" not in capsys.readouterr().err
    logs.setup_logging(0, "DEBUG")                 # the flag wins over $LOGLEVEL; DEBUG shows libraries too
    _emit()
    err = capsys.readouterr().err
    assert "ours-info" in err and "lib-info" in err
    monkeypatch.setenv("TAILREC_LOG_LEVEL", "INFO")          # ours wins over torchx's LOGLEVEL=WARNING
    logs.setup_logging(0)
    _emit()
    assert "ours-info" in capsys.readouterr().err
    with pytest.raises(ValueError, match="LOUD"):
        logs.setup_logging(0, "loud")


def test_known_benign_library_warnings_are_hidden_unless_debug(capsys):
    logs.setup_logging(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("default")
        logs._hide_known_benign()
        warnings.warn("HeuristicalStorageReservation is known to cause issues", FutureWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        warnings.warn("something new", FutureWarning)
    logging.getLogger("torchrec.distributed.planner.storage_reservations").warning(
        "There is a known issue with TorchRec's dense tensor size")
    err = capsys.readouterr().err
    assert "something new" in err and "HeuristicalStorageReservation" not in err and "dense tensor" not in err
    assert "ShardedTensor" not in err


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not logs.show_progress(True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert logs.show_progress(True) and not logs.show_progress(False)
