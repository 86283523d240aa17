"""Fixtures shared by every test folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Our Triton kernels (trainer/optim/triton_update.py) run in Triton's interpreter on machines without a
# GPU. Triton reads the switch when it first compiles a function (its own library included, at import),
# so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def keep_environ():
    """In-process trainer runs set MASTER_ADDR/PORT for their 1-rank group; later subprocess tests must not
    see them: the environment is restored after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_ml(tmp_path_factory) -> Path:
    """A tiny generated MovieLens-1M-format dataset, converted (train/valid/test + stats); built once."""
    from data.convert import convert_movielens
    from data.generate import generate_movielens

    root = tmp_path_factory.mktemp("tiny_ml")
    generate_movielens(root / "raw", rows=16000, seed=3, users=800, movies=600)
    convert_movielens(root / "raw", root / "dataset")
    return root / "dataset"
