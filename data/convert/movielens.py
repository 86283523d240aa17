"""MovieLens -> Parquet. Two raw layouts, detected from the files present in ``src_dir``:

* ``ml-1m``: ``ratings.dat users.dat movies.dat``, ``::``-separated, latin-1 (every byte decodes).
* ``csv`` (ml-latest, ml-20m, ml-25m): ``ratings.csv`` (userId,movieId,rating,timestamp; trailing
  columns with an empty header name are tolerated: a value found in one is ignored, and the rows that
  had one are counted in ``manifest.source["ignored_extra_columns"]``) and ``movies.csv``
  (movieId,title,genres; quoted titles), UTF-8, header rows.
  No user demographics, so those features are absent.

What a valid line is: ``movielens_format.py`` (whole-star ratings in ``.dat``, half stars in ``.csv``,
timestamps in [1970, 2100), no NUL bytes, no user or movie defined twice with other attributes).

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
With ``min_count > 1`` rarer values share an OOV id (the last id). The split key is the ratings line
number (1-based, header included).

Engines: ``vector`` (default; ``movielens_vec.py``, worker processes over byte ranges of the ratings
file) and ``rows`` (the reference row parser); ``--history N`` (a ``history`` column: the user's
previous N movies, ``data/history.py``) needs one ordered pass over every row and runs on the row
engine. The counting pass of ``vector`` counts ratings per user
and per movie; every vocabulary follows from those counts and the side tables.
"""
from __future__ import annotations

from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np

from data import history

from data.convert.blocks import plan_tasks
from data.convert.common import (MovieLensOptions, OptionsError, Vocab, check_rows_left, file_checksums, finish,
                                 merge_task_results, row_uniform, split_of)
from data.convert.criteo_vec import BlockStats, ValueCounts
from data.convert.movielens_format import (CSV_FILES, ML1M_FILES, MULTI_HOT, NAMES, PRESETS, RATINGS_HEADER,
                                           USER_FEATURES, check_header, detect_layout, parse_movie_csv,
                                           parse_movie_dat, parse_rating, parse_user, read_table, ts_bucket)
from data.convert.movielens_vec import USER_SIDE, Lookup, count_task, write_task
from data.convert.parallel import Pool
from data.errors import DataError
from data.manifest import SparseFeature
from data.readers import RowError, RowSink, decode, iter_lines, merge_rejects
from data.writer import DatasetWriter, StagedOutput, add_empty_files, arrow_schema, write_vocab


class _Source:
    """The raw inputs of one conversion: layout, features, side tables (read row by row, small)."""

    def __init__(self, src_dir: Path, opts: MovieLensOptions, sink: RowSink):
        self.layout = detect_layout(src_dir)
        if (self.layout, opts.preset) not in PRESETS:
            raise OptionsError(f"preset {opts.preset!r} needs the ml-1m layout (users.dat demographics)")
        self.features = PRESETS[(self.layout, opts.preset)] + ([history.FEATURE] if opts.history else [])
        self.history = history.builder(opts, self.features)   # data/history.py; None without --history
        self.opts = opts
        if self.layout == "ml-1m":
            self.files = [src_dir / f for f in ML1M_FILES]
            self.users = read_table(self.files[1], parse_user, sink, what="user")
            self.movies = read_table(self.files[2], parse_movie_dat, sink, what="movie")
        else:
            self.files = [src_dir / f for f in CSV_FILES]
            self.users = None
            self.movies = read_table(self.files[1], parse_movie_csv, sink, header="movieId,title,genres", what="movie")
        self.ratings = self.files[0]
        self.width = 4
        if self.layout == "csv":
            with closing(iter_lines(self.ratings)) as lines:
                first = next(lines)[1]
            self.width = check_header(self.ratings, decode(first, "utf-8"), RATINGS_HEADER)
        self.dropped_neutral = self.extra_rows = 0
        self.extra_lines: list[int] = []     # the first 20 only: memory stays constant

    # -- row engine

    def rows(self, sink: RowSink):
        """Yield ``(lineno, label, timestamp, {feature: raw value})`` for each kept rating row."""
        thr = self.opts.positive_threshold
        self.dropped_neutral, self.extra_rows, self.extra_lines = 0, 0, []
        for lineno, raw in iter_lines(self.ratings, self.opts.progress):
            if self.layout == "csv" and lineno == 1:
                continue
            try:
                uid, mid, rating, ts, extra = parse_rating(raw, self.layout, self.width)
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
            raise RowError(NAMES[self.layout][1], "unknown_movie", f"movie {mid} is not in the movies file")
        v = {"user_id": uid, "movie_id": mid, "year": movie[0], "genres": movie[1], "genre_combo": movie[2]}
        if self.users is not None:
            user = self.users.get(uid)
            if user is None:
                raise RowError("UserID", "unknown_user", f"user {uid} is not in users.dat")
            v.update(zip(USER_FEATURES, user))
        return v

    def source(self, opts: MovieLensOptions, min_ts: int, vocab_files: dict, engine: dict) -> dict:
        return {"kind": "movielens-1m" if self.layout == "ml-1m" else "movielens-csv", "layout": self.layout,
                "files": file_checksums(self.files), "options": opts.to_dict(), "preset": opts.preset,
                "dropped_neutral": self.dropped_neutral,
                "ignored_extra_columns": {"rows": self.extra_rows, "first_lines": self.extra_lines},
                "min_timestamp": min_ts, "ts_bucket": "int(ln(t - min_timestamp)^2), 0 when t - min < 1",
                "vocab": vocab_files, "split": "random", "split_key": "ratings line number", "engine": engine}


