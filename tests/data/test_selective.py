"""data/selective.py: brute-force max-cosine reference, chunking, and the generator's planted twins/loners."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import data.selective as sel
from data.generate import generate_movielens
from data.stats import compute_stats

_spec = importlib.util.spec_from_file_location("stats_helpers", Path(__file__).with_name("test_stats.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def reference_domain(feats, records, feature, top_k, source_frac=0.2, q=0.2, target_frac=1.0):
    """Dense numpy from the brute-force co-occurrence; ranking by (count desc, id asc)."""
    counts, _, cooc = helpers.brute_force(feats, records, top_k)
    cnt, c = counts[feature], cooc[feature].astype(float)
    ranked = sorted((-cnt[i], i) for i in range(len(cnt)) if cnt[i] > 0)
    ids = [i for _, i in ranked]
    n_src = int(np.ceil(source_frac * len(ids)))
    rarest = set(ids[len(ids) - int(np.floor(target_frac * len(ids))):])   # the rarest target_frac of the seen ids
    src, tgt = ids[:n_src], [i for i in ids[n_src:] if i in rarest]
    norm = np.linalg.norm(c, axis=1, keepdims=True)
    u = np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)
    sim = u[tgt] @ u[src].T
    scores = sim.max(axis=1)
    nb = np.where(scores > 0, np.array(src)[sim.argmax(axis=1)], -1)
    return np.array(src), np.array(tgt), scores, np.quantile(scores, q), nb, np.sort(sim, axis=1)


@pytest.mark.parametrize("chunk_cells", [1 << 24, 3])
def test_matches_dense_reference(tmp_path, monkeypatch, chunk_cells):
    monkeypatch.setattr(sel, "_CHUNK_CELLS", chunk_cells)       # 3: one target row per chunk
    feats = {"user": (9, False), "movie": (30, False), "genre": (5, True)}
    recs = helpers.random_records(np.random.default_rng(1), feats, 120)
    ds = helpers.write_dataset(tmp_path / "ds", feats, recs)
    compute_stats(ds, top_k=12)
    dom = sel.selective_target_domain(ds, "movie")
    src, tgt, scores, eta, nb, sims = reference_domain(feats, recs, "movie", 12)
    np.testing.assert_array_equal(dom.source_ids, src)
    np.testing.assert_array_equal(dom.target_ids, tgt)
    np.testing.assert_allclose(dom.scores, scores, atol=1e-6)       # float32 products
    assert dom.eta == pytest.approx(eta, abs=1e-6)
    np.testing.assert_array_equal(dom.kept_ids, np.sort(tgt[dom.scores >= dom.eta]))
    clear = np.abs(scores - eta) > 1e-5                               # away from the threshold
    assert set(tgt[clear & (scores >= eta)]) <= set(dom.kept_ids)
    assert set(tgt[clear & (scores < eta)]) <= set(dom.dropped_ids)
    s = dom.summary()
    assert s["kept"] + s["dropped"] == s["target"] == len(tgt) and s["dropped"] >= 1
    # the neighbor is the arg max source id (where the best is clear of the runner-up; -1 without co-occurrence)
    clear_best = (sims[:, -1] - sims[:, -2] > 1e-5) | (scores == 0)
    assert clear_best.sum() >= len(tgt) // 2
    np.testing.assert_array_equal(dom.neighbors[clear_best], nb[clear_best])
    assert set(dom.neighbors[dom.scores > 0].tolist()) <= set(src.tolist())


@pytest.mark.parametrize("target_frac", [0.5, 0.3])
def test_target_frac_keeps_only_the_rarest_ids_as_targets(tmp_path, target_frac):
    feats = {"user": (9, False), "movie": (30, False), "genre": (5, True)}
    recs = helpers.random_records(np.random.default_rng(1), feats, 120)
    ds = helpers.write_dataset(tmp_path / "ds", feats, recs)
    compute_stats(ds, top_k=12)
    dom = sel.selective_target_domain(ds, "movie", target_frac=target_frac)
    src, tgt, scores, eta, nb, _ = reference_domain(feats, recs, "movie", 12, target_frac=target_frac)
    full = sel.selective_target_domain(ds, "movie")
    np.testing.assert_array_equal(dom.source_ids, src)               # the source does not change
    np.testing.assert_array_equal(dom.target_ids, tgt)
    assert 0 < len(tgt) < len(full.target_ids)
    np.testing.assert_allclose(dom.scores, scores, atol=1e-6)
    assert dom.eta == pytest.approx(eta, abs=1e-6)                    # eta: the quantile over the kept targets
    counts = helpers.brute_force(feats, recs, 12)[0]["movie"]
    dropped = sorted(set(full.target_ids.tolist()) - set(tgt.tolist()))
    assert min(counts[i] for i in dropped) >= max(counts[i] for i in tgt)   # the more frequent ones left


def test_save_load_roundtrip(tmp_path):
    feats = {"a": (6, False), "b": (8, False)}
    recs = helpers.random_records(np.random.default_rng(2), feats, 50)
    ds = helpers.write_dataset(tmp_path / "ds", feats, recs)
    compute_stats(ds, top_k=5)
    dom = sel.selective_target_domain(ds, "b")
    p = sel.save_selective(ds, "b", dom)
    back = sel.load_selective(ds, "b")
    for f in ("source_ids", "target_ids", "kept_ids", "dropped_ids", "scores", "neighbors"):
        np.testing.assert_array_equal(getattr(back, f), getattr(dom, f))
    assert back.eta == dom.eta
    first = p.read_bytes()
    sel.save_selective(ds, "b", sel.selective_target_domain(ds, "b"))
    assert p.read_bytes() == first


def _movielens_as_records(raw: Path) -> tuple[dict, list]:
    """A minimal test-only conversion of generated ML-1M files (ids 1-based -> 0-based)."""
    def table(name):
        return [line.split("::") for line in (raw / name).read_text("latin-1").splitlines()]
    users = {int(u[0]): u for u in table("users.dat")}
    movies = {int(m[0]): m for m in table("movies.dat")}
    genres = sorted({g for m in movies.values() for g in m[2].split("|")})
    ages, recs = [1, 18, 25, 35, 45, 50, 56], []
    for uid, mid, _, _ in table("ratings.dat"):
        u, m = users[int(uid)], movies[int(mid)]
        recs.append(dict(user=int(uid) - 1, movie=int(mid) - 1, gender=int(u[1] == "M"), age=ages.index(int(u[2])),
                         occ=int(u[3]), year=int(m[1][-5:-1]) - 1900,
                         genre=[genres.index(g) for g in m[2].split("|")]))
    feats = dict(user=(len(users), False), movie=(len(movies), False), gender=(2, False), age=(7, False),
                 occ=(21, False), year=(101, False), genre=(len(genres), True))
    return feats, recs


def test_planted_twins_kept_loners_dropped(tmp_path):
    generate_movielens(tmp_path / "raw", rows=30_000, seed=3, users=800, movies=500)
    feats, recs = _movielens_as_records(tmp_path / "raw")
    ds = helpers.write_dataset(tmp_path / "ds", feats, recs, row_group_size=8192)
    compute_stats(ds, top_k=200)
    dom = sel.selective_target_domain(ds, "movie")
    planted = json.loads((tmp_path / "raw" / "planted.json").read_text())
    score = dict(zip(dom.target_ids.tolist(), dom.scores))
    twins = [score[t - 1] for t, _ in planted["twins"] if t - 1 in score]
    loners = [score[m - 1] for m in planted["loners"] if m - 1 in score]
    assert len(twins) >= 15 and len(loners) >= 10
    assert np.mean(np.array(twins) >= dom.eta) >= 0.9           # twins look like their frequent parent
    assert np.mean(np.array(loners) < dom.eta) >= 0.7            # loners resemble no frequent movie
    assert np.median(twins) > np.median(loners) + 0.1
    # a twin's co-occurrence neighbor among the frequent movies is mostly its own parent
    nb = dict(zip(dom.target_ids.tolist(), dom.neighbors.tolist()))
    parent_hits = [nb[t - 1] == p - 1 for t, p in planted["twins"] if t - 1 in nb]
    assert np.mean(parent_hits) >= 0.9, np.mean(parent_hits)
