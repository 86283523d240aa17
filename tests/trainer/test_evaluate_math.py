"""Bucketed metrics against scikit-learn and a hand computation of NE."""
import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from trainer.evaluation import bucketed_metrics, binary_metrics


def test_binary_metrics_match_sklearn_and_ne_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(np.float32)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0.01, 0.99)
    m = binary_metrics(p, y)
    assert math.isclose(m["auc"], roc_auc_score(y, p), rel_tol=1e-12)
    assert math.isclose(m["logloss"], log_loss(y, p), rel_tol=1e-9)
    base = float(y.astype(np.float64).mean())
    h = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert math.isclose(m["ne"], m["logloss"] / h, rel_tol=1e-9)
    assert m["examples"] == 500 and m["positives"] == int(y.sum())


def test_buckets_partition_examples():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(np.float32)
    p = rng.random(300)
    bucket = rng.integers(0, 3, 300)
    res = bucketed_metrics(p, y, bucket)
    assert sum(res[b]["examples"] for b in ("head", "torso", "tail")) == 300
    tail = bucket == 2
    assert math.isclose(res["tail"]["auc"], roc_auc_score(y[tail], p[tail]), rel_tol=1e-12)


def test_single_class_auc_is_nan_not_error():
    m = binary_metrics(np.array([0.2, 0.4]), np.array([1.0, 1.0]))
    assert math.isnan(m["auc"]) and m["examples"] == 2
