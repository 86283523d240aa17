"""Evaluation: global AUC / log loss / NE, overall and per id-frequency bucket (head/torso/tail).

No prediction is gathered. Each rank keeps, per result group, a fixed-bin histogram of its
predictions (``AUC_BINS`` bins uniform in logit over the clipped range, one row for positives and one
for negatives) and exact sums (examples, positives, log loss); one all-reduce adds them up, and every
rank computes the same global metrics from the sums. Log loss and NE are exact; AUC counts every
positive/negative pair in different bins exactly and a pair inside one bin as half (as
scikit-learn does for tied scores), so its error is at most half the share of pairs that share a
bin (``histogram_auc`` returns that bound; with 2**16 bins it is ~1e-5 on predictions spread over
a few logits, and the tests hold it to 1e-4 of scikit-learn). Memory: 16 bytes per bin and group,
whatever the number of examples. ``binary_metrics`` / ``bucketed_metrics`` are the exact
scikit-learn versions over arrays (the reference in the tests).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

from data.generate import PLANTED_GROUPS
from data.stats import BUCKETS

# every name a result row can carry, in report order: overall, frequency buckets, planted groups
RESULT_GROUPS = ("all", *BUCKETS, *PLANTED_GROUPS)
AUC_BINS = 1 << 16
EPS = 1e-7                                       # predictions are clipped to [EPS, 1 - EPS]
LOGIT_RANGE = math.log((1 - EPS) / EPS) + 0.01   # bins cover every clipped prediction
log = logging.getLogger(__name__)


def binary_metrics(p: np.ndarray, y: np.ndarray) -> dict:
    """AUC, log loss and normalised entropy (log loss / entropy of the base rate)."""
    out = {"examples": int(len(y)), "positives": int(y.sum())}
    if len(y) == 0:
        return out | {"auc": math.nan, "logloss": math.nan, "ne": math.nan}
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    ll = float(log_loss(y, p, labels=[0, 1]))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan
    return out | {"auc": auc, "logloss": ll, "ne": ll / base_entropy(float(y.sum()), len(y))}


def bucketed_metrics(p: np.ndarray, y: np.ndarray, bucket: np.ndarray | None,
                     group: np.ndarray | None = None, group_names: tuple[str, ...] = ()) -> dict:
    res = {"all": binary_metrics(p, y)}
    for arr, names in ((bucket, BUCKETS), (group, group_names)):
        if arr is not None:
            for b, name in enumerate(names):
                m = arr == b
                res[name] = binary_metrics(p[m], y[m])
    return res


def base_entropy(positives: float, examples: float) -> float:
    base = min(max(positives / examples, EPS), 1 - EPS)
    return -(base * math.log(base) + (1 - base) * math.log(1 - base))


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """``(AUC, error bound)`` from per-bin positive and negative counts (bins in ascending score order).

    Pairs in different bins are ordered exactly; a pair in one bin counts half, so the AUC of the
    underlying scores lies within ``bound`` = half the share of such pairs."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return math.nan, math.nan
    below = np.cumsum(neg) - neg                  # negatives in lower bins
    tied = float((pos * neg).sum())
    return float(((pos * below).sum() + 0.5 * tied) / (p * n)), 0.5 * tied / (p * n)


