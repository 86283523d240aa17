"""Streaming evaluation (histograms + sums, one all-reduce) against scikit-learn over all predictions:
AUC within 1e-4, log loss / NE exact; a real 2-rank torchrun/gloo run against sklearn on the union."""
from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from trainer import launch
from trainer.evaluation import StreamingMetrics, bucketed_metrics, evaluate, histogram_auc

NAMES = ("all", "head", "torso", "tail", "twin", "loner", "other")


def sample(n: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float32)
    logits = rng.normal(shift, 1.5, n) + 1.2 * y
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).numpy()
    bucket = rng.integers(0, 3, n)
    group = rng.integers(-1, 3, n)          # -1: in no planted group
    return p, y, bucket, group


def streaming(p, y, bucket, group, bins: int = 1 << 16) -> dict:
    m = StreamingMetrics(NAMES, torch.device("cpu"), bins)
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    for lo in range(0, len(y), 997):          # many batches
        sl = slice(lo, lo + 997)
        g = group[sl]
        m.update(t(p[sl]), t(y[sl]), [torch.zeros(len(y[sl]), dtype=torch.long), t(bucket[sl] + 1).long(),
                                     torch.where(t(g) >= 0, t(g) + 4, -1).long()])
    return m.result()


def assert_close(got: dict, ref: dict, auc_tol: float = 1e-4) -> None:
    assert list(got) == list(ref)
    for name in ref:
        g, r = got[name], ref[name]
        assert (g["examples"], g["positives"]) == (r["examples"], r["positives"]), name
        for k, tol in (("auc", auc_tol), ("logloss", 1e-9), ("ne", 1e-9)):
            if math.isnan(r[k]):
                assert math.isnan(g[k]), (name, k)
            else:
                assert abs(g[k] - r[k]) <= tol, (name, k, g[k], r[k])


def test_streaming_matches_sklearn_per_group():
    p, y, bucket, group = sample(20000, 0)
    ref = bucketed_metrics(p, y, bucket, group, ("twin", "loner", "other"))
    assert_close(streaming(p, y, bucket, group), ref)


def test_empty_and_single_class_groups_are_nan_like_sklearn():
    p, y, bucket, group = sample(3000, 1)
    bucket[:] = np.where(bucket == 2, 1, bucket)     # no tail at all
    y[group == 1] = 1.0                              # loners: positives only
    ref = bucketed_metrics(p, y, bucket, group, ("twin", "loner", "other"))
    got = streaming(p, y, bucket, group)
    assert got["tail"]["examples"] == 0 and math.isnan(got["tail"]["auc"]) and math.isnan(got["loner"]["auc"])
    assert_close(got, ref)


def test_ties_count_half_exactly_like_sklearn():
    rng = np.random.default_rng(2)
    p = rng.choice(np.array([0.1, 0.3, 0.7], np.float32), 5000)   # many tied scores, in 3 bins
    y = (rng.random(5000) < p).astype(np.float32)
    auc, bound = histogram_auc(*_hist(p, y, 1 << 16))
    assert abs(auc - roc_auc_score(y, p)) < 1e-12 and bound > 0.1   # the bound cannot tell ties from bin-mates


def _hist(p, y, bins):
    m = StreamingMetrics(("all",), torch.device("cpu"), bins)
    m.update(torch.tensor(p), torch.tensor(y), [torch.zeros(len(y), dtype=torch.long)])
    h = m.hist.numpy().reshape(2, bins)
    return h[1], h[0]


def test_coarse_bins_stay_within_the_reported_bound():
    p, y, _, _ = sample(4000, 3)
    ref = roc_auc_score(y, np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7))
    auc, bound = histogram_auc(*_hist(p, y, 16))
    assert 1e-3 < bound and abs(auc - ref) <= bound       # 16 bins: visibly approximate, but bounded
    auc, bound = histogram_auc(*_hist(p, y, 1 << 16))
    assert abs(auc - ref) <= max(bound, 1e-12) and bound < 1e-4


