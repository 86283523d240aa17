"""Sort the lookups of one backward by row and cut them into one segment per unique row.

This is FBGEMM's GPU TBE backward layout (sort the linear ids, then one program per run of equal
ids), in plain torch ops that never read a device value on the host: every size below is a shape
known before the step (the number of lookups n), the number of unique rows U stays a device
tensor, and the segment table has n + 1 entries whatever U is (entries past U hold n). The Triton
update (triton_update.py) and the pure-torch fallback (kernel.py) both consume it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Segments:
    n: int              # lookups in this step (a shape, known on the host)
    key: Tensor         # [n] global row of each lookup (table row offset + id), sorted; int32 or int64
    gaddr: Tensor       # [n] int64 flat offset of the lookup's gradient slice in grad ([B, ldg])
    weight: Tensor      # [n] fp32 per-sample weight (x 1/bag length for mean pooling)
    shadow: Tensor      # [n] int8 1 = the lookup belongs to a transfer (shadow) feature
    table: Tensor       # [n] int32 table of the lookup
    seg_start: Tensor   # [n + 1] int64 first sorted lookup of unique row u; n for u >= U
    num_rows: Tensor    # [1] int64 U, the number of unique rows (stays on the device)


@dataclass
class FeatureMeta:
    """Per-feature and per-table constants of one kernel, as device tensors (built once)."""
    feat_table: Tensor  # [F] int64
    feat_shadow: Tensor  # [F] bool
    feat_col: Tensor    # [F] int64 first output column of the feature
    row_off: Tensor     # [T] int64 first global row of the table
    w_off: Tensor       # [T] int64 first weight element of the table
    dim: Tensor         # [T] int64
    row_bounds: Tensor  # [T + 1] int64 row_off and the total row count
    # [T] int64 the table's first row in the whole table (row_wise shard offset; compact counters); None: 0
    row_base: Optional[Tensor] = None


def sort_lookups(indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor, meta: FeatureMeta,
                 mean_pool: bool, total_rows: int) -> Segments:
    """`offsets` has F * B + 1 entries (feature-major bags, TorchRec's TBE layout); grad is [B, ldg]."""
    dev, n = indices.device, indices.numel()
    nbags = offsets.numel() - 1
    nf = meta.feat_table.numel()
    B = nbags // nf if nf else 0
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    # bag of every lookup; output_size makes repeat_interleave skip its host read of the total
    bag = torch.repeat_interleave(torch.arange(nbags, device=dev), lengths, output_size=n)
    feat = torch.div(bag, B, rounding_mode="floor")
    b = bag - feat * B
    table = meta.feat_table.index_select(0, feat)
    key = meta.row_off.index_select(0, table) + indices.long()
    weight = torch.ones(n, dtype=torch.float32, device=dev) if psw is None else psw.float()
    if mean_pool:
        weight = weight / lengths.index_select(0, bag).clamp_min(1).to(torch.float32)
    gaddr = b * grad.stride(0) + meta.feat_col.index_select(0, feat)
    # a 32-bit radix sort is about twice as fast as a 64-bit one; rows of one kernel rarely pass 2^31
    key_sort = key.to(torch.int32) if total_rows < 2**31 else key
    key_s, perm = torch.sort(key_sort, stable=True)  # stable: fixed summation order, deterministic
    pos = torch.arange(n, device=dev)
    first = torch.ones(n, dtype=torch.bool, device=dev)
    first[1:] = key_s[1:] != key_s[:-1]
    segid = torch.cumsum(first, 0) - 1
    seg_start = torch.full((n + 1,), n, dtype=torch.int64, device=dev)
    # non-first lookups all write n into the spare last slot (same value: no race on the result)
    seg_start.scatter_(0, torch.where(first, segid, n), torch.where(first, pos, n))
    num_rows = segid[-1:] + 1 if n else torch.zeros(1, dtype=torch.int64, device=dev)
    return Segments(n=n, key=key_s, gaddr=gaddr.index_select(0, perm), weight=weight.index_select(0, perm),
                    shadow=meta.feat_shadow.index_select(0, feat).index_select(0, perm).to(torch.int8),
                    table=table.index_select(0, perm).to(torch.int32), seg_start=seg_start, num_rows=num_rows)
