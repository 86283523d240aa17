"""Embedding-collapse diagnostics of the sharded tables, computed at each evaluation without gathering a
table (the maths is in trainer/collapse.py).

Per table and per group of rows (``all`` and the head/torso/tail buckets of the table's feature, by
training frequency, data/stats.py) it reports the singular values of the embedding rows and their
information abundance. Rows never seen in training keep their initial values and say nothing about
what training did, so they are left out of every group (``all`` included). Only the factor columns
count (``models.factor_dim``: FM/DeepFM's first-order and padding columns are not an embedding).

How the rows are reached, per table, from the sharding metadata every rank holds:

* every shard spans all factor columns (table_wise, row_wise, table_row_wise, data_parallel): each
  rank adds up the d x d Gram matrices of its own rows, per group, and one all-reduce of
  ``groups x d x d`` numbers sums them (exact; the rows never leave their rank);
* some shard holds only part of the columns (column_wise, grid): a row's columns live on several
  ranks, so no rank can form a Gram term alone. A seeded sample of ``sample_rows`` seen rows (all of
  them when 0 or when there are fewer) is assembled chunk by chunk: each rank writes its columns of
  the chunk's rows into a zero buffer and an all-reduce (sum) completes the rows. Memory and traffic
  are ``chunk x d`` per step and ``sample x d`` in all, never the whole table unless asked.

Every rank calls ``collapse_stats`` at the same point (it is a collective) and gets the same result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.stats import BUCKETS
from models.layout import set_index
from trainer.collapse import grams_by_group, summarize

BUCKET_GROUPS = BUCKETS   # head, torso, tail: data.stats.bucket_of's 0, 1, 2
GROUPS = ("all", *BUCKET_GROUPS)
SETS_SUFFIX = "__sets"   # the diagnostics' name for a multi-embedding feature's sets side by side
CHUNK_ROWS = 8192


@dataclass
class TableRows:
    """What the diagnostics need to know about one table besides its weights."""

    name: str
    factor_dim: int                   # columns [:factor_dim] are the embedding
    bucket: np.ndarray | None = None  # per row: 0 head, 1 torso, 2 tail, -1 never seen (left out); None: one group
    # a virtual table: the factor columns of these (table, factor_dim) side by side (a multi-embedding
    # feature's K sets, models/layout.py), compared with one table of the same total width
    parts: tuple[tuple[str, int], ...] = ()


def row_groups(dataset_dir: str, feature: str) -> np.ndarray | None:
    """Per-id bucket of ``feature`` (0/1/2) with never-seen ids as -1, or None without statistics (a
    dataset converted with ``--no-stats``: then every row counts, in the one group ``all``)."""
    from data.errors import DataError
    from data.stats import bucket_of, load_counts

    try:
        b = bucket_of(dataset_dir, feature).astype(np.int64)
        counts = load_counts(dataset_dir)[feature]
    except (KeyError, FileNotFoundError, DataError):
        return None
    b[counts == 0] = -1
    return b


def table_weights(module: torch.nn.Module) -> dict[str, object]:
    """table name -> its weight as the state dict holds it (a ShardedTensor, or a plain tensor for a
    data-parallel table)."""
    out = {}
    for key, value in module.state_dict().items():
        if ".embedding_bags." in key and key.endswith(".weight"):
            out[key.split(".embedding_bags.", 1)[1][: -len(".weight")]] = value
    return out


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _local_shards(weight) -> list[tuple[int, int, torch.Tensor]]:
    """(row offset, column offset, tensor) of this rank's pieces; a plain (replicated) tensor counts
    once, on rank 0."""
    if hasattr(weight, "local_shards"):
        return [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor) for s in weight.local_shards()]
    return [(0, 0, weight)] if _world()[0] == 0 else []


def _column_split(weight, factor_dim: int) -> bool:
    if not hasattr(weight, "metadata"):
        return False
    return any(sm.shard_offsets[1] > 0 or sm.shard_sizes[1] < factor_dim for sm in weight.metadata().shards_metadata)


def _group_index(t: TableRows, rows: int, device: torch.device) -> torch.Tensor:
    if t.bucket is None:
        return torch.zeros(rows, dtype=torch.long, device=device)
    if len(t.bucket) != rows:
        raise ValueError(f"table {t.name}: {rows} rows but {len(t.bucket)} bucket entries")
    return torch.from_numpy(t.bucket).to(device)


def _exact(weight, t: TableRows, groups: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed per-bucket Gram matrices [3 or 1, d, d] and row counts from every rank's row shards."""
    ng = 3 if t.bucket is not None else 1
    g = torch.zeros(ng, t.factor_dim, t.factor_dim, dtype=torch.float64, device=device)
    for r0, _, shard in _local_shards(weight):
        grp = groups[r0: r0 + shard.shape[0]]
        g += grams_by_group(shard[:, : t.factor_dim].to(device), grp, ng)
    counts = torch.stack([(groups == k).sum() for k in range(ng)]).to(torch.float64)  # same on every rank
    _all_reduce(g)
    return g, counts


def _sample_rows(groups: torch.Tensor, sample_rows: int, seed: int) -> torch.Tensor:
    seen = torch.nonzero(groups >= 0).flatten().cpu().numpy()
    if sample_rows and len(seen) > sample_rows:
        seen = np.sort(np.random.default_rng(seed).choice(seen, size=sample_rows, replace=False))
    return torch.from_numpy(seen)


