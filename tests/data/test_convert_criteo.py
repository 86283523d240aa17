"""Criteo converter: round trip against the raw lines, hashing, day split, .gz, determinism, real sample."""
from __future__ import annotations

import gzip
import math
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.convert import CriteoOptions, convert_criteo, row_uniform, split_of
from data.errors import DataError
from data.manifest import load_manifest
from data.writer import check_schema, load_vocab

SHARED = Path(os.environ.get("TAILREC_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
POOL = ["68fd1e64", "80e26c9b", "0000abcd", "FFFF0001", "deadbeef", "1"]   # upper case and short hex too


def criteo_lines(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        ints = ["" if r.random() < 0.2 else str(r.choice([-2, -1, 0, 1, 5, 300, 10**6])) for _ in range(13)]
        cats = ["" if r.random() < 0.15 else r.choice(POOL + [f"{r.getrandbits(32):08x}"]) for _ in range(26)]
        lines.append("\t".join([str(int(r.random() < 0.3)), *ints, *cats]))
    return lines


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def read_split(out: Path, split: str) -> list[dict]:
    m = load_manifest(out)
    rows = []
    for f in m.splits[split].files:
        rows += pq.read_table(out / f).to_pylist()
    return rows


def opts(**kw) -> CriteoOptions:
    return CriteoOptions(stats=False, progress=False, **kw)


def expected_split(i: int, seed: int = 42) -> str:
    return split_of(row_uniform(seed, i), (0.8, 0.1, 0.1))


def test_vocab_round_trip(tmp_path):
    lines = criteo_lines(300)
    src = write(tmp_path / "train.txt", lines)
    m = convert_criteo(src, tmp_path / "out", opts(min_count=3, row_group_size=16))
    split_of_line = [expected_split(i) for i in range(len(lines))]
    train_counts = [Counter() for _ in range(26)]
    for line, s in zip(lines, split_of_line):
        if s == "train":
            for c, v in zip(train_counts, line.split("\t")[14:]):
                c[v.lower()] += 1
    vocabs = [load_vocab(tmp_path / "out", f"C{j}") for j in range(1, 27)]
    for split in ("train", "valid", "test"):
        raw = [ln.split("\t") for ln, s in zip(lines, split_of_line) if s == split]
        got = read_split(tmp_path / "out", split)
        assert len(got) == len(raw) == m.splits[split].rows
        assert m.splits[split].positives == sum(p[0] == "1" for p in raw)
        for parts, row in zip(raw, got):
            assert row["label"] == float(parts[0])
            for j in range(13):
                x = int(parts[1 + j]) if parts[1 + j] else 0
                assert row[f"I{j + 1}"] == np.float32(math.log1p(max(x, 0)))
            for j in range(26):
                v, feat = parts[14 + j], m.sparse_features[j]
                rid = row[f"C{j + 1}"]
                assert 0 <= rid < feat.num_embeddings
                if v == "":
                    assert vocabs[j][rid] == "" and rid == feat.num_embeddings - 2
                elif train_counts[j][v.lower()] >= 3:
                    assert vocabs[j][rid] == f"{int(v, 16):08x}"
                else:
                    assert rid == feat.oov_id == feat.num_embeddings - 1


def test_row_groups_fixed_size_and_schema(tmp_path):
    src = write(tmp_path / "train.txt", criteo_lines(200))
    out = tmp_path / "out"
    m = convert_criteo(src, out, opts(row_group_size=32))
    check_schema(out, m)
    md = pq.read_metadata(out / m.splits["train"].files[0])
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert all(s == 32 for s in sizes[:-1]) and 0 < sizes[-1] <= 32
    assert md.schema.to_arrow_schema().field("C1").type == "int64"
    assert md.schema.to_arrow_schema().field("I1").type == "float"
    assert m.dense_features == [f"I{i}" for i in range(1, 14)] and m.row_group_size == 32
    assert m.source["files"]["train.txt"] and m.converter_version


def test_hash_mode(tmp_path):
    lines = criteo_lines(120)
    m = convert_criteo(write(tmp_path / "train.txt", lines), tmp_path / "out", opts(mode="hash", hash_size=97))
    assert all(f.num_embeddings == 98 and f.oov_id is None for f in m.sparse_features)
    got = {s: iter(read_split(tmp_path / "out", s)) for s in ("train", "valid", "test")}
    for i, line in enumerate(lines):
        row = next(got[expected_split(i)])
        for j, v in enumerate(line.split("\t")[14:]):
            assert row[f"C{j + 1}"] == (97 if v == "" else int(v, 16) % 97)
    assert not (tmp_path / "out" / "vocab").exists()


def test_gz_days_and_day_split(tmp_path):
    days = [write(tmp_path / f"day_{d}.gz", criteo_lines(50, seed=d), gz=True) for d in range(3)]
    m = convert_criteo(tmp_path, tmp_path / "out", opts(split="day", min_count=1))
    assert m.source["file_order"] == ["day_0.gz", "day_1.gz", "day_2.gz"]
    assert m.splits["train"].rows == 100
    assert m.splits["valid"].rows + m.splits["test"].rows == 50
    assert 10 < m.splits["valid"].rows < 40
    with pytest.raises(Exception, match="at least 2 input files"):
        convert_criteo(days[0], tmp_path / "out1", opts(split="day"))


def test_determinism(tmp_path):
    src = write(tmp_path / "train.txt", criteo_lines(150))
    for d in ("a", "b"):
        convert_criteo(src, tmp_path / d, opts(min_count=2, row_group_size=20))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(str(f).endswith(".parquet") for f in files) and Path("manifest.json") in files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_refuses_existing_dataset(tmp_path):
    src = write(tmp_path / "train.txt", criteo_lines(20))
    convert_criteo(src, tmp_path / "out", opts())
    with pytest.raises(DataError, match="already holds a dataset"):
        convert_criteo(src, tmp_path / "out", opts())
    convert_criteo(src, tmp_path / "out", opts(overwrite=True))


def test_real_kaggle_sample(tmp_path):
    src = SHARED / "criteo" / "kaggle_train_head1999.txt"
    if not src.is_file():
        pytest.skip(f"real Criteo sample not present at {src} (set TAILREC_SHARED_DATA)")
    m = convert_criteo(src, tmp_path / "out", opts())
    check_schema(tmp_path / "out", m)
    total = sum(s.rows for s in m.splits.values())
    pos = sum(s.positives for s in m.splits.values())
    assert total == 1999 and m.rejects["count"] == 0
    print(f"criteo kaggle_train_head1999: {total} rows, positive rate {pos / total:.4f}, "
          + ", ".join(f"{k} {v.rows}/{v.positives}" for k, v in m.splits.items()))
    assert 0.15 < pos / total < 0.35
