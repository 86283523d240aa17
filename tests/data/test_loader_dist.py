"""Two real processes (torchrun, gloo, CPU): equal batch counts per rank and disjoint, complete coverage."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from trainer import launch

REPO = Path(__file__).resolve().parents[2]

# Each rank iterates its loader, then the ranks all_gather their batch counts and row ids.
SCRIPT = r'''
import json, sys
import torch.distributed as dist
from data.loader import ParquetLoader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
root, out = sys.argv[1], sys.argv[2]
result = {}
for split, kw in {"train": dict(seed=5, shuffle_buffer=8), "valid": dict(shuffle=False, drop_last=False)}.items():
    loader = ParquetLoader(root, split, 4, rank=rank, world_size=world, **kw)
    ids, count = [], 0
    for batch in loader:
        count += 1
        ids += batch.sparse_features["rid"].values().tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"count": count, "len": len(loader), "ids": ids})
    result[split] = gathered
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
'''


def _make_dataset(root: Path) -> int:
    # Reuse the single-process test's dataset builder (no package __init__ under tests/).
    spec = importlib.util.spec_from_file_location("_loader_tests", Path(__file__).with_name("test_loader.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_dataset(root)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_counts_disjoint_rows(tmp_path):
    n = _make_dataset(tmp_path / "ds")
    script, out = tmp_path / "rank.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = launch.subprocess_env(threads=1)
    cmd = launch.command([str(tmp_path / "ds"), str(out)], nproc=2, module=None, script=script,
                         master_port=launch.free_port())
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    train = result["train"]
    assert train[0]["count"] == train[1]["count"] == train[0]["len"] == n // 2 // 4
    a, b = set(train[0]["ids"]), set(train[1]["ids"])
    assert not a & b and len(a) == len(b) == n // 2 // 4 * 4

    valid = result["valid"]
    assert valid[0]["count"] == valid[1]["count"] == valid[0]["len"]
    assert sorted(valid[0]["ids"] + valid[1]["ids"]) == list(range(n))   # every row exactly once
