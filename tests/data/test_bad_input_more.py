"""Bad input a new user meets (issue 13): failed --overwrite keeps the old dataset, all rows rejected,
UTF-8 BOM, ``1_000``, out-of-range timestamps, half stars in ``.dat``, conflicting duplicate users,
NUL bytes, reject totals per file. Each case through both engines where the rows are parsed."""
from __future__ import annotations

import random

import pytest

from data.cli import main
from data.convert import CriteoOptions, MovieLensOptions, convert_criteo, convert_movielens
from data.errors import DataError
from data.manifest import load_manifest
from data.readers import read_rejects

ENGINES = pytest.mark.parametrize("engine", ["vector", "rows"])
USERS = b"1::F::1::10::48067\n2::M::56::16::70072\n"
MOVIES = b"1::Toy Story (1995)::Comedy\n2::Heat (1995)::Action|Crime\n"


def good_line(seed: int) -> str:
    r = random.Random(seed)
    return "\t".join([str(seed % 2), *[str(r.randint(0, 9)) for _ in range(13)],
                      *[f"{r.getrandbits(32):08x}" for _ in range(26)]])


def criteo(tmp_path, lines: list[str], name: str = "train.txt", prefix: bytes = b""):
    p = tmp_path / name
    p.write_bytes(prefix + ("\n".join(lines) + "\n").encode("utf-8"))
    return p


def c_opts(engine: str = "vector", **kw) -> CriteoOptions:
    return CriteoOptions(stats=False, progress=False, min_count=1, engine=engine, workers=1, **kw)


def ml1m(tmp_path, ratings: bytes, users: bytes = USERS, movies: bytes = MOVIES):
    d = tmp_path / "raw"
    d.mkdir(exist_ok=True)
    (d / "users.dat").write_bytes(users)
    (d / "movies.dat").write_bytes(movies)
    (d / "ratings.dat").write_bytes(ratings)
    return d


def m_opts(engine: str = "vector", **kw) -> MovieLensOptions:
    return MovieLensOptions(stats=False, progress=False, engine=engine, workers=1, **kw)


RATINGS = b"".join(f"{1 + i % 2}::{1 + i % 3 // 2}::{1 + i % 5}::{978300000 + i}\n".encode() for i in range(40))


# ----------------------------------------------------------------------------- --overwrite and staging

@ENGINES
def test_failed_overwrite_keeps_the_old_dataset(tmp_path, engine):
    out = tmp_path / "out"
    good = criteo(tmp_path, [good_line(i) for i in range(30)])
    m0 = convert_criteo(good, out, c_opts(engine))
    (out / "notes.txt").write_text("mine")                     # a file of the user's next to the dataset
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = criteo(tmp_path, [good_line(i) for i in range(30)] + ["1\t2"], name="bad.txt")
    with pytest.raises(DataError, match="expected 40"):
        convert_criteo(bad, out, c_opts(engine, overwrite=True))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and load_manifest(out).splits == m0.splits
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []   # no temp sibling left
    m1 = convert_criteo(criteo(tmp_path, [good_line(i) for i in range(12)], name="small.txt"), out,
                        c_opts(engine, overwrite=True))
    assert sum(s.rows for s in m1.splits.values()) == 12 and (out / "notes.txt").read_text() == "mine"
    assert sum(s.rows for s in load_manifest(out).splits.values()) == 12


def test_failed_first_conversion_leaves_nothing(tmp_path):
    bad = criteo(tmp_path, ["1\tx"])
    with pytest.raises(DataError):
        convert_criteo(bad, tmp_path / "out", c_opts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt"]


# ----------------------------------------------------------------------------- all rows rejected

@ENGINES
def test_criteo_all_rows_rejected_is_an_error(tmp_path, engine):
    src = criteo(tmp_path, ["2\t" + good_line(1).split("\t", 1)[1]] * 5)
    with pytest.raises(DataError, match=r"all 5 rows were rejected \(bad_label 5\)") as e:
        convert_criteo(src, tmp_path / "out", c_opts(engine, skip_bad_rows=True))
    assert e.value.path == str(src) and not (tmp_path / "out").exists()


def test_criteo_one_day_all_rejected_names_that_day(tmp_path):
    criteo(tmp_path, [good_line(i) for i in range(20)], name="day_0")
    criteo(tmp_path, ["x"] * 4, name="day_1")
    with pytest.raises(DataError, match="all 4 rows were rejected") as e:
        convert_criteo([tmp_path / "day_0", tmp_path / "day_1"], tmp_path / "out", c_opts(skip_bad_rows=True))
    assert e.value.path.endswith("day_1")


@ENGINES
def test_movielens_all_ratings_rejected_is_an_error(tmp_path, engine, capsys):
    src = ml1m(tmp_path, b"1::1::9::978300760\n" * 3 + b"7::1::5::978300760\n")
    with pytest.raises(DataError, match=r"all 4 rows were rejected \(bad_rating 3, unknown_user 1\)") as e:
        convert_movielens(src, tmp_path / "out", m_opts(engine, skip_bad_rows=True))
    assert e.value.path == str(src / "ratings.dat")
    rc = main(["convert", "movielens", "--src", str(src), "--out", str(tmp_path / "o"), "--skip-bad-rows",
               "--no-stats", "--no-progress"])
    assert rc == 2 and "all 4 rows were rejected" in capsys.readouterr().err


# ----------------------------------------------------------------------------- BOM, integers, timestamps

@ENGINES
def test_utf8_bom_is_not_a_row(tmp_path, engine):
    src = criteo(tmp_path, [good_line(i) for i in range(6)], prefix=b"\xef\xbb\xbf")
    m = convert_criteo(src, tmp_path / "c", c_opts(engine))
    assert sum(s.rows for s in m.splits.values()) == 6 and m.rejects["count"] == 0
    d = ml1m(tmp_path, b"\xef\xbb\xbf" + RATINGS, users=b"\xef\xbb\xbf" + USERS)
    m = convert_movielens(d, tmp_path / "m", m_opts(engine))
    assert m.rejects["count"] == 0 and m.source["dropped_neutral"] + sum(s.rows for s in m.splits.values()) == 40
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "movies.csv").write_bytes(b"\xef\xbb\xbfmovieId,title,genres\n1,Heat (1995),Action\n")
    (csv / "ratings.csv").write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,1,4.5,10\n2,1,1,11\n")
    m = convert_movielens(csv, tmp_path / "mc", m_opts(engine))
    assert sum(s.rows for s in m.splits.values()) == 2


