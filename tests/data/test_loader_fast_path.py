"""The loader's batch-major path (every feature single-valued) yields exactly the batches of the
general path; a training split without one full batch per rank is a clear error (exit 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.loader import ParquetLoader
from tests.data.test_loader import make_dataset, same_batch


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return root, make_dataset(root, groups=[[40, 24, 64], [8, 56], [72, 32, 16]])


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_major_equals_general_path(ds, shuffle):
    root, _ = ds
    for rank in (0, 1):
        kw = dict(rank=rank, world_size=2, seed=5, shuffle=shuffle, shuffle_buffer=24, features=["rid"])
        fast, general = ParquetLoader(root, "train", 8, **kw), ParquetLoader(root, "train", 8, **kw)
        assert fast._all_single
        general._all_single = False
        a, b = list(fast), list(general)
        assert len(a) == len(b) == fast.num_batches > 4
        assert all(same_batch(x, y) for x, y in zip(a, b))
        assert a[0].dense_features.is_contiguous() and a[0].dense_features.shape == (8, 2)
        assert torch.equal(a[0].weights, torch.ones(8))
        rid = np.concatenate([x.sparse_features["rid"].values().numpy() for x in a])
        assert np.array_equal(a[0].dense_features[:, 0].numpy(), a[0].sparse_features["rid"].values().numpy())
        assert len(set(rid.tolist())) == len(rid)            # no row twice


def test_batch_major_resume_mid_chunk(ds):
    root, _ = ds
    kw = dict(seed=2, shuffle_buffer=32, features=["rid"])
    ref = list(ParquetLoader(root, "train", 8, **kw))
    first = ParquetLoader(root, "train", 8, **kw)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = ParquetLoader(root, "train", 8, **kw)
    resumed.load_state_dict(state)
    assert all(same_batch(x, y) for x, y in zip(list(resumed), ref[5:]))


def test_train_split_smaller_than_a_batch_is_an_error(ds):
    root, n = ds
    with pytest.raises(DataError, match=f"has {n} rows: not one full batch of 1024 per rank for 1 rank") as e:
        ParquetLoader(root, "train", 1024)
    assert e.value.path.endswith("train") and e.value.field == "rows"
    with pytest.raises(DataError, match="nothing to train on"):
        ParquetLoader(root, "train", n // 2 + 1, world_size=2)
    assert len(ParquetLoader(root, "valid", 1024, drop_last=False, shuffle=False)) == 1   # evaluation pads


def test_training_on_too_few_rows_exits_2(tiny_ml, tmp_path, capsys, keep_environ):
    from tests.helpers import CONFIG
    from trainer.cli import main
    rc = main(["train", "--config", str(CONFIG), f"--run_dir={tmp_path / 'run'}", f"--data.path={tiny_ml}",
               "--data.batch_size=1000000"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to train on" in err and "train" in err, err
