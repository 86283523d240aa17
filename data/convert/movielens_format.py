"""The MovieLens raw formats and their row parsers (the reference the vectorised path agrees with).

``users.dat`` / ``movies.dat`` / ``movies.csv`` are small side tables, parsed here row by row and
held in memory. ``parse_rating`` is the rule for one ratings line:

* ids and timestamps: ``-?[0-9]+`` (no ``1_000``, no spaces); a timestamp in ``[0, 2100-01-01)``;
* rating: ``[0-9]+(.[0-9]+)?`` in (0, 5]; a whole number of stars in ``.dat`` (ML-1M has no half
  stars), a multiple of 0.5 in ``.csv`` (ml-latest, ml-20m, ml-25m);
* no NUL byte anywhere in a line (a text field would otherwise carry it into a vocabulary).

A user or movie id defined twice with different attributes is an error (a repeat of the same line is
harmless and ignored).
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from data.errors import DataError
from data.readers import RowError, RowSink, decode, iter_lines, parse_int

YEAR_RE = re.compile(r"\((\d{4})\)\s*$")
RATING_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
CSV_FILES = ("ratings.csv", "movies.csv")
RATINGS_HEADER = "userId,movieId,rating,timestamp"
TS_MAX = 4102444800                   # 2100-01-01T00:00:00Z: a timestamp in seconds is below it
PRESETS = {
    ("ml-1m", "full"): ["user_id", "movie_id", "gender", "age", "occupation", "zip", "year", "genres", "ts_bucket"],
    ("csv", "full"): ["user_id", "movie_id", "year", "genres", "ts_bucket"],
    ("ml-1m", "paper7"): ["ts_bucket", "gender", "age", "occupation", "zip", "year", "genre_combo"],
}
MULTI_HOT = {"genres"}
USER_FEATURES = ("gender", "age", "occupation", "zip")      # attributes of users.dat, in its order
NAMES = {"ml-1m": ("UserID", "MovieID", "Rating", "Timestamp"), "csv": ("userId", "movieId", "rating", "timestamp")}


def detect_layout(src_dir: Path) -> str:
    if not src_dir.is_dir():
        raise DataError(src_dir, "MovieLens source must be a directory with ratings.dat or ratings.csv")
    has_dat, has_csv = (src_dir / "ratings.dat").exists(), (src_dir / "ratings.csv").exists()
    if has_dat == has_csv:
        what = "both ratings.dat and ratings.csv" if has_dat else "neither ratings.dat nor ratings.csv"
        raise DataError(src_dir, f"cannot detect the MovieLens layout: {what}")
    return "ml-1m" if has_dat else "csv"


def ts_bucket(dt: int) -> int:
    if dt < 1:
        return 0
    lg = math.log(dt)
    return int(lg * lg)


def _text(raw: bytes, encoding: str) -> str:
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise RowError(None, "nul_byte", f"NUL byte at column {nul + 1}")
    return decode(raw, encoding)


def _fields(text: str, sep: str, names: tuple[str, ...], width: int | None = None) -> list[str]:
    """Split into ``len(names)`` fields; up to ``width`` fields are allowed (unnamed extra CSV columns)."""
    parts = text.split(sep)
    width = width or len(names)
    if len(parts) < len(names) or len(parts) > width:
        field = names[len(parts)] if len(parts) < len(names) else f"column {width + 1}"
        want = f"{len(names)}" if width == len(names) else f"{len(names)} to {width}"
        raise RowError(field, "columns", f"expected {want} {sep!r}-separated fields, got {len(parts)}")
    return parts


# ----- side tables (users, movies): small, held in memory

def read_table(path: Path, parse, sink: RowSink, header: str | None = None, what: str = "user") -> dict:
    """``{id: attributes}``; a second definition of an id with other attributes is a row error."""
    table, where = {}, {}
    for lineno, raw in iter_lines(path):
        try:
            if lineno == 1 and header is not None:
                check_header(path, decode(raw, "utf-8"), header)
                continue
            key, value = parse(raw)
            if key in table:
                if table[key] != value:
                    raise RowError(f"{what.capitalize()}ID" if header is None else f"{what}Id", f"duplicate_{what}",
                                   f"{what} {key} already defined on line {where[key]} with other attributes")
                continue
            table[key], where[key] = value, lineno
        except RowError as e:
            sink.bad(path, lineno, e, raw)
    return table


def check_header(path: Path, text: str, expected: str) -> int:
    """Check the named columns; return the header's width (trailing unnamed columns included)."""
    cols = text.lstrip("\ufeff").split(",")
    want = expected.split(",")
    if cols[:len(want)] != want or any(cols[len(want):]):
        raise DataError(path, f"header is {text!r}, expected {expected!r}", line=1, field="header")
    return len(cols)


def parse_user(raw: bytes):
    uid, gender, age, occ, zipc = _fields(_text(raw, "latin-1"), "::",
                                          ("UserID", "Gender", "Age", "Occupation", "Zip-code"))
    if gender not in ("M", "F"):
        raise RowError("Gender", "bad_value", f"gender {gender!r} is not M or F")
    return parse_int(uid, "UserID"), (gender, parse_int(age, "Age"), parse_int(occ, "Occupation"), zipc)


def movie_value(title: str, genres: str):
    m = YEAR_RE.search(title)
    return (m.group(1) if m else "", tuple(g for g in genres.split("|") if g), genres)


def parse_movie_dat(raw: bytes):
    mid, title, genres = _fields(_text(raw, "latin-1"), "::", ("MovieID", "Title", "Genres"))
    return parse_int(mid, "MovieID"), movie_value(title, genres)


def parse_movie_csv(raw: bytes):
    rows = list(csv.reader([_text(raw, "utf-8")]))
    names = ("movieId", "title", "genres")
    if len(rows) != 1 or len(rows[0]) != 3:
        n = len(rows[0]) if rows else 0
        raise RowError(names[n] if n < 3 else "column 4", "columns", f"expected 3 CSV fields, got {n}")
    mid, title, genres = rows[0]
    return parse_int(mid, "movieId"), movie_value(title, genres)


# ----- ratings

def parse_rating(raw: bytes, layout: str, width: int) -> tuple[int, int, float, int, bool]:
    """``(user, movie, rating, timestamp, extra)``; ``extra``: a value sat in an unnamed trailing column."""
    names = NAMES[layout]
    if layout == "ml-1m":
        parts = _fields(_text(raw, "latin-1"), "::", names)
    else:
        parts = _fields(_text(raw, "utf-8"), ",", names, width)
    uid, mid, r, ts = parts[:4]
    if RATING_RE.fullmatch(r) is None:
        raise RowError(names[2], "not_number", f"rating {r!r} is not a number")
    rating = float(r)
    if not 0 < rating <= 5:
        raise RowError(names[2], "bad_rating", f"rating {rating} outside (0, 5]")
    step = 1.0 if layout == "ml-1m" else 0.5
    if rating % step:
        raise RowError(names[2], "bad_rating", f"rating {rating} is not a multiple of {step}"
                       + (" (ML-1M ratings are whole stars)" if layout == "ml-1m" else ""))
    user, movie, t = parse_int(uid, names[0]), parse_int(mid, names[1]), parse_int(ts, names[3])
    if not 0 <= t < TS_MAX:
        raise RowError(names[3], "bad_timestamp", f"timestamp {t} outside [0, {TS_MAX}) (seconds, 1970 to 2100)")
    return user, movie, rating, t, any(parts[4:])
