"""``tailrec evaluate --predictions FILE``: per-example predictions of one split, as Parquet.

Columns: ``row`` (the example's index in the split, in the dataset's file order, so it joins back to the
split's Parquet rows), ``label``, ``prediction`` (sigmoid of the logit) and ``logit``. Nothing is gathered:
on one rank ``FILE`` is a Parquet file; on N ranks it is a Parquet dataset directory with one
``part-RRRRR.parquet`` per rank (``pyarrow.parquet.read_table(FILE)`` reads either). The evaluation
loader splits a split into one contiguous row range per rank and pads with weight-0 rows at the end,
which are left out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


@torch.no_grad()
def collect(model, loader, device: torch.device) -> pa.Table:
    was_training = model.training
    model.eval()
    labels, logits = [], []
    for batch in loader:
        batch = batch.to(device)
        _, (_, logit, y) = model(batch)
        w = getattr(batch, "weights", None)
        keep = slice(None) if w is None else w > 0
        labels.append(y.float()[keep].cpu())
        logits.append(logit.float()[keep].cpu())
    model.train(was_training)
    z = torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)
    y = torch.cat(labels).numpy() if labels else np.zeros(0, np.float32)
    first = loader.first_row
    return pa.table({"row": pa.array(np.arange(first, first + len(z), dtype=np.int64)),
                     "label": pa.array(y.astype(np.int8)),
                     "prediction": pa.array((1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)),
                     "logit": pa.array(z.astype(np.float32))})


def write(table: pa.Table, path: str | Path, rank: int, world_size: int) -> Path:
    """One file on one rank; ``path/part-RRRRR.parquet`` per rank otherwise."""
    p = Path(path)
    if world_size == 1:
        p.parent.mkdir(parents=True, exist_ok=True)
        out = p
    else:
        p.mkdir(parents=True, exist_ok=True)
        out = p / f"part-{rank:05d}.parquet"
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out)    # a reader never sees half a file
    return out
