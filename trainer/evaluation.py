"""Evaluation: global AUC / log loss / NE, overall and per id-frequency bucket (head/torso/tail).

Predictions are all-gathered to every rank (exact global metrics, not a mean of per-rank or per-batch
AUCs, which is what the PEP reference code reports); the maths is scikit-learn's.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

from data.generate import PLANTED_GROUPS
from data.stats import BUCKETS

# every name a result row can carry, in report order: overall, frequency buckets, planted groups
RESULT_GROUPS = ("all", *BUCKETS, *PLANTED_GROUPS)


def binary_metrics(p: np.ndarray, y: np.ndarray) -> dict:
    """AUC, log loss and normalised entropy (log loss / entropy of the base rate)."""
    out = {"examples": int(len(y)), "positives": int(y.sum())}
    if len(y) == 0:
        return out | {"auc": math.nan, "logloss": math.nan, "ne": math.nan}
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    ll = float(log_loss(y, p, labels=[0, 1]))
    base = float(np.clip(y.astype(np.float64).mean(), 1e-7, 1 - 1e-7))
    h = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan
    return out | {"auc": auc, "logloss": ll, "ne": ll / h}


def bucketed_metrics(p: np.ndarray, y: np.ndarray, bucket: np.ndarray | None,
                     group: np.ndarray | None = None, group_names: tuple[str, ...] = ()) -> dict:
    res = {"all": binary_metrics(p, y)}
    for arr, names in ((bucket, BUCKETS), (group, group_names)):
        if arr is not None:
            for b, name in enumerate(names):
                m = arr == b
                res[name] = binary_metrics(p[m], y[m])
    return res


def gather_1d(t: torch.Tensor) -> torch.Tensor:
    """All-gather a variable-length 1-D tensor (pads to the longest rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    mx = int(max(s.item() for s in sizes))
    padded = torch.zeros(mx, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _feature_ids(kjt, feature: str) -> torch.Tensor:
    """One id per example; padding rows (empty bags) get id 0 and are masked out by their weight."""
    jt = kjt[feature]
    lengths = jt.lengths()
    if bool((lengths > 1).any()):
        raise ValueError(f"bucket feature {feature!r} must be single-valued (one id per example)")
    ids = torch.zeros(lengths.numel(), dtype=torch.long, device=lengths.device)
    ids[lengths == 1] = jt.values().long()
    return ids


@torch.no_grad()
def evaluate(model, loader, device: torch.device, bucket_of_id: np.ndarray | None = None,
             bucket_feature: str = "", progress=None, group_of_id: np.ndarray | None = None,
             group_names: tuple[str, ...] = PLANTED_GROUPS) -> dict:
    """Run the TrainModule-style ``model(batch) -> (loss, (loss, logits, labels))`` over ``loader``.

    ``group_of_id``: optional second id -> group map on ``bucket_feature`` (e.g. planted twins /
    loners / others), reported next to the head/torso/tail buckets under ``group_names``."""
    was_training = model.training
    model.eval()
    preds, labels, ids = [], [], []
    for batch in progress(loader) if progress else loader:
        batch = batch.to(device)
        _, (_, logits, y) = model(batch)
        w = getattr(batch, "weights", None)  # 0 marks the loader's padding rows (equal batch counts per rank)
        keep = slice(None) if w is None else w > 0
        preds.append(torch.sigmoid(logits.float())[keep])
        labels.append(y.float()[keep])
        if bucket_of_id is not None or group_of_id is not None:
            ids.append(_feature_ids(batch.sparse_features, bucket_feature)[keep])
    model.train(was_training)
    p = gather_1d(torch.cat(preds) if preds else torch.zeros(0, device=device)).cpu().numpy()
    y = gather_1d(torch.cat(labels) if labels else torch.zeros(0, device=device)).cpu().numpy()
    bucket = group = None
    if bucket_of_id is not None or group_of_id is not None:
        i = gather_1d(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)).cpu().numpy()
        bucket = bucket_of_id[i] if bucket_of_id is not None else None
        group = group_of_id[i] if group_of_id is not None else None
    return bucketed_metrics(p, y, bucket, group, group_names)
