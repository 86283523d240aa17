"""torchrun worker for tests/trainer/test_collapse_dist.py (no tests here).

`torchrun --nproc_per_node N tests/trainer/collapse_worker.py OUT_DIR` shards tables of known
weights (row_wise, column_wise split in two column shards, table_wise, our kernel and FBGEMM's),
runs the collapse diagnostics on every rank and writes each rank's result to OUT_DIR/rank<r>.json,
with the full weights and row groups (rank 0) for the test's numpy float64 reference."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from trainer.config import EmbeddingConfig, EmbOptimConfig, TableConfig
from trainer.diagnostics import TableRows, collapse_stats
from trainer.sharding import shard_model

# name -> (rows, dim, sharding, optimizer)
TABLES = {"t_row": (96, 16, "row_wise", "cfsgd"), "t_col": (40, 64, "column_wise", "cfsgd"),
          "t_tw": (30, 8, "table_wise", "exact_sgd"), "t_fm": (96, 20, "table_wise", "exact_rowwise_adagrad")}
FACTOR = {"t_row": 16, "t_col": 64, "t_tw": 8, "t_fm": 16}   # t_fm: 4 FM extra columns are not the embedding


class Wrapper(nn.Module):
    def __init__(self, tables):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tables = [EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=[f"f_{n}"])
              for n, (r, d, _, _) in TABLES.items()]
    cfg = EmbeddingConfig(dim=8, tables={n: TableConfig(sharding_type=st, optimizer=EmbOptimConfig(name=o, lr=0.1))
                                         for n, (_, _, st, o) in TABLES.items()})
    res = shard_model(Wrapper(tables), cfg, tables, dist.group.WORLD, torch.device("cpu"),
                      extra_constraints={"t_col": {"min_partition": 32}})
    rng = np.random.default_rng(5)   # the same full weights and groups on every rank
    full, groups = {}, {}
    for n, (r, d, _, _) in TABLES.items():
        # columns of decaying scale: a spectrum with a real tail
        full[n] = (rng.normal(size=(r, d)) * np.logspace(0, -2, d)).astype(np.float32)
        groups[n] = rng.integers(-1, 3, size=r)
    sd = res.dmp.state_dict()
    shards = {}
    for n in TABLES:
        st = sd[f"ebc.embedding_bags.{n}.weight"]
        for s in st.local_shards():
            (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
            s.tensor.copy_(torch.from_numpy(full[n][r0:r0 + nr, c0:c0 + nc]))
            shards.setdefault(n, []).append([r0, c0, nr, nc])
    # read back through a fresh state dict: the copies reached the kernels' weights
    sd = res.dmp.state_dict()
    for n in TABLES:
        for s in sd[f"ebc.embedding_bags.{n}.weight"].local_shards():
            (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
            assert np.array_equal(s.tensor.numpy(), full[n][r0:r0 + nr, c0:c0 + nc]), n
    exact = collapse_stats(res.dmp, [TableRows(n, FACTOR[n], groups[n]) for n in TABLES], torch.device("cpu"))
    no_groups = collapse_stats(res.dmp, [TableRows("t_row", 16, None)], torch.device("cpu"))
    sampled = collapse_stats(res.dmp, [TableRows("t_col", 64, groups["t_col"])], torch.device("cpu"), sample_rows=9,
                             seed=3)
    # a virtual table: t_row's and t_fm's factor columns side by side (a multi-embedding feature's sets)
    sets = collapse_stats(res.dmp, [TableRows("t_row+t_fm", 32, groups["t_row"],
                                              (("t_row", 16), ("t_fm", 16)))], torch.device("cpu"))
    result = {"exact": exact, "no_groups": no_groups, "sampled": sampled, "sets": sets, "shards": shards,
              "plan": res.plan_text}
    if rank == 0:
        np.savez(out / "full.npz", **{f"w_{n}": w for n, w in full.items()}, **{f"g_{n}": g for n, g in groups.items()})
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
