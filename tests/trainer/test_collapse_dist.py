"""Collapse diagnostics on 2 real gloo ranks (worker: collapse_worker.py) against numpy's float64 SVD
of the full weights, per table and row group: row_wise and table_wise (Gram matrices all-reduced),
column_wise split in two column shards (rows assembled), a sample, and two tables side by side."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from trainer import launch
from trainer.diagnostics import _sample_rows

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("collapse_worker.py")
FACTOR = {"t_row": 16, "t_col": 64, "t_tw": 8, "t_fm": 16}
GROUP = {"head": 0, "torso": 1, "tail": 2}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from trainer.optim import kernel

    kernel.load_extension()   # compile once here, not concurrently in both ranks
    out = tmp_path_factory.mktemp("collapse")
    cmd = launch.command([str(out)], nproc=2, module=None, script=WORKER, master_port=launch.free_port())
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    full = np.load(out / "full.npz")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], full


def _ref(w: np.ndarray, groups: np.ndarray | None, group: str) -> tuple[np.ndarray, int]:
    if groups is None:
        rows = w
    else:
        rows = w[groups >= 0] if group == "all" else w[groups == GROUP[group]]
    s = np.linalg.svd(rows.astype(np.float64), compute_uv=False)
    return np.pad(s, (0, w.shape[1] - len(s))), len(rows)


def _check(res: dict, w: np.ndarray, groups: np.ndarray | None) -> None:
    names = ["all"] + ([] if groups is None else list(GROUP))
    assert set(res["groups"]) == set(names)
    for g in names:
        s, n = _ref(w, groups, g)
        got = res["groups"][g]
        assert got["rows"] == n
        np.testing.assert_allclose(got["singular_values"], s, rtol=1e-6, atol=1e-7 * s.max())
        assert got["abundance"] == pytest.approx(s.sum() / s.max(), rel=1e-6)


@pytest.mark.dist
@pytest.mark.slow
def test_every_rank_gets_the_float64_svd_of_the_full_table(ranks):
    res, full = ranks
    assert res[0]["exact"] == res[1]["exact"]   # a collective: identical on every rank
    for name, f in FACTOR.items():
        _check(res[0]["exact"][name], full[f"w_{name}"][:, :f], full[f"g_{name}"])
    methods = {n: r["method"] for n, r in res[0]["exact"].items()}
    assert methods == {"t_row": "exact", "t_tw": "exact", "t_fm": "exact", "t_col": "assembled"}


@pytest.mark.dist
@pytest.mark.slow
def test_the_shardings_really_split_the_tables(ranks):
    res, _ = ranks
    sh = [r["shards"] for r in res]
    # row_wise: each rank holds part of the rows, all columns
    assert all(len(s["t_row"]) == 1 and s["t_row"][0][2] < 96 and s["t_row"][0][3] == 16 for s in sh)
    # column_wise: two 32-column shards on different ranks, each with every row
    assert sorted(s["t_col"][0][1] for s in sh) == [0, 32] and all(s["t_col"][0][2:] == [40, 32] for s in sh)
    # table_wise: one rank holds it whole
    assert sum("t_tw" in s for s in sh) == 1


@pytest.mark.dist
@pytest.mark.slow
def test_without_groups_sampled_and_side_by_side(ranks):
    res, full = ranks
    _check(res[0]["no_groups"]["t_row"], full["w_t_row"][:, :16], None)
    # the sample: the same seeded rows on every rank; reference = SVD of exactly those rows
    import torch

    g = full["g_t_col"]
    picked = _sample_rows(torch.from_numpy(g), 9, 3).numpy()
    assert len(picked) == 9 and (g[picked] >= 0).all()
    got = res[1]["sampled"]["t_col"]
    assert got["method"] == "sample" and got["groups"]["all"]["rows"] == 9
    s, _ = _ref(full["w_t_col"][picked], None, "all")
    np.testing.assert_allclose(got["groups"]["all"]["singular_values"], s, rtol=1e-6, atol=1e-7 * s.max())
    # two tables' factor columns side by side (t_row on both ranks by rows, t_fm whole on one rank)
    both = np.hstack([full["w_t_row"][:, :16], full["w_t_fm"][:, :16]])
    _check(res[0]["sets"]["t_row+t_fm"], both, full["g_t_row"])
    assert not math.isnan(res[0]["sets"]["t_row+t_fm"]["groups"]["tail"]["abundance"])
