"""User-history feature for MovieLens: each rating's previous N movies of the same user, by timestamp.

``tailrec convert movielens --history N`` adds a multi-valued column ``history``: the movie ids
(``movie_id``'s vocabulary, so a model can look them up in the movie table) of the user's N most
recent earlier ratings, most recent first. Every kept rating counts as a behaviour, whatever its label
(the user watched the movie; the label of the current row is never used), and the history of a row
in valid/test may hold train rows and vice versa: they happened earlier, so they are known at that time.

Order and ties (``--history-ties``):

* ``strict`` (default): only ratings with a strictly earlier timestamp. Ratings of one user in the
  same second are not ordered by anything real (MovieLens users often rate in bursts), so none of
  them sees the others; with a constant timestamp (or none) every history is empty.
* ``line``: ties are broken by the line order of the ratings file, so same-second (or constant)
  timestamps still give histories, in file order. Use it only when the file order is meaningful.

``manifest.json`` records the length, the tie rule and how many rows got an empty / full history
(``source.history``), so a constant-timestamp dataset is visible at a glance.

Memory: the builder holds four int64 numbers per kept rating and, after ``finish``, an int32 matrix of
``rows x N``; ML-25M at N = 20 is about 2.8 GB. The converter calls ``observe`` in its counting pass,
``finish`` once the movie vocabulary exists, and ``ids`` while writing (data/convert/movielens.py).
"""
from __future__ import annotations

from array import array

import numpy as np

from data.manifest import SparseFeature

FEATURE = "history"
TIES = ("strict", "line")


def check_options(length: int, ties: str) -> None:
    """Raises ValueError (the converter's OptionsError is a ValueError) on bad options."""
    if length < 0:
        raise ValueError(f"history must be >= 0 (0 = no history feature), got {length}")
    if ties not in TIES:
        raise ValueError(f"history_ties must be one of {list(TIES)}, got {ties!r}")


def previous_items(user: np.ndarray, ts: np.ndarray, order: np.ndarray, item: np.ndarray, n: int,
                   ties: str = "strict") -> np.ndarray:
    """[rows, n] int64: for each row, the items of the same user's n latest earlier rows, most recent
    first, -1 where there are fewer. ``order`` breaks timestamp ties (the line number); with
    ``ties="strict"`` rows of the same user and timestamp never see each other."""
    check_options(n, ties)
    rows = len(user)
    out = np.full((rows, n), -1, dtype=np.int64)
    if rows == 0 or n == 0:
        return out
    perm = np.lexsort((order, ts, user))          # by user, then time, then line
    u, t, it = user[perm], ts[perm], item[perm]
    pos = np.arange(rows)
    new_user = np.r_[True, u[1:] != u[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    if ties == "strict":
        new_group = new_user | np.r_[True, t[1:] != t[:-1]]
        end = np.maximum.accumulate(np.where(new_group, pos, 0))   # first row of this (user, ts) group
    else:
        end = pos
    for j in range(n):                             # the (j+1)-th most recent earlier row
        src = end - 1 - j
        ok = src >= user_start
        col = np.full(rows, -1, dtype=np.int64)
        col[ok] = it[src[ok]]
        out[perm, j] = col
    return out


class HistoryBuilder:
    """Collects (line, user, timestamp, raw movie id) per kept rating, then answers ``ids(line)``."""

    def __init__(self, length: int, ties: str = "strict"):
        check_options(length, ties)
        self.length, self.ties = length, ties
        self._cols = self._empty()
        self._lines = self._hist = None

    @staticmethod
    def _empty() -> list[array]:
        return [array("q") for _ in range(4)]   # 8 bytes per number (a list of ints would take ~4x)

    def observe(self, line: int, user: int, ts: int, movie) -> None:
        for c, v in zip(self._cols, (line, user, ts, movie)):
            c.append(v)

    def finish(self, movie_id_of) -> None:
        """``movie_id_of(raw) -> dense id`` (the movie vocabulary's ``id``)."""
        lines, users, ts, raw = (np.frombuffer(c, dtype=np.int64) if len(c) else np.zeros(0, np.int64)
                                 for c in self._cols)
        self._cols = self._empty()
        uniq, inv = np.unique(raw, return_inverse=True)
        dense = np.array([movie_id_of(int(v)) for v in uniq], dtype=np.int64)[inv] if len(raw) else raw
        order = np.argsort(lines, kind="stable")
        self._lines = lines[order]
        self._hist = previous_items(users[order], ts[order], self._lines, dense[order], self.length,
                                    self.ties).astype(np.int32)

    def ids(self, line: int) -> list[int]:
        i = int(np.searchsorted(self._lines, line))
        if i >= len(self._lines) or self._lines[i] != line:
            raise KeyError(f"history: line {line} was not observed in the counting pass")
        h = self._hist[i]
        return [int(x) for x in h[h >= 0]]

    def feature(self, num_movies: int) -> SparseFeature:
        return SparseFeature(FEATURE, num_movies, multi_hot=True)

    def summary(self) -> dict:
        n = (self._hist >= 0).sum(axis=1) if self._hist is not None else np.zeros(0)
        return {"length": self.length, "ties": self.ties, "order": "most recent first",
                "rows": int(len(n)), "empty_rows": int((n == 0).sum()), "full_rows": int((n == self.length).sum()),
                "mean_length": float(n.mean()) if len(n) else 0.0}


def builder(opts, features: list[str]) -> HistoryBuilder | None:
    """The converter's builder for ``opts.history`` (None when 0); needs user_id and movie_id."""
    if not opts.history:
        return None
    missing = [f for f in ("user_id", "movie_id") if f not in features]
    if missing:   # MovieLensOptions.validate refuses such options first (exit 2); this is a converter bug
        raise ValueError(f"history needs the features {missing}")
    return HistoryBuilder(opts.history, opts.history_ties)
