"""Bad raw input: every case raises DataError naming file, 1-based line and field, or goes to rejects.tsv."""
from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.cli import main
from data.convert import CriteoOptions, MovieLensOptions, convert_criteo, convert_movielens
from data.errors import DataError
from data.manifest import load_manifest
from data.readers import read_rejects
from data.writer import check_schema


def good_line(seed: int) -> list[str]:
    r = random.Random(seed)
    return [str(seed % 2), *[str(r.randint(0, 9)) for _ in range(13)], *[f"{r.getrandbits(32):08x}" for _ in range(26)]]


def criteo_file(tmp_path, bad: str | None = None, at: int = 3, n: int = 6, name: str = "train.txt"):
    lines = ["\t".join(good_line(i)) for i in range(n)]
    if bad is not None:
        lines[at - 1] = bad
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def with_field(i: int, value: str) -> str:
    parts = good_line(99)
    parts[i] = value
    return "\t".join(parts)


def convert(src, tmp_path, **kw):
    return convert_criteo(src, tmp_path / "out", CriteoOptions(stats=False, progress=False, min_count=1, **kw))


@pytest.mark.parametrize("bad, field, text", [
    ("\t".join(good_line(99)[:39]), "C26", "expected 40 tab-separated fields, got 39"),
    ("\t".join(good_line(99) + ["x"]), "column 41", "got 41"),
    (with_field(3, "12a"), "I3", "'12a' is not an integer"),
    (with_field(14 + 4, "zz00ff11"), "C5", "not a hex string"),
    (with_field(0, "2"), "label", "label '2' is not 0 or 1"),
])
def test_criteo_bad_row(tmp_path, bad, field, text):
    src = criteo_file(tmp_path, bad, at=4)
    with pytest.raises(DataError) as e:
        convert(src, tmp_path)
    assert (e.value.path, e.value.line, e.value.field) == (str(src), 4, field)
    assert text in str(e.value) and f"{src}:4 field {field}" in str(e.value)


def test_skip_bad_rows_rejects_file_and_manifest(tmp_path):
    lines = ["\t".join(good_line(i)) for i in range(10)]
    lines[2] = with_field(0, "7")
    lines[6] = with_field(20, "nothex!!")
    lines[7] = "only\tthree\tfields"
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines) + "\n")
    m = convert(src, tmp_path, skip_bad_rows=True)
    assert sum(s.rows for s in m.splits.values()) == 7
    by_reason = {"bad_label": 1, "columns": 1, "not_hex": 1}
    assert m.rejects == {"count": 3, "file": "rejects.tsv", "by_reason": by_reason,
                         "by_file": {"train.txt": {"count": 3, "by_reason": by_reason}}}
    rej = read_rejects(tmp_path / "out" / "rejects.tsv")
    assert [(r["file"], r["line"], r["field"]) for r in rej] == [("train.txt", "3", "label"),
                                                                ("train.txt", "7", "C7"), ("train.txt", "8", "I3")]
    assert rej[1]["raw"] == lines[6] and rej[0]["reason"].startswith("bad_label:")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rejects"]["count"] == 3


def test_truncated_gz(tmp_path):
    data = gzip.compress(("\n".join("\t".join(good_line(i)) for i in range(400)) + "\n").encode(), mtime=0)
    src = tmp_path / "day_0.gz"
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        convert(src, tmp_path)
    assert e.value.path == str(src) and e.value.line > 1
    assert "complete lines" in str(e.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "train.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file") as e:
        convert(empty, tmp_path)
    assert e.value.path == str(empty)
    with pytest.raises(DataError, match="file not found"):
        convert(tmp_path / "nope.txt", tmp_path)


def ml1m(tmp_path, ratings: bytes, users: bytes = b"1::F::1::10::48067\n"):
    d = tmp_path / "raw"
    d.mkdir(exist_ok=True)
    (d / "users.dat").write_bytes(users)
    (d / "movies.dat").write_bytes(b"1::Toy Story (1995)::Comedy\n")
    (d / "ratings.dat").write_bytes(ratings)
    return d


