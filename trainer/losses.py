"""Training losses: BCE plus an optional in-batch ranking term (pure torch; ``loss.*`` in the config).

Why a ranking term: with rare positives, BCE's gradient for a negative is sigmoid(z_j), which goes to
zero as soon as the model predicts the base rate, so negatives stop being pushed apart from the
positives of the same batch. A ranking term compares every positive with the negatives of the batch
and keeps that signal::

    loss     = BCE(z, y) + w * rank(z, y)
    pairwise = mean over pairs (i positive, j negative) of log(1 + exp(-(z_i - z_j)))      (RankNet)
    listwise = mean over positives i of -log( exp(z_i / T) / sum_j exp(z_j / T) )        (softmax over
               the whole batch, j running over every example, the positive itself included)

z are logits, y in {0, 1}. The pairs are formed inside the batch this module sees, i.e. inside one
rank's batch under data parallelism (no cross-rank gather: DDP averages the gradients as for BCE). A
batch without a positive, or (pairwise) without a negative, has no pair: its ranking term is 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RANKING = ("none", "pairwise", "listwise")


def pairwise_logistic(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of softplus(z_j - z_i) over positive i and negative j; 0 without such a pair.

    Computed as one [P, N] matrix per batch: fine for per-rank batches of a few thousand examples."""
    pos = labels > 0.5
    zp, zn = logits[pos], logits[~pos]
    if zp.numel() == 0 or zn.numel() == 0:
        return logits.sum() * 0.0   # keeps the graph (and the dtype/device) without a branch in the caller
    return F.softplus(zn.unsqueeze(0) - zp.unsqueeze(1)).mean()


def listwise_softmax(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positives of the softmax cross-entropy against the whole batch; 0 without positives."""
    pos = labels > 0.5
    if not bool(pos.any()):
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits / temperature, dim=0)
    return -logp[pos].mean()


class RankingBCELoss(nn.Module):
    """``forward(logits, labels) -> BCE + weight * ranking term`` (``ranking="none"``: plain BCE)."""

    def __init__(self, ranking: str = "none", weight: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if ranking not in RANKING:
            raise ValueError(f"ranking {ranking!r} is not one of {RANKING}")
        self.ranking, self.weight, self.temperature = ranking, float(weight), float(temperature)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        if self.ranking == "none" or self.weight == 0:
            return bce
        if self.ranking == "pairwise":
            return bce + self.weight * pairwise_logistic(logits, labels)
        return bce + self.weight * listwise_softmax(logits, labels, self.temperature)