def convert(src_dir: Path, out_dir: Path, opts: MovieLensOptions):
    opts.validate()
    with StagedOutput(out_dir, opts.overwrite) as stage:
        out = stage.tmp
        sink = RowSink(out, opts.skip_bad_rows)
        src = _Source(src_dir, opts, sink)
        if opts.engine == "rows" or src.history:
            return _convert_rows(src, out, sink)
        sink.close()
        return _convert_vector(src, out, sink)


def _vocab_files(out: Path, src: _Source, vocabs: dict, buckets: list[int]) -> dict:
    files = {f: v.save(out, src.opts.compression) for f, v in vocabs.items()}
    if "ts_bucket" in src.features:
        files["ts_bucket"] = write_vocab(out, "ts_bucket", [str(b) for b in range(len(buckets))], buckets,
                                         src.opts.compression)
    return files


def _features(features: list[str], vocabs: dict, n_buckets: int, hist=None) -> list[SparseFeature]:
    return [SparseFeature("ts_bucket", n_buckets) if f == "ts_bucket" else
            hist.feature(len(vocabs["movie_id"])) if f == history.FEATURE else vocabs[f].feature(f in MULTI_HOT)
            for f in features]


def _no_rows(src: _Source, rejected: dict) -> None:
    check_rows_left([src.ratings], {}, rejected)      # names the ratings file and its reject reasons
    raise DataError(src.ratings, "no usable rating rows")


# ----------------------------------------------------------------------------- vector engine

def _attrs(src: _Source, uid: int) -> dict:
    user = src.users[uid] if src.users is not None else ()
    return dict(zip(USER_FEATURES, user), user_id=uid)


def _entity_counters(src: _Source, users: np.ndarray, movies: np.ndarray, lk: Lookup) -> dict:
    """Value counts of every vocabulary feature, from the kept ratings per user and per movie
    (the same counts as a pass over the rows: each row adds one to its user's and movie's values)."""
    counts = {f: Counter() for f in src.features if f != "ts_bucket"}
    user_side = counts.keys() & set(USER_SIDE)
    for uid, n in zip(lk.user_ids.tolist(), users.tolist()):
        if n:
            attrs = _attrs(src, uid)
            for f in user_side:
                counts[f][attrs[f]] += n
    for mid, n in zip(lk.movie_ids.tolist(), movies.tolist()):
        if n:
            year, genres, combo = src.movies[mid]
            attrs = {"movie_id": mid, "year": year, "genre_combo": combo}
            for f in counts:
                if f == "genres":
                    for g in genres:
                        counts[f][g] += n
                elif f in attrs:
                    counts[f][attrs[f]] += n
    return counts


def _ids(vocab: Vocab, value) -> int:
    try:
        return vocab.id(value)
    except KeyError:      # an entity without kept ratings: its value may be in no vocabulary
        return -1


def _fill_lookup(src: _Source, lk: Lookup, vocabs: dict) -> None:
    users = [_attrs(src, u) for u in lk.user_ids.tolist()]
    for f in vocabs.keys() & set(USER_SIDE):
        lk.user_feats[f] = np.array([_ids(vocabs[f], u[f]) for u in users], np.int64)
    movies = [src.movies[m] for m in lk.movie_ids.tolist()]
    side = {"movie_id": lk.movie_ids.tolist(), "year": [m[0] for m in movies], "genre_combo": [m[2] for m in movies]}
    for f in vocabs.keys() & set(side):
        lk.movie_feats[f] = np.array([_ids(vocabs[f], v) for v in side[f]], np.int64)
    if "genres" in vocabs:
        lens = [len(m[1]) for m in movies]
        lk.genre_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        lk.genre_ids = np.array([_ids(vocabs["genres"], g) for m in movies for g in m[1]], np.int64)