@ENGINES
@pytest.mark.parametrize("value", ["1_000", "1_96", " 5", "0x10", "+5", "٣"])
def test_criteo_python_int_quirks_rejected(tmp_path, engine, value):
    parts = good_line(7).split("\t")
    parts[2] = value
    src = criteo(tmp_path, [good_line(1), "\t".join(parts)])
    with pytest.raises(DataError, match="is not an integer") as e:
        convert_criteo(src, tmp_path / "out", c_opts(engine))
    assert (e.value.line, e.value.field) == (2, "I2")


@ENGINES
@pytest.mark.parametrize("line, field, text", [
    (b"1::1::5::1_000", "Timestamp", "is not an integer"),
    (b"1_0::1::5::978300760", "UserID", "is not an integer"),
    (b"1::1::5::-5", "Timestamp", "timestamp -5 outside [0, 4102444800)"),
    (b"1::1::5::%d" % 2**70, "Timestamp", f"timestamp {2**70} outside"),
    (b"1::1::4.5::978300760", "Rating", "rating 4.5 is not a multiple of 1.0 (ML-1M ratings are whole stars)"),
    (b"1::1::4_5::978300760", "Rating", "is not a number"),
    (b"1::1::5e0::978300760", "Rating", "is not a number"),
    (b"1::1::5::9783\x0000760", None, "NUL byte at column 14"),
])
def test_ml1m_rating_rules(tmp_path, engine, line, field, text):
    head = b"".join(RATINGS.splitlines(keepends=True)[:2])
    src = ml1m(tmp_path, head + line + b"\n" + RATINGS)
    n = 3
    with pytest.raises(DataError) as e:
        convert_movielens(src, tmp_path / "out", m_opts(engine))
    assert (e.value.path, e.value.line, e.value.field) == (str(src / "ratings.dat"), n, field)
    assert text in str(e.value)


@ENGINES
def test_csv_ratings_half_stars_only(tmp_path, engine):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Action\n")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.5,10\n1,1,4.25,11\n")
    with pytest.raises(DataError, match="rating 4.25 is not a multiple of 0.5") as e:
        convert_movielens(d, tmp_path / "out", m_opts(engine))
    assert (e.value.line, e.value.field) == (3, "rating")


# ----------------------------------------------------------------------------- side tables

def test_duplicate_user_with_other_attributes(tmp_path):
    users = USERS + b"2::M::56::16::70072\n" + b"1::M::25::10::48067\n"      # same line again: fine
    src = ml1m(tmp_path, RATINGS, users=users)
    with pytest.raises(DataError, match="user 1 already defined on line 1 with other attributes") as e:
        convert_movielens(src, tmp_path / "out", m_opts())
    assert (e.value.path, e.value.line, e.value.field) == (str(src / "users.dat"), 4, "UserID")
    dup_movie = MOVIES + b"2::Heat (1996)::Action|Crime\n"
    with pytest.raises(DataError, match="movie 2 already defined on line 2") as e:
        convert_movielens(ml1m(tmp_path, RATINGS, movies=dup_movie), tmp_path / "out", m_opts())
    assert (e.value.line, e.value.field) == (3, "MovieID")


def test_nul_byte_in_users_dat(tmp_path):
    src = ml1m(tmp_path, RATINGS, users=USERS + b"3::F::1::10::480\x0067\n")
    with pytest.raises(DataError, match="NUL byte at column 17") as e:
        convert_movielens(src, tmp_path / "out", m_opts())
    assert (e.value.path, e.value.line) == (str(src / "users.dat"), 3)


@ENGINES
def test_reject_totals_per_file(tmp_path, engine):
    users = USERS + b"3::X::1::10::1\n4::F::1::10::1\x00\n"
    ratings = RATINGS + b"1::1::9::978300760\n3::1::5::978300760\n"       # bad rating; user 3 was rejected
    m = convert_movielens(ml1m(tmp_path, ratings, users=users), tmp_path / "out",
                          m_opts(engine, skip_bad_rows=True))
    assert m.rejects["count"] == 4
    assert m.rejects["by_file"] == {
        "users.dat": {"count": 2, "by_reason": {"bad_value": 1, "nul_byte": 1}},
        "ratings.dat": {"count": 2, "by_reason": {"bad_rating": 1, "unknown_user": 1}}}
    rej = read_rejects(tmp_path / "out" / "rejects.tsv")
    assert [(r["file"], r["line"]) for r in rej] == [("users.dat", "3"), ("users.dat", "4"),
                                                     ("ratings.dat", "41"), ("ratings.dat", "42")]
