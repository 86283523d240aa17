"""MovieLens -> Parquet. Two raw layouts, detected from the files present in ``src_dir``:

* ``ml-1m``: ``ratings.dat users.dat movies.dat``, ``::``-separated, latin-1 (every byte decodes).
* ``csv`` (ml-latest, ml-20m, ml-25m): ``ratings.csv`` (userId,movieId,rating,timestamp; trailing
  columns with an empty header name are tolerated: a value found in one is ignored, and the rows that
  had one are counted in ``manifest.source["ignored_extra_columns"]``) and ``movies.csv``
  (movieId,title,genres; quoted titles), UTF-8, header rows.
  No user demographics, so those features are absent.

Label: ``rating > positive_threshold`` (3); rows with ``rating == threshold`` are dropped by default and
counted in ``manifest.source["dropped_neutral"]``.

Features (all sparse; no dense features: the loader yields a ``[B, 0]`` dense tensor). Preset ``full``:
user_id, movie_id, gender, age, occupation, zip, year (from "(1995)" in the title, "" when absent),
genres (multi-hot bag of genre ids), ts_bucket. Preset ``paper7`` (the PEP repo's 7 fields, ML-1M only):
ts_bucket, gender, age, occupation, zip, year, genre_combo (the whole genre string as one value).

``ts_bucket = int(ln(dt)^2)`` with ``dt = timestamp - min timestamp`` in seconds over the kept rows
(``dt < 1`` -> 0). It grows with dt, so the id is the bucket itself: num_embeddings = bucket(max dt) + 1.

Vocabularies are built over all kept rows of every split (the split is random per row, so a value
seen only in valid/test would otherwise have no trained row anyway); ids are the sorted raw values.
With ``min_count > 1`` rarer values share an OOV id (the last id).
"""
from __future__ import annotations

import csv
import math
import re
from collections import Counter
from pathlib import Path

from data import history
from data.convert.common import (MovieLensOptions, OptionsError, Vocab, file_checksums, finish,
                                 row_uniform, split_of)
from data.errors import DataError
from data.manifest import SparseFeature
from data.readers import RowError, RowSink, decode, iter_lines
from data.writer import DatasetWriter, arrow_schema, prepare_out_dir, write_vocab

YEAR_RE = re.compile(r"\((\d{4})\)\s*$")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
CSV_FILES = ("ratings.csv", "movies.csv")
PRESETS = {
    ("ml-1m", "full"): ["user_id", "movie_id", "gender", "age", "occupation", "zip", "year", "genres", "ts_bucket"],
    ("csv", "full"): ["user_id", "movie_id", "year", "genres", "ts_bucket"],
    ("ml-1m", "paper7"): ["ts_bucket", "gender", "age", "occupation", "zip", "year", "genre_combo"],
}
MULTI_HOT = {"genres"}


def detect_layout(src_dir: Path) -> str:
    if not src_dir.is_dir():
        raise DataError(src_dir, "MovieLens source must be a directory with ratings.dat or ratings.csv")
    has_dat, has_csv = (src_dir / "ratings.dat").exists(), (src_dir / "ratings.csv").exists()
    if has_dat == has_csv:
        what = "both ratings.dat and ratings.csv" if has_dat else "neither ratings.dat nor ratings.csv"
        raise DataError(src_dir, f"cannot detect the MovieLens layout: {what}")
    return "ml-1m" if has_dat else "csv"


def ts_bucket(dt: int) -> int:
    return int(math.log(dt) ** 2) if dt >= 1 else 0


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RowError(name, "not_integer", f"{text!r} is not an integer") from None


def _fields(text: str, sep: str, names: tuple[str, ...], width: int | None = None) -> list[str]:
    """Split into ``len(names)`` fields; up to ``width`` fields are allowed (unnamed extra CSV columns)."""
    parts = text.split(sep)
    width = width or len(names)
    if len(parts) < len(names) or len(parts) > width:
        field = names[len(parts)] if len(parts) < len(names) else f"column {width + 1}"
        want = f"{len(names)}" if width == len(names) else f"{len(names)} to {width}"
        raise RowError(field, "columns", f"expected {want} {sep!r}-separated fields, got {len(parts)}")
    return parts


# ----- side tables (users, movies): small, held in memory -----

def _read_table(path: Path, parse, sink: RowSink, header: str | None = None) -> dict:
    table = {}
    for lineno, raw in iter_lines(path):
        try:
            if lineno == 1 and header is not None:
                _check_header(path, decode(raw, "utf-8"), header)
                continue
            key, value = parse(raw)
            table[key] = value
        except RowError as e:
            sink.bad(path, lineno, e, raw)
    return table


