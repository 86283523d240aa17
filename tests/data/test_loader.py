"""ParquetLoader on small hand-built datasets (uneven row groups, a list<int64> bag, several files)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.errors import DataError
from data.loader import LoaderBatch, ParquetLoader, _GroupReader
from data.manifest import Manifest, SparseFeature, SplitInfo

# Row groups of uneven sizes spread over three files; row i is recognisable everywhere.
GROUPS = [[7, 13, 5], [20, 1, 11], [9, 16, 4]]


def _rows(ids: np.ndarray, dense: bool = True, d1_type=pa.float32()) -> pa.Table:
    tags = [[int(i) * 10 + j for j in range(int(i) % 4)] for i in ids]   # 0..3 values per row
    cols = {"label": pa.array((ids % 2).astype(np.float32))}
    if dense:
        cols["d0"] = pa.array(ids.astype(np.float32))
        cols["d1"] = pa.array((-ids).astype(np.float32)).cast(d1_type)
    cols["rid"] = pa.array(ids.astype(np.int64))
    cols["tags"] = pa.array(tags, type=pa.list_(pa.int64()))
    return pa.table(cols)


def make_dataset(root: Path, groups=GROUPS, dense: bool = True, bad_file: int | None = None,
                 bad_type=pa.int64()) -> int:
    """Write train/valid/test (same files) + manifest; returns the row count."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(exist_ok=True)
    files, start = [], 0
    for k, sizes in enumerate(groups):
        rel = f"train/part-{k:05d}.parquet"
        schema = _rows(np.arange(1), dense, bad_type if k == bad_file else pa.float32()).schema
        with pq.ParquetWriter(root / rel, schema) as w:
            for n in sizes:   # one write per row group, so the sizes stay uneven
                w.write_table(_rows(np.arange(start, start + n), dense,
                                    bad_type if k == bad_file else pa.float32()), row_group_size=n)
                start += n
        files.append(rel)
    split = SplitInfo(rows=start, positives=start // 2, files=files)
    Manifest(source={"kind": "test"}, converter_version="test", label="label",
             dense_features=["d0", "d1"] if dense else [],
             sparse_features=[SparseFeature("rid", start), SparseFeature("tags", start * 10, multi_hot=True)],
             splits={"train": split, "valid": split, "test": split}, row_group_size=16).save(root)
    return start


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("ds")
    return root, make_dataset(root)


def row_ids(batch: LoaderBatch) -> np.ndarray:
    """Real (weight 1) row ids of a batch, read from the single-valued ``rid`` feature."""
    rid = batch.sparse_features["rid"].values().numpy()
    assert len(rid) == int(batch.weights.sum())   # padding rows are empty bags at the end
    return rid


def all_ids(loader) -> list[np.ndarray]:
    return [row_ids(b) for b in loader]


def same_batch(a: LoaderBatch, b: LoaderBatch) -> bool:
    ka, kb = a.sparse_features, b.sparse_features
    return (ka.keys() == kb.keys() and torch.equal(ka.values(), kb.values())
            and torch.equal(ka.lengths(), kb.lengths()) and torch.equal(a.dense_features, b.dense_features)
            and torch.equal(a.labels, b.labels) and torch.equal(a.weights, b.weights))


def test_batch_content_equals_parquet_rows(ds):
    root, n = ds
    loader = ParquetLoader(root, "valid", 8, shuffle=False, drop_last=False, prefetch=0)
    seen = []
    for b in loader:
        kjt = b.sparse_features
        assert kjt.keys() == ["rid", "tags"]
        assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
        assert b.dense_features.shape == (8, 2) and b.dense_features.dtype == torch.float32
        real = int(b.weights.sum())
        ids = kjt["rid"].values().numpy()[:real]
        tags = kjt["tags"].to_dense()
        for r, i in enumerate(ids):
            assert tags[r].tolist() == [i * 10 + j for j in range(i % 4)]
        assert b.dense_features[:real, 0].tolist() == ids.tolist()
        assert b.dense_features[:real, 1].tolist() == (-ids).tolist()
        assert b.labels[:real].tolist() == (ids % 2).tolist()
        # padding rows: empty bags, zero dense and label
        assert kjt["rid"].lengths()[real:].sum() == 0 and b.labels[real:].sum() == 0
        seen += ids.tolist()
    assert seen == list(range(n))
    assert len(loader) == -(-n // 8)


def test_shuffled_rows_stay_whole(ds):
    """In-buffer shuffle moves every column of a row together (bags included) and does reorder rows."""
    root, _ = ds
    ids_seen = []
    for b in ParquetLoader(root, "train", 4, seed=9, shuffle_buffer=16):
        ids = row_ids(b)
        tags = b.sparse_features["tags"].to_dense()
        assert [t.tolist() for t in tags] == [[i * 10 + j for j in range(i % 4)] for i in ids]
        assert b.dense_features[:, 0].tolist() == ids.tolist() and b.labels.tolist() == (ids % 2).tolist()
        ids_seen += ids.tolist()
    assert ids_seen != sorted(ids_seen)


@pytest.mark.parametrize("world", [2, 3])
def test_train_split_disjoint_equal_counts(ds, world):
    root, n = ds
    loaders = [ParquetLoader(root, "train", 4, rank=r, world_size=world, seed=3, shuffle_buffer=8)
               for r in range(world)]
    per_rank = [np.concatenate(all_ids(ld)) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1
    assert all(len(p) == n // world // 4 * 4 for p in per_rank)
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)          # disjoint, no duplicates
    assert len(union) >= n - world * 4 - world + 1      # only the tail is dropped


# (4, 7): 86 rows -> 22, 22, 21, 21; ranks 2 and 3 end with a batch that is all padding.
@pytest.mark.parametrize("world,bs", [(2, 4), (3, 5), (4, 7), (4, 32), (3, 100)])
def test_eval_split_covers_every_row_once(ds, world, bs):
    root, n = ds
    loaders = [ParquetLoader(root, "test", bs, rank=r, world_size=world, shuffle=False, drop_last=False)
               for r in range(world)]
    batches = [list(ld) for ld in loaders]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(loaders[0])
    assert all(b.labels.shape == (bs,) for bb in batches for b in bb)   # same shapes on every rank
    union = np.concatenate([row_ids(b) for bb in batches for b in bb])
    assert sorted(union.tolist()) == list(range(n))


def test_deterministic_and_epochs_differ(ds):
    root, _ = ds
    a = ParquetLoader(root, "train", 4, seed=1, shuffle_buffer=8)
    b = ParquetLoader(root, "train", 4, seed=1, shuffle_buffer=8)
    e0 = all_ids(a)
    assert all(np.array_equal(x, y) for x, y in zip(e0, all_ids(b)))
    assert a.epoch == 1   # finishing an epoch moves to the next
    e1 = all_ids(a)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    a.set_epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip(e0, all_ids(a)))
    c = ParquetLoader(root, "train", 4, seed=2, shuffle_buffer=8)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(all_ids(c)))


@pytest.mark.parametrize("prefetch,stop", [(0, 3), (2, 5), (3, 7), (2, 10), (2, 13)])
def test_exact_resume(ds, prefetch, stop):
    root, _ = ds
    kw = dict(rank=1, world_size=2, seed=7, shuffle_buffer=12, prefetch=prefetch)
    ref = ParquetLoader(root, "train", 4, **kw)
    ref.set_epoch(2)
    reference = list(ref) + list(ref)   # epochs 2 and 3
    first = ParquetLoader(root, "train", 4, **kw)
    first.set_epoch(2)
    got, it = [], iter(first)
    for _ in range(stop):
        got.append(next(it))
        if len(got) == len(first):   # crossing the epoch boundary
            it = iter(first)
    state = first.state_dict()
    resumed = ParquetLoader(root, "train", 4, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])   # a trainer's usual call keeps the restored position
    got += list(resumed)
    if len(got) < len(reference):
        got += list(resumed)
    assert len(got) == len(reference)
    assert all(same_batch(x, y) for x, y in zip(got, reference))


