"""MovieLens ratings, vectorised: ``pyarrow.csv`` parses a block, numpy checks it and maps it to ids.

``.dat`` lines are parsed with ``:`` as the delimiter (``u::m::r::t`` -> 7 fields whose 2nd, 4th and
6th must be empty); ``.csv`` with ``,`` and no quoting, like the row parser. A block with any line that
``movielens_format.parse_rating`` would reject (or an unknown user or movie) is parsed again by it,
line by line, and only that block. Users and movies are found with ``searchsorted`` in their sorted
ids; their features' ids come from per-user / per-movie id arrays (``Lookup``) built once by the
parent, so a row costs a few gathers. Per-row feature columns are assembled in ``feature_columns``:
the one place to add a feature computed from the ratings (e.g. a user-history feature).

Tasks: ``count_task`` (ratings per user and per movie over the kept rows, timestamp range) and
``write_task`` (Parquet parts, rejects part, ts_bucket counts, dropped/extra-column counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from data.convert.blocks import Task, iter_blocks, split_lines
from data.convert.columns import arrow, decimal_column, int_column, numpy_of, string_parts
from data.convert.common import MovieLensOptions, row_uniform_np, split_codes
from data.convert.criteo_vec import BlockStats, ValueCounts, read_block
from data.convert.movielens_format import MULTI_HOT, NAMES, TS_MAX, USER_FEATURES, parse_rating
from data.readers import RowError, RowSink
from data.writer import DatasetWriter

_DAT_NAMES = ["u", "s1", "m", "s2", "r", "s3", "t"]
USER_SIDE = ("user_id", *USER_FEATURES)
MOVIE_SIDE = ("movie_id", "year", "genre_combo", "genres")


@dataclass
class Lookup:
    """Sorted raw ids of users and movies, and per-entity feature ids (-1: an entity without kept
    ratings, never looked up). ``genres``: CSR (offsets, ids) per movie. In the csv layout the users
    are the ones found in the ratings (``user_ids`` is None in the counting pass, which finds them; a
    user of a dropped neutral row only may be missing later: index -1, and the row is dropped)."""
    user_ids: np.ndarray | None
    movie_ids: np.ndarray
    csv_users: bool = False
    user_feats: dict = field(default_factory=dict)
    movie_feats: dict = field(default_factory=dict)
    genre_offsets: np.ndarray | None = None
    genre_ids: np.ndarray | None = None


@dataclass
class Rows:
    """Kept rows of one block."""
    lines: np.ndarray        # 1-based line numbers (the split key)
    label: np.ndarray        # float32
    ts: np.ndarray           # int64
    uid: np.ndarray          # raw user id
    user: np.ndarray         # index into Lookup.user_ids (zeros while they are unknown)
    movie: np.ndarray        # index into Lookup.movie_ids


@dataclass
class BlockInfo:
    dropped_neutral: int = 0
    extra_rows: int = 0
    extra_lines: list = field(default_factory=list)


def _options(layout: str, width: int):
    if layout == "ml-1m":
        names, delim, utf8 = _DAT_NAMES, ":", False          # latin-1: every byte is a character
    else:
        names = ["u", "m", "r", "t", *[f"x{i}" for i in range(4, width)]]
        delim, utf8 = ",", True
    parse = pcsv.ParseOptions(delimiter=delim, quote_char=False, escape_char=False, double_quote=False,
                              newlines_in_values=False, ignore_empty_lines=False,
                              invalid_row_handler=lambda row: "skip")
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[""],
                                  strings_can_be_null=True, check_utf8=utf8)
    return names, parse, convert


def _find(ids: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.searchsorted(ids, raw)
    if len(ids) == 0:
        return pos, np.zeros(len(raw), bool)
    return pos, ids[np.minimum(pos, len(ids) - 1)] == raw


def _index(ids: np.ndarray, raw: np.ndarray) -> np.ndarray | None:
    """Positions of ``raw`` in ``ids``; None when one is absent."""
    pos, found = _find(ids, raw)
    return pos if found.all() else None


def _user_index(lookup: Lookup, raw: np.ndarray) -> np.ndarray | None:
    if lookup.user_ids is None:
        return np.zeros(len(raw), np.int64)
    if lookup.csv_users:
        pos, found = _find(lookup.user_ids, raw)
        return np.where(found, pos, -1)
    return _index(lookup.user_ids, raw)


def _int64(v: int) -> bool:
    return -(1 << 63) <= v < (1 << 63)


def _parse_table(t: pa.Table, layout: str, first: int, lookup: Lookup, opts: MovieLensOptions, info: BlockInfo):
    if layout == "ml-1m" and any(t.column(c).null_count != t.num_rows for c in ("s1", "s2", "s3")):
        return None
    u, m, ts = (int_column(t.column(c), allow_empty=False) for c in ("u", "m", "t"))
    r = decimal_column(t.column("r"))
    if u is None or m is None or ts is None or r is None:
        return None
    step = 1.0 if layout == "ml-1m" else 0.5
    if ((r <= 0) | (r > 5) | (np.fmod(r, step) != 0) | (ts < 0) | (ts >= TS_MAX)).any():
        return None
    movie = _index(lookup.movie_ids, m)
    user = _user_index(lookup, u)
    if movie is None or user is None:
        return None
    lines = np.arange(first, first + t.num_rows, dtype=np.int64)
    if layout == "csv" and t.num_columns > 4:
        extra = np.zeros(t.num_rows, bool)
        for c in t.column_names[4:]:
            extra |= string_parts(t.column(c))[1] > 0          # an empty field is null: length 0
        info.extra_rows += int(extra.sum())
        info.extra_lines += lines[extra][:20 - len(info.extra_lines)].tolist()
    return _kept(lines, r, ts, u, user, movie, opts, info)


def _kept(lines, r, ts, uid, user, movie, opts: MovieLensOptions, info: BlockInfo) -> Rows:
    thr = opts.positive_threshold
    keep = ~(r == thr) if opts.drop_neutral else np.ones(len(r), bool)
    info.dropped_neutral += int(len(r) - keep.sum())
    return Rows(lines[keep], (r[keep] > thr).astype(np.float32), ts[keep], uid[keep], user[keep], movie[keep])


def _parse_rows(path: Path, block: bytes, first: int, layout: str, width: int, lookup: Lookup,
                opts: MovieLensOptions, sink: RowSink, info: BlockInfo) -> Rows:
    """The row parser over one block (the block had a line that the vectorised checks refused)."""
    uf = NAMES[layout]
    vals = []
    for i, raw in enumerate(split_lines(block)):
        lineno = first + i
        try:
            uid, mid, rating, ts, extra = parse_rating(raw, layout, width)
            mi = _index(lookup.movie_ids, np.array([mid])) if _int64(mid) else None
            if mi is None:
                raise RowError(uf[1], "unknown_movie", f"movie {mid} is not in the movies file")
            if not _int64(uid):
                raise RowError(uf[0], "unknown_user", f"user {uid} is outside the int64 range")
            ui = _user_index(lookup, np.array([uid], np.int64))
            if ui is None:
                raise RowError(uf[0], "unknown_user", f"user {uid} is not in users.dat")
        except RowError as e:
            sink.bad(path, lineno, e, raw)
            continue
        if extra:
            info.extra_rows += 1
            info.extra_lines += [lineno][:20 - len(info.extra_lines)]
        vals.append((lineno, rating, ts, uid, int(ui[0]), int(mi[0])))
    cols = list(zip(*vals)) or [()] * 6
    i64 = lambda j: np.array(cols[j], np.int64)  # noqa: E731
    return _kept(i64(0), np.array(cols[1], np.float64), i64(2), i64(3), i64(4), i64(5), opts, info)


def iter_rows(task: Task, opts: MovieLensOptions, layout: str, width: int, lookup: Lookup, sink: RowSink,
              stats: BlockStats, info: BlockInfo):
    names, parse, convert = _options(layout, width)
    path = Path(task.path)
    for first, block, n in iter_blocks(task, opts.block_bytes):
        if first == 1 and layout == "csv":          # the header (checked by the parent)
            nl = block.find(b"\n")
            block, first, n = (block[nl + 1:] if nl >= 0 else b""), 2, n - 1
            if not block:
                continue
        stats.lines += n
        stats.blocks += 1
        t = read_block(block, n, names, parse, convert)
        rows = _parse_table(t, layout, first, lookup, opts, info) if t is not None else None
        if rows is None:
            stats.row_path_blocks += 1
            stats.row_path_lines += n
            rows = _parse_rows(path, block, first, layout, width, lookup, opts, sink, info)
        yield rows


def count_task(task: Task, opts: MovieLensOptions, layout: str, width: int, lookup: Lookup):
    """Kept ratings per user (a count per ``Lookup.user_ids``, or ``(ids, counts)`` of the users found
    when those are not known yet) and per movie, and the timestamp range of the kept rows."""
    known = lookup.user_ids is not None
    users = np.zeros(len(lookup.user_ids), np.int64) if known else ValueCounts(np.int64)
    movies = np.zeros(len(lookup.movie_ids), np.int64)
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    sink = RowSink(None, opts.skip_bad_rows, record=False)    # the write pass records bad rows once
    for rows in iter_rows(task, opts, layout, width, lookup, sink, BlockStats(), BlockInfo()):
        if known:
            users += np.bincount(rows.user, minlength=len(users))
        else:
            users.add(rows.uid)
        movies += np.bincount(rows.movie, minlength=len(movies))
        if len(rows.ts):
            lo, hi = min(lo, int(rows.ts.min())), max(hi, int(rows.ts.max()))
    return (users if known else users.compact()), movies, lo, hi, {f: dict(c) for f, c in sink.by_file.items()}


def ts_buckets(ts: np.ndarray, min_ts: int) -> np.ndarray:
    """``movielens_format.ts_bucket`` for an array: ln through Arrow (the C library's log, as math.log)."""
    dt = ts - min_ts
    lg = numpy_of(pc.ln(arrow(np.maximum(dt, 1).astype(np.float64))))
    return np.where(dt >= 1, (lg * lg).astype(np.int64), 0)


def feature_columns(rows: Rows, features: list[str], lookup: Lookup, min_ts: int) -> list[pa.Array]:
    """One Arrow column per feature, in ``features`` order."""
    cols = []
    for f in features:
        if f == "ts_bucket":
            cols.append(arrow(ts_buckets(rows.ts, min_ts)))
        elif f in MULTI_HOT:
            cnt = np.diff(lookup.genre_offsets)[rows.movie]
            off = np.zeros(len(cnt) + 1, np.int64)
            np.cumsum(cnt, out=off[1:])
            idx = np.repeat(lookup.genre_offsets[:-1][rows.movie] - off[:-1], cnt) + np.arange(off[-1])
            cols.append(pa.ListArray.from_arrays(arrow(off.astype(np.int32)), arrow(lookup.genre_ids[idx])))
        elif f in lookup.user_feats:
            cols.append(arrow(lookup.user_feats[f][rows.user]))
        else:
            cols.append(arrow(lookup.movie_feats[f][rows.movie]))
    return cols


@dataclass
class WriteResult:
    splits: dict
    rejects: dict
    reject_part: str | None
    accepted: int
    buckets: np.ndarray
    info: BlockInfo
    stats: BlockStats


def write_task(task: Task, opts: MovieLensOptions, layout: str, width: int, lookup: Lookup, min_ts: int,
               n_buckets: int, features: list[str], out: str, schema: pa.Schema) -> WriteResult:
    out_dir = Path(out)
    writer = DatasetWriter(out_dir, schema, opts.row_group_size, opts.compression, task=task.index)
    part = f"rejects.part-{task.index:05d}.tsv"
    sink = RowSink(out_dir, opts.skip_bad_rows, name=part)
    stats, info = BlockStats(), BlockInfo()
    buckets = np.zeros(n_buckets, np.int64)
    accepted = 0
    try:
        for rows in iter_rows(task, opts, layout, width, lookup, sink, stats, info):
            if not len(rows.lines):
                continue
            cols = feature_columns(rows, features, lookup, min_ts)
            if "ts_bucket" in features:
                buckets += np.bincount(numpy_of(cols[features.index("ts_bucket")]), minlength=n_buckets)
            codes = split_codes(row_uniform_np(opts.seed, rows.lines), opts.fractions)
            writer.append_table(codes, pa.Table.from_arrays([arrow(rows.label), *cols], schema=schema))
            accepted += len(rows.lines)
    finally:
        sink.close()
    return WriteResult(writer.close(empty_files=False), {f: dict(c) for f, c in sink.by_file.items()},
                       part if sink.path.is_file() else None, accepted, buckets, info, stats)