def _check_header(path: Path, text: str, expected: str) -> int:
    """Check the named columns; return the header's width (trailing unnamed columns included)."""
    cols = text.lstrip("\ufeff").split(",")
    want = expected.split(",")
    if cols[:len(want)] != want or any(cols[len(want):]):
        raise DataError(path, f"header is {text!r}, expected {expected!r}", line=1, field="header")
    return len(cols)


def _parse_user(raw: bytes):
    uid, gender, age, occ, zipc = _fields(decode(raw, "latin-1"), "::",
                                          ("UserID", "Gender", "Age", "Occupation", "Zip-code"))
    if gender not in ("M", "F"):
        raise RowError("Gender", "bad_value", f"gender {gender!r} is not M or F")
    return _int(uid, "UserID"), (gender, _int(age, "Age"), _int(occ, "Occupation"), zipc)


def _movie_value(title: str, genres: str):
    m = YEAR_RE.search(title)
    return (m.group(1) if m else "", tuple(g for g in genres.split("|") if g), genres)


def _parse_movie_dat(raw: bytes):
    mid, title, genres = _fields(decode(raw, "latin-1"), "::", ("MovieID", "Title", "Genres"))
    return _int(mid, "MovieID"), _movie_value(title, genres)


def _parse_movie_csv(raw: bytes):
    rows = list(csv.reader([decode(raw, "utf-8")]))
    names = ("movieId", "title", "genres")
    if len(rows) != 1 or len(rows[0]) != 3:
        n = len(rows[0]) if rows else 0
        raise RowError(names[n] if n < 3 else "column 4", "columns", f"expected 3 CSV fields, got {n}")
    mid, title, genres = rows[0]
    return _int(mid, "movieId"), _movie_value(title, genres)


# ----- ratings: streamed -----

def _parse_rating(raw: bytes, layout: str, width: int) -> tuple[int, int, float, int, bool]:
    """``(user, movie, rating, timestamp, extra)``; ``extra``: a value sat in an unnamed trailing column."""
    if layout == "ml-1m":
        names = ("UserID", "MovieID", "Rating", "Timestamp")
        parts = _fields(decode(raw, "latin-1"), "::", names)
    else:
        names = ("userId", "movieId", "rating", "timestamp")
        parts = _fields(decode(raw, "utf-8"), ",", names, width)
    uid, mid, r, ts = parts[:4]
    try:
        rating = float(r)
    except ValueError:
        raise RowError(names[2], "not_number", f"rating {r!r} is not a number") from None
    if not 0 < rating <= 5:
        raise RowError(names[2], "bad_rating", f"rating {rating} outside (0, 5]")
    return _int(uid, names[0]), _int(mid, names[1]), rating, _int(ts, names[3]), any(parts[4:])


class _Source:
    """The raw inputs of one conversion and the per-row feature values (except ts_bucket)."""

    def __init__(self, src_dir: Path, opts: MovieLensOptions, sink: RowSink):
        self.layout = detect_layout(src_dir)
        if (self.layout, opts.preset) not in PRESETS:
            raise OptionsError(f"preset {opts.preset!r} needs the ml-1m layout (users.dat demographics)")
        self.features = PRESETS[(self.layout, opts.preset)] + ([history.FEATURE] if opts.history else [])
        self.history = history.builder(opts, self.features)   # data/history.py; None without --history
        self.opts = opts
        if self.layout == "ml-1m":
            self.files = [src_dir / f for f in ML1M_FILES]
            self.users = _read_table(self.files[1], _parse_user, sink)
            self.movies = _read_table(self.files[2], _parse_movie_dat, sink)
        else:
            self.files = [src_dir / f for f in CSV_FILES]
            self.users = None
            self.movies = _read_table(self.files[1], _parse_movie_csv, sink, header="movieId,title,genres")
        self.ratings = self.files[0]
        self.dropped_neutral = self.extra_rows = 0
        self.extra_lines: list[int] = []     # the first 20 only: memory stays constant

    def rows(self, sink: RowSink):
        """Yield ``(lineno, label, timestamp, {feature: raw value})`` for each kept rating row."""
        header = self.layout == "csv"
        thr, width = self.opts.positive_threshold, 4
        self.dropped_neutral, self.extra_rows, self.extra_lines = 0, 0, []
        for lineno, raw in iter_lines(self.ratings, self.opts.progress):
            try:
                if header and lineno == 1:
                    width = _check_header(self.ratings, decode(raw, "utf-8"), "userId,movieId,rating,timestamp")
                    continue
                uid, mid, rating, ts, extra = _parse_rating(raw, self.layout, width)
                values = self._values(uid, mid)
            except RowError as e:
                sink.bad(self.ratings, lineno, e, raw)
                continue
            if extra:
                self.extra_rows += 1
                self.extra_lines += [lineno][:20 - len(self.extra_lines)]
            if rating == thr and self.opts.drop_neutral:
                self.dropped_neutral += 1
                continue
            yield lineno, 1.0 if rating > thr else 0.0, ts, values

    def _values(self, uid: int, mid: int) -> dict:
        movie = self.movies.get(mid)
        if movie is None:
            raise RowError("MovieID" if self.users is not None else "movieId", "unknown_movie",
                           f"movie {mid} is not in the movies file")
        v = {"user_id": uid, "movie_id": mid, "year": movie[0], "genres": movie[1], "genre_combo": movie[2]}
        if self.users is not None:
            user = self.users.get(uid)
            if user is None:
                raise RowError("UserID", "unknown_user", f"user {uid} is not in users.dat")
            v.update(gender=user[0], age=user[1], occupation=user[2], zip=user[3])
        return v