class _Model(torch.nn.Module):
    """TrainModule-style: ``model(batch) -> (loss, (loss, logits, labels))``; logits read from the batch."""
    def forward(self, batch):
        return None, (None, batch.dense_features[:, 0], batch.labels)


def test_evaluate_skips_padding_and_maps_ids_to_groups():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    p, y, _, _ = sample(1200, 4)
    ids = np.random.default_rng(5).integers(0, 50, 1200)
    bucket_of_id = np.random.default_rng(6).integers(0, 3, 50)
    group_of_id = np.random.default_rng(7).integers(-1, 3, 50)
    logits = np.log(p) - np.log1p(-p)
    batches, bs = [], 256
    for lo in range(0, 1200 + bs, bs):                 # the last batches are padding (weight 0)
        n = max(0, min(bs, 1200 - lo))
        dense = torch.zeros(bs, 1)
        dense[:n, 0] = torch.tensor(logits[lo:lo + n])
        lengths = torch.tensor([1] * n + [0] * (bs - n), dtype=torch.int32)
        kjt = KeyedJaggedTensor(keys=["item"], values=torch.tensor(ids[lo:lo + n]), lengths=lengths)
        labels = torch.zeros(bs)
        labels[:n] = torch.tensor(y[lo:lo + n])
        w = torch.zeros(bs)
        w[:n] = 1
        batches.append(SimpleNamespace(dense_features=dense, sparse_features=kjt, labels=labels, weights=w,
                                       to=lambda device, b=None: b))
    for b in batches:
        b.to = lambda device, _b=b: _b
    got = evaluate(_Model(), batches, torch.device("cpu"), bucket_of_id, "item", group_of_id=group_of_id)
    pp = torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).numpy()
    ref = bucketed_metrics(pp, y, bucket_of_id[ids], group_of_id[ids], ("twin", "loner", "other"))
    assert_close(got, ref)


# Each rank holds a different slice (shifted scores), builds its histograms, all-reduces, writes its result.
SCRIPT = r'''
import json, sys
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from tests.trainer.test_evaluate_streaming import NAMES, sample
from trainer.evaluation import StreamingMetrics
dist.init_process_group("gloo")
rank = dist.get_rank()
p, y, bucket, group = sample(6000 + 1500 * rank, 10 + rank, shift=-1.0 + 2.0 * rank)
def run(reduce):
    m = StreamingMetrics(NAMES, torch.device("cpu"))
    t = torch.as_tensor
    m.update(t(p), t(y), [torch.zeros(len(y), dtype=torch.long), t(bucket + 1).long(), torch.where(t(group) >= 0, t(group) + 4, -1).long()])
    if reduce:
        m.all_reduce()
    return m.result()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"global": run(True), "local": run(False)}, f)
dist.destroy_process_group()
'''


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_all_reduce_matches_sklearn_on_the_union(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    cmd = launch.command([str(tmp_path), str(launch.REPO)], nproc=2, module=None, script=script,
                         master_port=launch.free_port())
    proc = subprocess.run(cmd, env=launch.subprocess_env(threads=1), cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    parts = [sample(6000 + 1500 * r, 10 + r, shift=-1.0 + 2.0 * r) for r in (0, 1)]
    p, y, bucket, group = (np.concatenate(x) for x in zip(*parts))
    ref = bucketed_metrics(p, y, bucket, group, ("twin", "loner", "other"))
    assert res[0]["global"] == res[1]["global"]               # every rank computes the same numbers
    assert_close(res[0]["global"], ref)
    # negative control: one rank's own data is far from the global answer (a skipped all-reduce fails)
    assert abs(res[0]["local"]["all"]["auc"] - ref["all"]["auc"]) > 1e-3
    assert res[0]["local"]["all"]["examples"] == 6000
