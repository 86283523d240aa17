"""MovieLens converter: ML-1M and CSV layouts, label rule, vocab inversion, presets, real samples."""
from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data.convert import MovieLensOptions, OptionsError, convert_movielens, row_uniform, split_of
from data.manifest import load_manifest
from data.writer import check_schema, load_vocab

SHARED = Path(os.environ.get("TAILREC_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117-1234"]
MOVIES = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Café Noir (2001)::Drama",
          "3::No Year Film::Comedy|Drama"]


def opts(**kw) -> MovieLensOptions:
    return MovieLensOptions(stats=False, progress=False, **kw)


def ratings_lines(n: int, users: list[int], movies: list[int], seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [f"{r.choice(users)}::{r.choice(movies)}::{r.randint(1, 5)}::{978300000 + r.randint(0, 10**7)}"
            for _ in range(n)]


def make_ml1m(d: Path, ratings: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "users.dat").write_bytes(("\n".join(USERS) + "\n").encode("latin-1"))
    (d / "movies.dat").write_bytes(("\n".join(MOVIES) + "\n").encode("latin-1"))
    (d / "ratings.dat").write_bytes(("\n".join(ratings) + "\n").encode("latin-1"))
    return d


def read_all(out: Path) -> dict[str, list[dict]]:
    m = load_manifest(out)
    return {s: [r for f in m.splits[s].files for r in pq.read_table(out / f).to_pylist()] for s in m.splits}


def test_ml1m_round_trip(tmp_path):
    lines = ratings_lines(200, [1, 2, 3], [1, 2, 3])
    m = convert_movielens(make_ml1m(tmp_path / "raw", lines), tmp_path / "out", opts(row_group_size=16))
    out = tmp_path / "out"
    check_schema(out, m)
    assert [f.name for f in m.sparse_features] == ["user_id", "movie_id", "gender", "age", "occupation", "zip",
                                                   "year", "genres", "ts_bucket"]
    assert m.dense_features == [] and m.feature("genres").multi_hot
    voc = {f: load_vocab(out, f) for f in ("user_id", "movie_id", "gender", "age", "zip", "year", "genres")}
    users = {u.split("::")[0]: u.split("::") for u in USERS}
    movies = {x.split("::")[0]: x.split("::") for x in MOVIES}
    parsed = [ln.split("::") for ln in lines]
    min_ts = min(int(p[3]) for p in parsed if p[2] != "3")
    got = {s: iter(rows) for s, rows in read_all(out).items()}
    neutral = 0
    for i, (u, mv, r, ts) in enumerate(parsed, start=1):
        if r == "3":
            neutral += 1
            continue
        row = next(got[split_of(row_uniform(42, i), (0.8, 0.1, 0.1))])
        assert row["label"] == (1.0 if int(r) > 3 else 0.0)
        assert voc["user_id"][row["user_id"]] == u and voc["movie_id"][row["movie_id"]] == mv
        assert voc["gender"][row["gender"]] == users[u][1] and voc["zip"][row["zip"]] == users[u][4]
        assert voc["age"][row["age"]] == users[u][2]
        assert [voc["genres"][g] for g in row["genres"]] == movies[mv][2].split("|")
        assert voc["year"][row["year"]] == {"1": "1995", "2": "2001", "3": ""}[mv]
        dt = int(ts) - min_ts
        assert row["ts_bucket"] == (int(math.log(dt) ** 2) if dt >= 1 else 0)
    assert all(next(it, None) is None for it in got.values())
    assert m.source["dropped_neutral"] == neutral > 0
    assert sum(s.rows for s in m.splits.values()) == len(lines) - neutral


def test_keep_neutral_and_threshold(tmp_path):
    lines = ratings_lines(60, [1, 2], [1, 2])
    m = convert_movielens(make_ml1m(tmp_path / "raw", lines), tmp_path / "out", opts(drop_neutral=False))
    assert sum(s.rows for s in m.splits.values()) == 60 and m.source["dropped_neutral"] == 0
    assert sum(s.positives for s in m.splits.values()) == sum(ln.split("::")[2] in "45" for ln in lines)


def test_paper7_preset(tmp_path):
    m = convert_movielens(make_ml1m(tmp_path / "raw", ratings_lines(80, [1, 2, 3], [1, 2, 3])), tmp_path / "out",
                          opts(preset="paper7"))
    assert [f.name for f in m.sparse_features] == ["ts_bucket", "gender", "age", "occupation", "zip", "year",
                                                   "genre_combo"]
    assert not any(f.multi_hot for f in m.sparse_features)
    assert sorted(load_vocab(tmp_path / "out", "genre_combo")) == sorted(x.split("::")[2] for x in MOVIES)


def make_csv(d: Path, ratings: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp,,,,\n" + "".join(r + ",,,,\n" for r in ratings))
    (d / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
                                  "7,Babylon 5,(no genres listed)\n", encoding="utf-8")
    return d


def test_csv_layout_half_ratings(tmp_path):
    rows = [f"{u},{mv},{r},{1260759144 + k}" for k, (u, mv, r) in enumerate(
        [(1, 1, "2.5"), (1, 7, "3.5"), (2, 1, "3"), (2, 7, "3.0"), (5, 1, "0.5"), (5, 7, "5")] * 10)]
    m = convert_movielens(make_csv(tmp_path / "raw", rows), tmp_path / "out", opts())
    assert m.source["layout"] == "csv" and m.source["dropped_neutral"] == 20
    assert [f.name for f in m.sparse_features] == ["user_id", "movie_id", "year", "genres", "ts_bucket"]
    assert sum(s.rows for s in m.splits.values()) == 40
    assert sum(s.positives for s in m.splits.values()) == 20
    assert sorted(load_vocab(tmp_path / "out", "year")) == ["", "1995"]
    with pytest.raises(OptionsError, match="paper7"):
        convert_movielens(tmp_path / "raw", tmp_path / "out2", opts(preset="paper7"))


def test_determinism(tmp_path):
    src = make_ml1m(tmp_path / "raw", ratings_lines(150, [1, 2, 3], [1, 2, 3]))
    for d in ("a", "b"):
        convert_movielens(src, tmp_path / d, opts(row_group_size=10))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_real_ml1m_side_files_with_generated_ratings(tmp_path):
    real = SHARED / "ml-1m"
    if not (real / "users.dat").is_file():
        pytest.skip(f"real ML-1M users.dat/movies.dat not present at {real} (set TAILREC_SHARED_DATA)")
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("users.dat", "movies.dat"):       # copied into tmp only, never into the repo
        shutil.copy(real / f, raw / f)
    (raw / "ratings.dat").write_text("\n".join(ratings_lines(400, list(range(1, 6041)), [1, 2, 3, 50, 2858, 3952],
                                                             seed=7)) + "\n", encoding="latin-1")
    m = convert_movielens(raw, tmp_path / "out", opts())
    check_schema(tmp_path / "out", m)
    total, pos = sum(s.rows for s in m.splits.values()), sum(s.positives for s in m.splits.values())
    assert total == 400 - m.source["dropped_neutral"] and m.rejects["count"] == 0
    assert m.feature("gender").num_embeddings == 2 and m.feature("genres").num_embeddings <= 18
    print(f"ml-1m real users/movies + 400 generated ratings: {total} rows kept, positive rate {pos / total:.4f}, "
          f"dropped neutral {m.source['dropped_neutral']}")


def test_real_ml_latest_small(tmp_path):
    src = SHARED / "ml-latest-small"
    if not (src / "ratings.csv").is_file():
        pytest.skip(f"real ml-latest-small not present at {src} (set TAILREC_SHARED_DATA)")
    m = convert_movielens(src, tmp_path / "out", opts())
    total, pos = sum(s.rows for s in m.splits.values()), sum(s.positives for s in m.splits.values())
    assert total + m.source["dropped_neutral"] == 100004 and m.rejects["count"] == 0
    assert m.source["ignored_extra_columns"]["rows"] == 2     # two lines carry stray numbers, see README
    print(f"ml-latest-small: {total} rows kept, positive rate {pos / total:.4f}, dropped neutral "
          f"{m.source['dropped_neutral']}, " + ", ".join(f"{k} {v.rows}/{v.positives}" for k, v in m.splits.items()))