def _count_pass(src: _Source, sink: RowSink):
    counts = {f: Counter() for f in src.features if f not in ("ts_bucket", history.FEATURE)}
    lo = hi = None
    n = 0
    for lineno, _, ts, values in src.rows(sink):
        n += 1
        if src.history:
            src.history.observe(lineno, values["user_id"], ts, values["movie_id"])
        lo, hi = (ts, ts) if lo is None else (min(lo, ts), max(hi, ts))
        for f, c in counts.items():
            if f in MULTI_HOT:
                c.update(values[f])
            else:
                c[values[f]] += 1
    if n == 0:
        raise DataError(src.ratings, "no usable rating rows")
    return counts, lo, hi


def _sparse_features(features: list[str], vocabs: dict, n_buckets: int, hist=None) -> list[SparseFeature]:
    return [SparseFeature("ts_bucket", n_buckets) if f == "ts_bucket" else
            hist.feature(len(vocabs["movie_id"])) if f == history.FEATURE else vocabs[f].feature(f in MULTI_HOT)
            for f in features]


def _write_pass(src: _Source, writer: DatasetWriter, sink: RowSink, vocabs: dict, min_ts: int) -> Counter:
    """Map every kept row to ids and write it; returns the ts_bucket counts (for its vocab file)."""
    buckets: Counter = Counter()
    opts = src.opts
    for lineno, label, ts, values in src.rows(sink):
        row = [label]
        for f in src.features:
            if f == history.FEATURE:
                row.append(src.history.ids(lineno))
            elif f == "ts_bucket":
                b = ts_bucket(ts - min_ts)
                buckets[b] += 1
                row.append(b)
            elif f in MULTI_HOT:
                row.append([vocabs[f].id(g) for g in values[f]])
            else:
                row.append(vocabs[f].id(values[f]))
        writer.append(split_of(row_uniform(opts.seed, lineno), opts.fractions), row)
    return buckets


def convert(src_dir: Path, out_dir: Path, opts: MovieLensOptions):
    opts.validate()
    out = prepare_out_dir(out_dir, opts.overwrite)
    sink = RowSink(out, opts.skip_bad_rows)
    src = _Source(src_dir, opts, sink)
    counts, min_ts, max_ts = _count_pass(src, RowSink(None, opts.skip_bad_rows, record=False))
    vocabs = {f: Vocab.build(f, c, opts.min_count) for f, c in counts.items()}
    n_buckets = ts_bucket(max_ts - min_ts) + 1
    if src.history:
        src.history.finish(vocabs["movie_id"].id)
    sparse = _sparse_features(src.features, vocabs, n_buckets, src.history)
    writer = DatasetWriter(out, arrow_schema([], sparse), opts.row_group_size, opts.compression)
    buckets = _write_pass(src, writer, sink, vocabs, min_ts)
    splits = writer.close()
    sink.close()
    vocab_files = {f: v.save(out, opts.compression) for f, v in vocabs.items()}
    if "ts_bucket" in src.features:
        vocab_files["ts_bucket"] = write_vocab(out, "ts_bucket", [str(b) for b in range(n_buckets)],
                                               [buckets[b] for b in range(n_buckets)], opts.compression)
    source = {"kind": "movielens-1m" if src.layout == "ml-1m" else "movielens-csv", "layout": src.layout,
              "files": file_checksums(src.files), "options": opts.to_dict(), "preset": opts.preset,
              "dropped_neutral": src.dropped_neutral,
              "ignored_extra_columns": {"rows": src.extra_rows, "first_lines": src.extra_lines},
              "min_timestamp": min_ts, "ts_bucket": "int(ln(t - min_timestamp)^2), 0 when t - min < 1",
              "vocab": vocab_files, "split": "random"}
    if src.history:
        source["history"] = src.history.summary()
    return finish(out, source, [], sparse, splits, sink.summary(), opts)