def test_resume_rejects_other_world_size(ds):
    root, _ = ds
    state = ParquetLoader(root, "train", 4, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ParquetLoader(root, "train", 4, world_size=3).load_state_dict(state)


def test_schema_mismatch_names_file_and_column(tmp_path):
    make_dataset(tmp_path, bad_file=1)
    with pytest.raises(DataError) as e:
        ParquetLoader(tmp_path, "train", 4)
    assert e.value.field == "d1" and e.value.path.endswith("part-00001.parquet")
    assert "int64" in str(e.value)


def test_missing_column(tmp_path):
    make_dataset(tmp_path)
    pq.write_table(_rows(np.arange(7)).drop_columns(["tags"]), tmp_path / "train/part-00000.parquet")
    with pytest.raises(DataError, match="missing") as e:
        ParquetLoader(tmp_path, "train", 4, features=["rid"])   # the whole file must match the manifest
    assert e.value.field == "tags" and e.value.path.endswith("part-00000.parquet")


def test_unknown_dataset_refused(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="format"):
        ParquetLoader(tmp_path, "train", 4)


def test_no_dense_features_and_feature_subset(tmp_path):
    make_dataset(tmp_path, dense=False)
    b = next(iter(ParquetLoader(tmp_path, "train", 4, features=["tags"])))
    assert b.dense_features.shape == (4, 0)
    assert b.sparse_features.keys() == ["tags"]
    with pytest.raises(DataError, match="unknown sparse features"):
        ParquetLoader(tmp_path, "train", 4, features=["nope"])


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tailrec-loader" and t.is_alive()]


def test_prefetch_error_reaches_consumer(ds, monkeypatch):
    root, _ = ds
    calls = {"n": 0}
    real_read = _GroupReader.read

    def flaky(self, *a):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("disk on fire")
        return real_read(self, *a)

    monkeypatch.setattr(_GroupReader, "read", flaky)
    loader = ParquetLoader(root, "train", 4, shuffle_buffer=4, prefetch=2)
    with pytest.raises(OSError, match="disk on fire"):
        list(loader)
    assert not _loader_threads()


def test_break_and_close_stop_thread(ds):
    root, _ = ds
    loader = ParquetLoader(root, "train", 2, shuffle_buffer=2, prefetch=1)
    it = iter(loader)
    next(it)
    assert _loader_threads()
    del it   # generator collected -> its finally stops the thread
    assert not _loader_threads()
    it = iter(loader)
    next(it)
    loader.close()
    assert not _loader_threads()
    assert loader.state_dict()["batches_yielded"] == 2   # iterating again continues the position


def test_bench_read_helpers(ds):
    """The data bench's timing helpers run on a converted-layout dataset (conversion itself is not run here)."""
    from trainer.experiments.bench_data import format_table, loader_read, plain_read
    root, n = ds
    plain = plain_read(root, 4, repeats=1)
    two = loader_read(root, 4, world=2, repeats=1)
    assert plain["batches_per_s"] > 0 and two["batches_per_rank"] == n // 2 // 4
    row = {"rows": n, "generate_rows_per_s": 1.0, "convert_rows_per_s": 1.0, "convert_peak_rss_mib": 1.0,
           "train_rows": n, "plain": plain, "loader": {1: two, 2: two}}
    assert format_table([row], 4).count("\n") == 4
