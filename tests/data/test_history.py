"""User-history feature (data/history.py): the pure function against a brute-force loop, tie rules,
constant timestamps, and the MovieLens converter's history column against the raw ratings."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.convert import MovieLensOptions, OptionsError, convert_movielens, row_uniform, split_of
from data.history import HistoryBuilder, previous_items
from data.manifest import load_manifest
from data.writer import load_vocab

SHARED = Path(os.environ.get("TAILREC_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]
MOVIES = [f"{m}::Film {m} (1990)::Drama" for m in range(1, 9)]


def brute(user, ts, order, item, n, ties):
    out = []
    for r in range(len(user)):
        if ties == "strict":
            prev = [q for q in range(len(user)) if user[q] == user[r] and ts[q] < ts[r]]
        else:
            prev = [q for q in range(len(user)) if user[q] == user[r] and (ts[q], order[q]) < (ts[r], order[r])]
        prev.sort(key=lambda q: (ts[q], order[q]), reverse=True)
        out.append([item[q] for q in prev[:n]] + [-1] * (n - len(prev[:n])))
    return np.array(out, dtype=np.int64).reshape(len(user), n)


@pytest.mark.parametrize("ties", ["strict", "line"])
@pytest.mark.parametrize("seed", [0, 1])
def test_previous_items_is_the_brute_force(ties, seed):
    rng = np.random.default_rng(seed)
    n = 200
    user = rng.integers(0, 7, n)
    ts = rng.integers(0, 25, n)               # many ties per user
    order = rng.permutation(n) * 3 + 1        # line numbers, not sorted
    item = rng.integers(0, 50, n)
    np.testing.assert_array_equal(previous_items(user, ts, order, item, 4, ties), brute(user, ts, order, item, 4, ties))


def test_constant_timestamps():
    user = np.array([5, 5, 5, 6, 6])
    ts = np.zeros(5, dtype=np.int64)
    line = np.array([10, 11, 12, 13, 14])
    item = np.array([1, 2, 3, 4, 5])
    assert (previous_items(user, ts, line, item, 3, "strict") == -1).all()    # nothing is "earlier"
    np.testing.assert_array_equal(previous_items(user, ts, line, item, 3, "line"),
                                  [[-1, -1, -1], [1, -1, -1], [2, 1, -1], [-1, -1, -1], [4, -1, -1]])


def test_builder_maps_raw_movies_and_answers_by_line():
    b = HistoryBuilder(2)
    for line, (u, t, m) in enumerate([(1, 5, 30), (1, 7, 10), (2, 1, 30), (1, 9, 20)], start=2):
        b.observe(line, u, t, m)
    b.finish({10: 0, 20: 1, 30: 2}.__getitem__)
    assert [b.ids(line) for line in (2, 3, 4, 5)] == [[], [2], [], [0, 2]]
    assert b.summary() == {"length": 2, "ties": "strict", "order": "most recent first", "rows": 4,
                                "empty_rows": 2, "full_rows": 1, "mean_length": 0.75}
    with pytest.raises(KeyError, match="line 9"):
        b.ids(9)


def _raw(d: Path, lines: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "users.dat").write_text("\n".join(USERS) + "\n", encoding="latin-1")
    (d / "movies.dat").write_text("\n".join(MOVIES) + "\n", encoding="latin-1")
    (d / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return d


@pytest.mark.parametrize("ties", ["strict", "line"])
def test_converter_history_column_matches_the_raw_ratings(tmp_path, ties):
    r = random.Random(3)
    lines = [f"{r.randint(1, 3)}::{r.randint(1, 8)}::{r.randint(1, 5)}::{1000 + r.randint(0, 30)}" for _ in range(300)]
    out = tmp_path / f"out_{ties}"
    m = convert_movielens(_raw(tmp_path / "raw", lines), out,
                          MovieLensOptions(stats=False, progress=False, history=3, history_ties=ties))
    assert m.sparse_features[-1].name == "history" and m.sparse_features[-1].multi_hot
    assert m.feature("history").num_embeddings == m.feature("movie_id").num_embeddings
    hist = m.source["history"]
    assert hist["length"] == 3 and hist["ties"] == ties and hist["rows"] == sum(s.rows for s in m.splits.values())
    # brute force over the kept rows (rating 3 is dropped), in line order; ids through the movie vocabulary
    vocab = {v: i for i, v in enumerate(load_vocab(out, "movie_id"))}
    kept = [(i + 1, *map(int, ln.split("::"))) for i, ln in enumerate(lines) if ln.split("::")[2] != "3"]
    ref = brute([k[1] for k in kept], [k[4] for k in kept], [k[0] for k in kept],
                [vocab[str(k[2])] for k in kept], 3, ties)
    rows = {s: iter(r for f in m.splits[s].files for r in pq.read_table(out / f).to_pylist()) for s in m.splits}
    for (lineno, *_), want in zip(kept, ref):
        row = next(rows[split_of(row_uniform(42, lineno), (0.8, 0.1, 0.1))])
        assert row["history"] == [int(x) for x in want if x >= 0], lineno


def test_history_options_are_checked(tmp_path):
    for kw in ({"history": -1}, {"history": 2, "history_ties": "random"}, {"history": 2, "preset": "paper7"}):
        with pytest.raises(OptionsError, match="history"):
            MovieLensOptions(**kw).validate()


def test_history_cli_exit_2(tmp_path, capsys):
    from data.cli import main

    rc = main(["convert", "movielens", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--history", "-2"])
    assert rc == 2 and "history must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_real_ml_latest_small_history(tmp_path):
    src = SHARED / "ml-latest-small"
    if not (src / "ratings.csv").exists():
        pytest.skip(f"real MovieLens sample not found at {src} (set TAILREC_SHARED_DATA)")
    m = convert_movielens(src, tmp_path / "o", MovieLensOptions(stats=False, progress=False, history=5,
                                                                skip_bad_rows=True))
    h = m.source["history"]
    # real timestamps: almost every rating has an earlier one from the same user (first ratings, and
    # same-second bursts, are the empty ones)
    assert h["rows"] > 75_000 and h["empty_rows"] < 0.05 * h["rows"] and h["full_rows"] > 0.8 * h["rows"]
    t = pq.read_table(tmp_path / "o" / m.splits["train"].files[0], columns=["history"]).column(0).to_pylist()
    assert max(len(x) for x in t) == 5 and max(max(x) for x in t if x) < m.feature("movie_id").num_embeddings
