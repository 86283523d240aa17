"""BCE + in-batch ranking losses (trainer/losses.py) against float64 numpy loops of the formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.losses import RankingBCELoss, listwise_softmax, pairwise_logistic


def _batch(n=40, pos_rate=0.1, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=n)
    y = (rng.random(n) < pos_rate).astype(np.float64)
    y[0] = 1.0   # at least one positive
    y[1] = 0.0
    return z, y


def ref_bce(z, y):
    return float(np.mean([math.log1p(math.exp(-zi)) if yi else math.log1p(math.exp(zi)) for zi, yi in zip(z, y)]))


def ref_pairwise(z, y):
    terms = [math.log1p(math.exp(-(z[i] - z[j]))) for i in range(len(z)) if y[i] for j in range(len(z)) if not y[j]]
    return float(np.mean(terms)) if terms else 0.0


def ref_listwise(z, y, t=1.0):
    lse = math.log(sum(math.exp(zj / t) for zj in z))
    terms = [-(z[i] / t - lse) for i in range(len(z)) if y[i]]
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_and_listwise_match_the_formulas(seed):
    z, y = _batch(seed=seed)
    zt, yt = torch.tensor(z), torch.tensor(y)
    assert float(pairwise_logistic(zt, yt)) == pytest.approx(ref_pairwise(z, y), rel=1e-12)
    for t in (1.0, 0.5):
        assert float(listwise_softmax(zt, yt, t)) == pytest.approx(ref_listwise(z, y, t), rel=1e-12)


@pytest.mark.parametrize("ranking,weight", [("pairwise", 0.5), ("listwise", 2.0)])
def test_combined_loss_is_bce_plus_weighted_term(ranking, weight):
    z, y = _batch(seed=7)
    got = float(RankingBCELoss(ranking, weight, 1.0)(torch.tensor(z), torch.tensor(y)))
    term = ref_pairwise(z, y) if ranking == "pairwise" else ref_listwise(z, y)
    assert got == pytest.approx(ref_bce(z, y) + weight * term, rel=1e-12)


def test_none_is_exactly_torch_bce():
    z, y = (torch.tensor(a, dtype=torch.float32) for a in _batch(seed=3))
    assert torch.equal(RankingBCELoss("none")(z, y), nn.BCEWithLogitsLoss()(z, y))
    assert torch.equal(RankingBCELoss("pairwise", 0.0)(z, y), nn.BCEWithLogitsLoss()(z, y))


def test_gradient_of_a_negative_is_the_pairwise_formula():
    """d/dz_j of the pairwise term for a negative j: (1/(P N)) sum_i sigmoid(z_j - z_i) -- the signal
    BCE alone loses when sigmoid(z_j) is small."""
    z, y = _batch(n=30, seed=4)
    zt = torch.tensor(z, requires_grad=True)
    pairwise_logistic(zt, torch.tensor(y)).backward()
    pos, neg = np.flatnonzero(y), np.flatnonzero(y == 0)
    j = neg[0]
    ref = sum(1 / (1 + math.exp(-(z[j] - z[i]))) for i in pos) / (len(pos) * len(neg))
    assert float(zt.grad[j]) == pytest.approx(ref, rel=1e-12)


def test_batches_without_pairs_give_zero_and_keep_the_graph():
    z = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    for y in (torch.zeros(3), torch.ones(3)):
        p = pairwise_logistic(z, y)
        assert float(p) == 0.0 and p.requires_grad
    assert float(listwise_softmax(z, torch.zeros(3))) == 0.0
    loss = RankingBCELoss("listwise", 1.0)(z, torch.zeros(3))
    loss.backward()   # BCE's gradient only
    np.testing.assert_allclose(z.grad.numpy(), torch.sigmoid(z.detach()).numpy() / 3, rtol=1e-6)


def test_bad_ranking_name():
    with pytest.raises(ValueError, match="ranking"):
        RankingBCELoss("hinge")
