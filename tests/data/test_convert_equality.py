"""The vectorised engine and the row engine write the same dataset: rows (ids, labels, splits, in
order), vocabularies, features, rejects, on the real samples and on generated data with planted bad
rows; with blocks and byte-range tasks small enough that several of each (and worker processes) run."""
from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.convert import CriteoOptions, MovieLensOptions, convert_criteo, convert_movielens
from data.manifest import load_manifest

SHARED = Path(os.environ.get("TAILREC_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
POOL = ["68fd1e64", "80e26c9b", "0000abcd", "FFFF0001", "deadbeef", "1", "abcdef0123456789"]


def split_tables(out: Path) -> dict[str, pa.Table]:
    m = load_manifest(out)
    return {s: pa.concat_tables([pq.read_table(out / f) for f in m.splits[s].files]) for s in m.splits}


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma.sparse_features == mb.sparse_features and ma.dense_features == mb.dense_features
    assert ma.rejects == mb.rejects
    assert {s: (i.rows, i.positives) for s, i in ma.splits.items()} == {s: (i.rows, i.positives) for s, i in mb.splits.items()}
    ta, tb = split_tables(a), split_tables(b)
    for s in ta:
        assert ta[s].num_rows == tb[s].num_rows
        assert ta[s].equals(tb[s]), s
    assert sorted(ma.source["vocab"]) == sorted(mb.source["vocab"])
    for f in ma.source["vocab"].values():
        assert pq.read_table(a / f).equals(pq.read_table(b / f)), f
    skip = {"engine"}
    assert {k: v for k, v in ma.source.items() if k not in skip} == {k: v for k, v in mb.source.items() if k not in skip}
    ra, rb = a / "rejects.tsv", b / "rejects.tsv"
    assert ra.is_file() == rb.is_file()
    if ra.is_file():
        assert ra.read_bytes() == rb.read_bytes()


def both_engines(convert, src, tmp_path: Path, opts_cls, **kw) -> tuple[Path, Path, dict]:
    kw.setdefault("workers", 1)
    outs = {}
    for engine in ("rows", "vector"):
        outs[engine] = tmp_path / engine
        m = convert(src, outs[engine], opts_cls(stats=False, progress=False, engine=engine, **kw))
    assert_same_dataset(outs["rows"], outs["vector"])
    return outs["rows"], outs["vector"], m.source["engine"]


# ----------------------------------------------------------------------------- Criteo

def criteo_lines(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        ints = ["" if r.random() < 0.2 else str(r.choice([-2, -1, 0, 1, 5, 300, 10**6, 2**62])) for _ in range(13)]
        cats = ["" if r.random() < 0.15 else r.choice(POOL + [f"{r.getrandbits(32):08x}"] * 3) for _ in range(26)]
        lines.append("\t".join([str(int(r.random() < 0.3)), *ints, *cats]))
    return lines


def plant_bad(lines: list[str], seed: int) -> list[str]:
    """Every kind of bad Criteo row, plus lines that look odd to pyarrow.csv but are good."""
    r = random.Random(seed)
    good = lines[0].split("\t")
    bad = {
        "columns": "\t".join(good[:30]),
        "label": "\t".join(["2", *good[1:]]),
        "underscore": "\t".join([good[0], "1_000", *good[2:]]),
        "space": "\t".join([good[0], " 5", *good[2:]]),
        "hex_int": "\t".join([good[0], "0x10", *good[2:]]),
        "plus": "\t".join([good[0], "+5", *good[2:]]),
        "int_overflow": "\t".join([good[0], str(2**63), *good[2:]]),
        "not_hex": "\t".join([*good[:20], "zz00ff11", *good[21:]]),
        "hex_too_long": "\t".join([*good[:20], "1" * 17, *good[21:]]),
        "empty": "",
        "lone_cr": "\t".join([*good[:5], "7\r8", *good[6:]]),
        "quote": "\t".join([*good[:20], '"68fd1e64"', *good[21:]]),
        "latin1": "\t".join([*good[:20], "68fd1\xe964", *good[21:]]),
    }
    out = list(lines)
    for text in bad.values():
        out.insert(r.randrange(len(out)), text)
    out.insert(r.randrange(len(out)), lines[1] + "\r")          # CRLF line ending: good
    return out


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode("latin-1")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_criteo_engines_agree_with_planted_bad_rows(tmp_path, mode):
    src = write_lines(tmp_path / "train.txt", plant_bad(criteo_lines(1500, 1), 2))
    _, vec, engine = both_engines(convert_criteo, src, tmp_path, CriteoOptions, mode=mode, min_count=2,
                                  hash_size=1000, skip_bad_rows=True, row_group_size=100, workers=1,
                                  task_bytes=60_000, block_bytes=9_000)
    m = load_manifest(vec)
    assert m.rejects["count"] == 13 and m.rejects["by_file"]["train.txt"]["count"] == 13
    assert sum(s.rows for s in m.splits.values()) + m.rejects["count"] == engine["lines"] == 1514   # counts add up
    assert engine["tasks"] > 3 and engine["blocks"] > engine["row_path_blocks"] > 0
    # only blocks with a bad row went through the row parser
    assert engine["row_path_blocks"] <= 13 and engine["row_path_lines"] < engine["lines"] / 2


def test_criteo_days_gz_workers_and_max_ind_range(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    write_lines(d / "day_0", criteo_lines(700, 3))
    write_lines(d / "day_1.gz", plant_bad(criteo_lines(600, 4), 5), gz=True)
    write_lines(d / "day_2", criteo_lines(500, 6))
    _, vec, engine = both_engines(convert_criteo, d, tmp_path, CriteoOptions, mode="vocab", min_count=2,
                                  max_ind_range=50, skip_bad_rows=True, row_group_size=64, workers=2,
                                  task_bytes=50_000, block_bytes=20_000)
    m = load_manifest(vec)
    assert set(m.rejects["by_file"]) == {"day_1.gz"} and m.source["file_order"] == ["day_0", "day_1.gz", "day_2"]
    assert all(f.num_embeddings <= 50 for f in m.sparse_features)
    assert max(max(split_tables(vec)["train"].column(f"C{j}").to_pylist()) for j in range(1, 27)) < 50
    assert engine["tasks"] >= 5


def test_criteo_day_split_engines_agree(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    for k in range(3):
        write_lines(d / f"day_{k}", criteo_lines(300, 10 + k))
    both_engines(convert_criteo, d, tmp_path, CriteoOptions, mode="hash", split="day", task_bytes=30_000)


@pytest.mark.parametrize("name", ["kaggle_train_head1999.txt", "paddlerec_part0_100.txt"])
@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_criteo_real_samples_engines_agree(tmp_path, name, mode):
    src = SHARED / "criteo" / name
    if not src.is_file():
        pytest.skip(f"real Criteo sample not present at {src} (set TAILREC_SHARED_DATA)")
    _, _, engine = both_engines(convert_criteo, src, tmp_path, CriteoOptions, mode=mode, min_count=2,
                                block_bytes=50_000)
    assert engine["row_path_blocks"] == 0       # the real rows are all good: no block needed the row parser


# ----------------------------------------------------------------------------- MovieLens

def ml1m_dir(d: Path, users: bytes, movies: bytes, ratings: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "users.dat").write_bytes(users)
    (d / "movies.dat").write_bytes(movies)
    (d / "ratings.dat").write_bytes(("\n".join(ratings) + "\n").encode("latin-1"))
    return d


def ratings(n: int, users: list[int], movies: list[int], seed: int) -> list[str]:
    r = random.Random(seed)
    return [f"{r.choice(users)}::{r.choice(movies)}::{r.randint(1, 5)}::{956703932 + r.randint(0, 9 * 10**7)}"
            for _ in range(n)]


def test_ml1m_real_side_files_planted_bad_rows(tmp_path):
    real = SHARED / "ml-1m"
    if not (real / "users.dat").is_file():
        pytest.skip(f"real ML-1M users.dat/movies.dat not present at {real} (set TAILREC_SHARED_DATA)")
    lines = ratings(4000, list(range(1, 6041)), [1, 2, 3, 50, 260, 1196, 2858, 3952], seed=3)
    for i, bad in enumerate(["1::1::4.5::978300760", "1::1::5::-5", f"1::1::5::{2**70}", "1::1::5::1_000",
                             "99999::1::5::978300760", "1::77777::5::978300760", "1:::1::5::978300760",
                             "1::1::5", "1::1::5::97830\x000760", ""]):
        lines.insert(37 * i + 5, bad)
    raw = ml1m_dir(tmp_path / "raw", (real / "users.dat").read_bytes(), (real / "movies.dat").read_bytes(), lines)
    _, vec, engine = both_engines(convert_movielens, raw, tmp_path, MovieLensOptions, skip_bad_rows=True,
                                  row_group_size=128, task_bytes=20_000, block_bytes=5_000, workers=1)
    m = load_manifest(vec)
    assert m.rejects["by_file"]["ratings.dat"]["count"] == 10 and set(m.rejects["by_file"]) == {"ratings.dat"}
    kept = sum(s.rows for s in m.splits.values())
    assert kept + m.source["dropped_neutral"] + 10 == engine["lines"] == len(lines)      # counts add up
    assert engine["tasks"] > 3 and 0 < engine["row_path_blocks"] < engine["blocks"]


@pytest.mark.parametrize("preset", ["full", "paper7"])
def test_ml1m_generated_engines_agree(tmp_path, preset):
    from data.generate import generate_movielens
    raw = tmp_path / "raw"
    generate_movielens(raw, rows=6000, seed=2, users=300, movies=400)
    both_engines(convert_movielens, raw, tmp_path, MovieLensOptions, preset=preset, min_count=2,
                 task_bytes=30_000, workers=2 if preset == "full" else 1)


def test_ml_latest_small_real_engines_agree(tmp_path):
    src = SHARED / "ml-latest-small"
    if not (src / "ratings.csv").is_file():
        pytest.skip(f"real ml-latest-small not present at {src} (set TAILREC_SHARED_DATA)")
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("ratings.csv", "movies.csv"):      # copied into tmp only, never into the repo
        shutil.copy(src / f, raw / f)
    with open(raw / "ratings.csv", "ab") as f:   # planted: a fraction, a bad step, an unknown movie, a NUL
        f.write(b"1,31,2.25,1260759144,,,,\n1,31,2.5e0,1260759144,,,,\n1,999999,4,1260759144,,,,\n"
                b"1,31,4,12607\x0059144,,,,\n")
    _, vec, engine = both_engines(convert_movielens, raw, tmp_path, MovieLensOptions, skip_bad_rows=True,
                                  task_bytes=1 << 20)
    m = load_manifest(vec)
    assert m.rejects["count"] == 4 and m.source["ignored_extra_columns"]["rows"] == 2
    assert engine["row_path_blocks"] == 1