class StreamingMetrics:
    """Per-group histograms and sums of one evaluation; ``update`` per batch, ``all_reduce``, ``result``.

    ``names``: the result groups (slot order); ``update`` takes, per example, the slots it counts in
    (one tensor per grouping, -1 for none)."""

    def __init__(self, names: tuple[str, ...], device: torch.device, bins: int = AUC_BINS):
        self.names, self.bins = tuple(names), bins
        g = len(self.names)
        self.hist = torch.zeros(2, g * bins, dtype=torch.float64, device=device)   # [negatives, positives]
        self.sums = torch.zeros(3, g, dtype=torch.float64, device=device)          # examples, positives, log loss

    def bin_of(self, p: torch.Tensor) -> torch.Tensor:
        z = torch.log(p) - torch.log1p(-p)
        return ((z + LOGIT_RANGE) * (self.bins / (2 * LOGIT_RANGE))).floor().clamp_(0, self.bins - 1).long()

    def update(self, p: torch.Tensor, y: torch.Tensor, slots: list[torch.Tensor]) -> None:
        p = p.double().clamp(EPS, 1 - EPS)
        y = y.double()
        b = self.bin_of(p)
        loss = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
        for s in slots:
            keep = s >= 0
            sk, yk = s[keep], y[keep]
            idx = sk * self.bins + b[keep]
            self.hist[1].index_add_(0, idx, yk)
            self.hist[0].index_add_(0, idx, 1 - yk)
            self.sums[0].index_add_(0, sk, torch.ones_like(yk))
            self.sums[1].index_add_(0, sk, yk)
            self.sums[2].index_add_(0, sk, loss[keep])

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.hist)
            dist.all_reduce(self.sums)

    def result(self) -> dict:
        hist = self.hist.cpu().numpy().reshape(2, len(self.names), self.bins)
        sums = self.sums.cpu().numpy()
        out = {}
        for g, name in enumerate(self.names):
            n, pos, ll = (float(x) for x in sums[:, g])
            row = {"examples": int(round(n)), "positives": int(round(pos))}
            if n == 0:
                out[name] = row | {"auc": math.nan, "logloss": math.nan, "ne": math.nan}
                continue
            auc, bound = histogram_auc(hist[1, g], hist[0, g])
            if bound > 1e-3:
                log.info("AUC of %s within +-%.1e (predictions share bins; AUC_BINS=%d)", name, bound, self.bins)
            out[name] = row | {"auc": auc, "logloss": ll / n, "ne": ll / n / base_entropy(pos, n)}
        return out


def _feature_ids(kjt, feature: str) -> torch.Tensor:
    """One id per example; padding rows (empty bags) get id 0 and are masked out by their weight."""
    jt = kjt[feature]
    lengths = jt.lengths()
    if bool((lengths > 1).any()):
        raise ValueError(f"bucket feature {feature!r} must be single-valued (one id per example)")
    ids = torch.zeros(lengths.numel(), dtype=torch.long, device=lengths.device)
    ids[lengths == 1] = jt.values().long()
    return ids


def _slots(ids: torch.Tensor, table: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Slot of each example in one grouping: ``offset + table[id]``, -1 outside ``[0, count)``."""
    g = table[ids]
    return torch.where((g >= 0) & (g < count), g + offset, torch.full_like(g, -1))


@torch.no_grad()
def evaluate(model, loader, device: torch.device, bucket_of_id: np.ndarray | None = None,
             bucket_feature: str = "", progress=None, group_of_id: np.ndarray | None = None,
             group_names: tuple[str, ...] = PLANTED_GROUPS, bins: int = AUC_BINS) -> dict:
    """Run the TrainModule-style ``model(batch) -> (loss, (loss, logits, labels))`` over ``loader``.

    ``group_of_id``: optional second id -> group map on ``bucket_feature`` (e.g. planted twins /
    loners / others), reported next to the head/torso/tail buckets under ``group_names``."""
    names = ["all"]
    tables = []                         # (id -> index table, slot offset, number of groups)
    for arr, group in ((bucket_of_id, BUCKETS), (group_of_id, tuple(group_names))):
        if arr is not None:
            tables.append((torch.as_tensor(np.asarray(arr), dtype=torch.long, device=device), len(names), len(group)))
            names += group
    metrics = StreamingMetrics(tuple(names), device, bins)
    was_training = model.training
    model.eval()
    for batch in progress(loader) if progress else loader:
        batch = batch.to(device)
        _, (_, logits, y) = model(batch)
        w = getattr(batch, "weights", None)  # 0 marks the loader's padding rows (equal batch counts per rank)
        keep = slice(None) if w is None else w > 0
        p, y = torch.sigmoid(logits.float())[keep], y.float()[keep]
        slots = [torch.zeros(len(y), dtype=torch.long, device=device)]
        if tables:
            ids = _feature_ids(batch.sparse_features, bucket_feature)[keep]
            slots += [_slots(ids, t, off, n) for t, off, n in tables]
        metrics.update(p, y, slots)
    model.train(was_training)
    metrics.all_reduce()
    return metrics.result()