def _assembled(parts: list[tuple[object, int, int]], t: TableRows, groups: torch.Tensor, device: torch.device,
               sample_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket Gram matrices of a (sampled) set of rows completed across column shards (and, for a
    virtual table, across its tables). ``parts``: (weight, first column in the row, factor columns)."""
    ng = 3 if t.bucket is not None else 1
    d = t.factor_dim
    rows = _sample_rows(groups, sample_rows, seed).to(device)
    g = torch.zeros(ng, d, d, dtype=torch.float64, device=device)
    shards = [(base, fd, r0, c0, shard) for w, base, fd in parts for r0, c0, shard in _local_shards(w)]
    for start in range(0, rows.numel(), CHUNK_ROWS):
        ids = rows[start: start + CHUNK_ROWS]
        buf = torch.zeros(ids.numel(), d, dtype=torch.float64, device=device)
        for base, fd, r0, c0, shard in shards:
            if c0 >= fd:
                continue
            inside = (ids >= r0) & (ids < r0 + shard.shape[0])
            cols = min(shard.shape[1], fd - c0)
            buf[inside, base + c0: base + c0 + cols] = shard[ids[inside] - r0, :cols].to(device, torch.float64)
        _all_reduce(buf)   # columns are disjoint across shards (and parts): the sum completes each row
        g += grams_by_group(buf, groups[ids], ng)
    counts = torch.stack([(groups[rows] == k).sum() for k in range(ng)]).to(torch.float64)
    return g, counts


def collapse_stats(module: torch.nn.Module, tables: list[TableRows], device: torch.device,
                   sample_rows: int = 65536, seed: int = 0) -> dict:
    """``{table: {"method": "exact"|"sample", "groups": {group: {rows, abundance, singular_values}}}}``.

    A collective: every rank must call it with the same ``tables``."""
    weights = table_weights(module)
    out = {}
    for t in sorted(tables, key=lambda x: x.name):
        for name in [p for p, _ in t.parts] or [t.name]:
            if name not in weights:
                raise KeyError(f"diagnostics: no table {name!r} in the model ({sorted(weights)})")
        if t.parts:
            bases = np.cumsum([0] + [fd for _, fd in t.parts])
            parts = [(weights[p], int(b), fd) for (p, fd), b in zip(t.parts, bases)]
        else:
            parts = [(weights[t.name], 0, t.factor_dim)]
        w = parts[0][0]
        groups = _group_index(t, int(w.size(0)), device)
        if t.parts or _column_split(w, t.factor_dim):
            g, counts = _assembled(parts, t, groups, device, sample_rows, seed)
            method = "sample" if sample_rows and int((groups >= 0).sum()) > sample_rows else "assembled"
        else:
            g, counts = _exact(w, t, groups, device)
            method = "exact"
        res = {"all": summarize(g.sum(0), int(counts.sum()))}
        if t.bucket is not None:
            for k, name in enumerate(BUCKET_GROUPS):
                res[name] = summarize(g[k], int(counts[k]))
        out[t.name] = {"method": method, "groups": res}
    return out


class CollapseMonitor:
    """What the trainer holds: the tables to diagnose, their row groups, and the settings."""

    def __init__(self, tables: list[TableRows], device: torch.device, sample_rows: int, seed: int):
        self.tables, self.device, self.sample_rows, self.seed = tables, device, sample_rows, seed

    @classmethod
    def from_layout(cls, layout, dataset_dir: str, names: list[str], device: torch.device, sample_rows: int,
                    seed: int) -> "CollapseMonitor":
        """``layout``: models.layout.Layout of the run; ``names``: tables to watch ([] = all)."""
        known = [t.name for t in layout.tables]
        bad = [n for n in names if n not in known]
        if bad:
            from trainer.config_base import ConfigError

            raise ConfigError(f"diagnostics.tables: {bad} are not tables of this run ({known})")
        groups: dict[str, np.ndarray | None] = {}
        rows, sets = [], {}
        for spec in layout.tables:
            if spec.base not in groups:
                groups[spec.base] = row_groups(dataset_dir, spec.base)
            if set_index(spec.name) >= 0:
                sets.setdefault(spec.base, []).append((spec.name, spec.factor_dim))
            if not names or spec.name in names:
                rows.append(TableRows(spec.name, spec.factor_dim, groups[spec.base]))
        for base, parts in sets.items():   # multi-embedding: the K sets side by side, as one matrix
            if len(parts) > 1 and (not names or base in names):
                rows.append(TableRows(base + SETS_SUFFIX, sum(fd for _, fd in parts), groups[base], tuple(parts)))
        return cls(rows, device, sample_rows, seed)

    def __call__(self, module: torch.nn.Module) -> dict:
        return collapse_stats(module, self.tables, self.device, self.sample_rows, self.seed)

    @staticmethod
    def export(metrics, result: dict) -> None:
        for table, r in result.items():
            for group, m in r["groups"].items():
                metrics.on_collapse(table, group, m["abundance"])

    @staticmethod
    def summary(result: dict) -> str:
        """One log line: abundance of every table (all rows, and the tail where there is one)."""
        parts = []
        for table, r in result.items():
            g = r["groups"]
            tail = f" tail {g['tail']['abundance']:.2f}" if "tail" in g else ""
            parts.append(f"{table} {g['all']['abundance']:.2f}{tail}")
        return "information abundance: " + ", ".join(parts)