def ml_convert(src, tmp_path, **kw):
    return convert_movielens(src, tmp_path / "out", MovieLensOptions(stats=False, progress=False, **kw))


@pytest.mark.parametrize("line, field, text", [
    (b"1:1:5:978300760", "MovieID", "expected 4 '::'-separated fields, got 1"),
    (b"1::1,5::978300760", "Timestamp", "got 3"),
    (b"1::1::five::978300760", "Rating", "is not a number"),
    (b"1::1::9::978300760", "Rating", "outside (0, 5]"),
    (b"x1::1::5::978300760", "UserID", "is not an integer"),
    (b"2::1::5::978300760", "UserID", "user 2 is not in users.dat"),
])
def test_ml1m_bad_ratings_line(tmp_path, line, field, text):
    src = ml1m(tmp_path, b"1::1::5::978300000\n" + line + b"\n")
    with pytest.raises(DataError) as e:
        ml_convert(src, tmp_path)
    assert (e.value.path, e.value.line, e.value.field) == (str(src / "ratings.dat"), 2, field)
    assert text in str(e.value)


def test_ml1m_bad_users_line_and_missing_file(tmp_path):
    src = ml1m(tmp_path, b"1::1::5::978300000\n", users=b"1::F::1::10::48067\n2::X::1::10::1\n")
    with pytest.raises(DataError, match="gender 'X'") as e:
        ml_convert(src, tmp_path)
    assert (e.value.path, e.value.line, e.value.field) == (str(src / "users.dat"), 2, "Gender")
    (src / "users.dat").unlink()
    with pytest.raises(DataError, match="file not found") as e:
        ml_convert(src, tmp_path)
    assert e.value.path == str(src / "users.dat")


def test_ml1m_empty_ratings(tmp_path):
    src = ml1m(tmp_path, b"")
    with pytest.raises(DataError, match="empty file"):
        ml_convert(src, tmp_path)


def test_csv_bad_encoding_and_skip(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (d / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,10\n1,1,4.5,1\xff0\n1,1,2,12\n")
    with pytest.raises(DataError, match="invalid utf-8 byte 0xff") as e:
        ml_convert(d, tmp_path)
    assert (e.value.path, e.value.line) == (str(d / "ratings.csv"), 3)
    m = ml_convert(d, tmp_path, skip_bad_rows=True, overwrite=True)
    assert m.rejects["by_reason"] == {"encoding": 1}
    assert sum(s.rows for s in m.splits.values()) == 2
    rej = read_rejects(tmp_path / "out" / "rejects.tsv")
    assert rej[0]["line"] == "3" and rej[0]["raw"] == "1,1,4.5,1\\xff0"


def test_csv_bad_header(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (d / "ratings.csv").write_text("user,movie,rating,timestamp\n1,1,4.0,10\n")
    with pytest.raises(DataError) as e:
        ml_convert(d, tmp_path)
    assert (e.value.line, e.value.field) == (1, "header")


def test_wrong_schema_and_manifest_version_refused(tmp_path):
    m = convert(criteo_file(tmp_path), tmp_path)
    out = tmp_path / "out"
    f = out / m.splits["valid"].files[0]
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.schema.get_field_index("C3"), "C3", t.column("C3").cast(pa.int32())), f)
    with pytest.raises(DataError) as e:
        check_schema(out, load_manifest(out))
    assert (e.value.path, e.value.field) == (str(f), "C3") and "int32" in str(e.value)
    pq.write_table(t.drop_columns(["I7"]), f)
    with pytest.raises(DataError, match="column missing") as e:
        check_schema(out, load_manifest(out))
    assert e.value.field == "I7"
    raw = json.loads((out / "manifest.json").read_text())
    raw["version"] = 99
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="version 99 not supported"):
        load_manifest(out)


def test_cli_exit_code_2_names_line(tmp_path, capsys):
    src = criteo_file(tmp_path, with_field(0, "2"), at=5)
    rc = main(["convert", "criteo", "--src", str(src), "--out", str(tmp_path / "o"), "--no-stats", "--no-progress"])
    assert rc == 2
    assert f"{src}:5 field label" in capsys.readouterr().err
