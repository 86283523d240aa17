"""data/stats.py against an independent dense brute-force on tiny hand-built Parquet datasets."""
import filecmp
import json
import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from data.errors import DataError
from data.manifest import Manifest, SparseFeature, SplitInfo, load_manifest
from data.stats import bucket_of, compute_stats, format_stats, load_buckets, load_cooc, load_counts

FEATS = {"user": (7, False), "movie": (11, False), "genre": (5, True)}


def write_dataset(root, feats, records, row_group_size=4):
    """A converted dataset by hand: train = records, valid/test = 2 rows each, manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, recs in (("train", records), ("valid", records[:2]), ("test", records[:2])):
        cols = {"label": pa.array([float(i % 2) for i in range(len(recs))], pa.float32())}
        for name, (_, multi) in feats.items():
            cols[name] = pa.array([r[name] for r in recs], pa.list_(pa.int64()) if multi else pa.int64())
        (root / split).mkdir(exist_ok=True)
        pq.write_table(pa.table(cols), root / split / "part-00000.parquet", row_group_size=row_group_size)
        splits[split] = SplitInfo(rows=len(recs), positives=len(recs) // 2, files=[f"{split}/part-00000.parquet"])
    Manifest(source={"kind": "test"}, converter_version="test", label="label", dense_features=[],
             sparse_features=[SparseFeature(n, e, multi_hot=m) for n, (e, m) in feats.items()],
             splits=splits, row_group_size=row_group_size).save(root)
    return root


def random_records(rng, feats, n):
    recs = []
    for _ in range(n):
        r = {}
        for name, (ne, multi) in feats.items():
            p = 1 / np.arange(1, ne + 1) ** 1.2
            draw = lambda: int(rng.choice(ne, p=p / p.sum()))  # noqa: E731 (Zipf-like draws)
            r[name] = [draw() for _ in range(rng.integers(0, 4))] if multi else draw()
        recs.append(r)
    return recs


def brute_force(feats, records, top_k):
    """Dense one-hot X over the global id space; counts, F and C = X^T X[:, F] without the diagonal."""
    offs = np.cumsum([0] + [ne for ne, _ in feats.values()])
    x = np.zeros((len(records), offs[-1]), np.int64)
    for r, rec in enumerate(records):
        for k, name in enumerate(feats):
            for i in (rec[name] if feats[name][1] else [rec[name]]):
                x[r, offs[k] + i] = 1
    cnt = x.sum(0)
    glob = sorted((-cnt[g], k, g - offs[k]) for k in range(len(feats)) for g in range(offs[k], offs[k + 1])
                  if cnt[g] > 0)[:top_k]
    fcols = [offs[k] + i for _, k, i in glob]
    c = x.T @ x[:, fcols]
    for j, g in enumerate(fcols):
        c[g, j] = 0
    names = list(feats)
    return ({n: cnt[offs[k]:offs[k + 1]] for k, n in enumerate(names)},
            [(names[k], i) for _, k, i in glob],
            {n: c[offs[k]:offs[k + 1]] for k, n in enumerate(names)})


@pytest.fixture
def tiny(tmp_path):
    recs = random_records(np.random.default_rng(0), FEATS, 60)
    return write_dataset(tmp_path / "ds", FEATS, recs), recs


def test_counts_and_cooc_match_brute_force(tiny):
    ds, recs = tiny
    compute_stats(ds, top_k=8)
    ref_cnt, ref_top, ref_c = brute_force(FEATS, recs, 8)
    counts = load_counts(ds)
    top = [tuple(t[:2]) for t in json.loads((ds / "stats/top_ids.json").read_text())]
    assert top == ref_top
    for name in FEATS:
        assert counts[name].dtype == np.int64
        np.testing.assert_array_equal(counts[name], ref_cnt[name])
        c = load_cooc(ds, name)
        assert isinstance(c, sp.csr_matrix) and c.shape == (FEATS[name][0], 8)
        np.testing.assert_array_equal(c.toarray(), ref_c[name])


def test_multi_hot_counts_once_per_record(tmp_path):
    feats = {"a": (3, False), "g": (4, True)}
    recs = [{"a": 0, "g": [1, 1, 2]}, {"a": 1, "g": [1]}, {"a": 0, "g": []}]
    ds = write_dataset(tmp_path / "ds", feats, recs)
    compute_stats(ds, top_k=10)
    np.testing.assert_array_equal(load_counts(ds)["g"], [0, 2, 1, 0])
    c = load_cooc(ds, "g").toarray()
    top = [tuple(t[:2]) for t in json.loads((ds / "stats/top_ids.json").read_text())]
    assert c[1, top.index(("a", 0))] == 1 and c[1, top.index(("g", 2))] == 1 and c[1, top.index(("g", 1))] == 0


def test_buckets_thresholds_and_bucket_of(tmp_path):
    # 10 seen ids with counts 10..1 (id 10..11 never seen): head = top 2, tail = bottom 5
    recs = [{"x": i} for i in range(10) for _ in range(10 - i)]
    ds = write_dataset(tmp_path / "ds", {"x": (12, False)}, recs)
    compute_stats(ds, top_k=5)
    b = load_buckets(ds)["x"]
    assert (b["head_min_count"], b["tail_max_count"]) == (9, 5)
    np.testing.assert_array_equal(bucket_of(ds, "x"), [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    assert bucket_of(ds, "x").dtype == np.int8
    s = json.loads((ds / "stats/summary.json").read_text())["features"]["x"]
    assert s["head"]["share"] == round(19 / 55, 6) and s["tail"]["ids"] == 5


def test_deterministic_bytes_and_manifest(tiny, tmp_path):
    ds, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy)
    compute_stats(ds, top_k=8)
    compute_stats(copy, top_k=8)
    files = sorted(p.name for p in (ds / "stats").iterdir())
    assert "counts.npz" in files and "cooc_genre.npz" in files
    _, mismatch, errors = filecmp.cmpfiles(ds / "stats", copy / "stats", files, shallow=False)
    assert mismatch == [] and errors == []
    m = load_manifest(ds)
    assert m.stats["dir"] == "stats" and m.stats["top_k"] == 8 and m.stats["features"] == list(FEATS)


def test_files_never_need_pickle(tiny):
    ds, _ = tiny
    compute_stats(ds, top_k=8)
    for p in (ds / "stats").glob("*.npz"):
        with np.load(p, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zipfile.ZipFile(p).infolist())


def test_out_of_range_id_names_file_and_field(tmp_path):
    ds = write_dataset(tmp_path / "ds", {"x": (3, False)}, [{"x": 0}, {"x": 5}])
    with pytest.raises(DataError, match=r"part-00000.parquet field x: id 5 outside \[0, 3\)"):
        compute_stats(ds)


def test_format_stats_and_missing_stats(tiny):
    ds, _ = tiny
    with pytest.raises(DataError, match="no statistics"):
        load_counts(ds)
    compute_stats(ds, top_k=8)
    text = format_stats(ds)
    assert all(name in text for name in FEATS) and "gini" in text