def _merge_counts(src: _Source, lk: Lookup, counted: list):
    """Per-task counts -> (users, movies, min ts, max ts); fills ``lk.user_ids`` in the csv layout."""
    movies = sum(c[1] for c in counted)
    if lk.csv_users:
        vc = ValueCounts()
        for (ids, n), *_ in counted:
            vc.add(ids, n)
        lk.user_ids, users = vc.compact()
    else:
        users = sum(c[0] for c in counted)
    return users, movies, min(c[2] for c in counted), max(c[3] for c in counted)


def _convert_vector(src: _Source, out: Path, side_sink: RowSink):
    opts = src.opts
    csv_users = src.users is None
    lk = Lookup(None if csv_users else np.array(sorted(src.users), np.int64),
                np.array(sorted(src.movies), np.int64), csv_users=csv_users)
    stats = BlockStats()
    with Pool(opts.num_workers()) as pool:
        tasks = plan_tasks([src.ratings], opts.task_bytes, pool)
        counted = pool.map(count_task, [(t, opts, src.layout, src.width, lk) for t in tasks])
        users, movies, lo, hi = _merge_counts(src, lk, counted)
        if not movies.sum():
            rejected = {f: Counter(c) for f, c in side_sink.by_file.items()}
            for c in counted:
                for f, r in c[4].items():
                    rejected.setdefault(f, Counter()).update(r)
            _no_rows(src, rejected)
        vocabs = {f: Vocab.build(f, c, opts.min_count) for f, c in _entity_counters(src, users, movies, lk).items()}
        _fill_lookup(src, lk, vocabs)
        n_buckets = ts_bucket(hi - lo) + 1
        sparse = _features(src.features, vocabs, n_buckets)
        schema = arrow_schema([], sparse)
        results = pool.map(write_task, [(t, opts, src.layout, src.width, lk, lo, n_buckets, src.features,
                                         str(out), schema) for t in tasks])
    rejected = {f: Counter(c) for f, c in side_sink.by_file.items()}
    splits = merge_task_results(results, rejected, stats)
    for r in results:
        src.dropped_neutral += r.info.dropped_neutral
        src.extra_rows += r.info.extra_rows
        src.extra_lines += r.info.extra_lines[:20 - len(src.extra_lines)]
    merge_rejects(out, _reject_parts(out, side_sink, results))
    kept = sum(r.accepted for r in results) + src.dropped_neutral
    check_rows_left([src.ratings], {src.ratings.name: kept}, rejected)
    add_empty_files(out, schema, splits, opts.compression)
    buckets = sum(r.buckets for r in results).tolist()
    engine = {"name": "vector", "tasks": len(tasks), "blocks": stats.blocks, "lines": stats.lines,
              "row_path_blocks": stats.row_path_blocks, "row_path_lines": stats.row_path_lines}
    source = src.source(opts, lo, _vocab_files(out, src, vocabs, buckets), engine)
    return finish(out, source, [], sparse, splits, rejected, opts)


def _reject_parts(out: Path, side_sink: RowSink, results) -> list[Path]:
    """Side-table rejects first (they were read first), then each task's, in input order."""
    parts = []
    if side_sink.path is not None and side_sink.path.is_file():
        side = out / "rejects.part-side.tsv"
        side_sink.path.rename(side)
        parts.append(side)
    return parts + [out / r.reject_part for r in results if r.reject_part]


# ----------------------------------------------------------------------------- row engine (reference)

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
    return counts, lo, hi, n


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


def _convert_rows(src: _Source, out: Path, sink: RowSink):
    opts = src.opts
    count_sink = RowSink(None, opts.skip_bad_rows, record=False)
    counts, min_ts, max_ts, n = _count_pass(src, count_sink)
    if n == 0:
        sink.close()
        _no_rows(src, {**sink.by_file, **count_sink.by_file})
    vocabs = {f: Vocab.build(f, c, opts.min_count) for f, c in counts.items()}
    n_buckets = ts_bucket(max_ts - min_ts) + 1
    if src.history:
        src.history.finish(vocabs["movie_id"].id)
    sparse = _features(src.features, vocabs, n_buckets, src.history)
    writer = DatasetWriter(out, arrow_schema([], sparse), opts.row_group_size, opts.compression)
    buckets = _write_pass(src, writer, sink, vocabs, min_ts)
    splits = writer.close()
    sink.close()
    accepted = sum(s.rows for s in splits.values()) + src.dropped_neutral
    check_rows_left([src.ratings], {src.ratings.name: accepted}, sink.by_file)
    source = src.source(opts, min_ts, _vocab_files(out, src, vocabs, [buckets[b] for b in range(n_buckets)]),
                        {"name": "rows"} | ({"why": "--history needs one ordered pass"} if src.history else {}))
    if src.history:
        source["history"] = src.history.summary()
    return finish(out, source, [], sparse, splits, sink.by_file, opts)
