"""Embedding-collapse maths (trainer/collapse.py) against numpy's float64 SVD, and the single-process
diagnostics of a real sharded model against the SVD of its gathered weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.collapse import gram, grams_by_group, information_abundance, spectrum_from_gram, summarize


def _svd(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a.astype(np.float64), compute_uv=False)


@pytest.mark.parametrize("n,d", [(50, 8), (7, 16), (300, 4)])
def test_spectrum_from_gram_is_the_svd(n, d):
    rng = np.random.default_rng(n + d)
    # a decaying spectrum: the small singular values are the ones float32 eigenvalues would lose
    a = rng.normal(size=(n, d)) @ np.diag(np.logspace(0, -3, d))
    s = spectrum_from_gram(gram(torch.from_numpy(a).float())).numpy()
    ref = np.zeros(d)
    ref[: min(n, d)] = _svd(a.astype(np.float32))
    # a Gram matrix resolves singular values down to about sqrt(eps) x the largest (collapse.py)
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-7 * ref.max())


def test_information_abundance_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 12))
    ref = _svd(a).sum() / _svd(a).max()
    got = information_abundance(spectrum_from_gram(gram(torch.from_numpy(a))))
    assert got == pytest.approx(ref, rel=1e-10)
    # rank one -> 1; orthonormal columns -> d; zeros -> undefined
    u = rng.normal(size=(30, 1))
    assert information_abundance(spectrum_from_gram(gram(torch.from_numpy(u @ rng.normal(size=(1, 6)))))) \
        == pytest.approx(1.0, abs=1e-6)
    q, _ = np.linalg.qr(rng.normal(size=(40, 5)))
    assert information_abundance(spectrum_from_gram(gram(torch.from_numpy(q)))) == pytest.approx(5.0, rel=1e-10)
    assert math.isnan(information_abundance(torch.zeros(4)))


def test_gram_is_additive_over_row_shards_and_groups():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(90, 6)))
    grp = torch.from_numpy(rng.integers(-1, 3, size=90))
    by = grams_by_group(a, grp, 3)
    for k in range(3):
        torch.testing.assert_close(by[k], gram(a[grp == k]))
    # rows in group -1 are in no group
    torch.testing.assert_close(by.sum(0), gram(a[grp >= 0]))
    torch.testing.assert_close(gram(a[:40]) + gram(a[40:]), gram(a))


def test_summarize_records_rows_spectrum_and_abundance():
    a = torch.from_numpy(np.random.default_rng(2).normal(size=(20, 4)))
    r = summarize(gram(a), 20)
    assert r["rows"] == 20 and len(r["singular_values"]) == 4
    np.testing.assert_allclose(r["singular_values"], _svd(a.numpy()), rtol=1e-6)   # kept to 7 digits
    empty = summarize(torch.zeros(4, 4, dtype=torch.float64), 0)
    assert empty["rows"] == 0 and math.isnan(empty["abundance"]) and empty["singular_values"] == []


def test_row_groups_of_a_dataset_without_statistics(tiny_ml, tmp_path):
    """Seen ids get their bucket, never-seen ids -1; a dataset without stats/ gives None (one group)."""
    import shutil

    from data.stats import bucket_of, load_counts
    from trainer.diagnostics import row_groups

    g = row_groups(str(tiny_ml), "movie_id")
    counts = load_counts(tiny_ml)["movie_id"]
    assert (g[counts == 0] == -1).all() and np.array_equal(g[counts > 0], bucket_of(tiny_ml, "movie_id")[counts > 0])
    bare = tmp_path / "bare"
    shutil.copytree(tiny_ml, bare, ignore=shutil.ignore_patterns("stats"))
    assert row_groups(str(bare), "movie_id") is None
