"""Streaming Parquet loader: equal batch counts per rank, deterministic shuffle, exact resume.

Row split (TorchEasyRec's ``parquet_dataset.py`` pattern). Footers are read once. Each epoch the row
groups are put in a deterministic ``(seed, epoch)`` order; the global rows ``[0, N)`` of that order are
cut into one contiguous range per rank and each rank reads only its row groups (slicing the partial
ones at its ends). Every rank yields the same number of batches, else TorchRec's all-to-all hangs:

* ``drop_last=True`` (training): ``rows_per_rank = (N // world) // B * B``; the tail is dropped (a
  different tail each shuffled epoch). Every batch has exactly ``B`` rows, weights all 1.
* ``drop_last=False`` (evaluation): ranges cover all ``N`` rows (sizes differ by at most one); every
  rank yields ``ceil(ceil(N / world) / B)`` batches of exactly ``B`` rows, the missing rows of its
  last batch(es) being *padding*: empty bags, zero dense/label, ``weights == 0``. Padding rather
  than short or empty batches keeps shapes identical on all ranks (no reliance on TorchRec's
  variable-batch paths) and TorchRec's metrics (``RecMetricModule``) take per-example ``weights``,
  so a weighted evaluation sees every real row exactly once overall. Consumers that average must
  weight by ``batch.weights``.

Shuffle: row-group order per epoch, then rows within chunks of ``shuffle_buffer`` rows (rounded to a
multiple of ``B``) of each rank's range, seeded by ``(seed, epoch, rank, chunk)``. Chunks never cut
a batch, so resuming at batch ``k`` re-reads only the chunk holding it: exact and cheap.

Sparse features come out as a KJT (keys in manifest order, int32 lengths, int64 values); a
single-valued column has length 1 per row, a ``list<int64>`` bag variable lengths. Dense features are
``[B, n_dense]`` float32, ``[B, 0]`` when the dataset has none (MovieLens): torch handles empty
dims, and ``nn.Linear(0, n)`` builds and returns its bias, so no fake column is invented.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.errors import DataError
from data.manifest import Manifest, load_manifest
from data.writer import check_schema

_READ_ROWS = 65536   # arrow batch size when streaming a row group slice


@dataclass
class LoaderBatch(Batch):
    """``Batch`` plus per-example ``weights`` [B] float32: 1 for real rows, 0 for eval padding."""
    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "LoaderBatch":
        t = lambda x: x.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return LoaderBatch(t(self.dense_features), t(self.sparse_features), t(self.labels), t(self.weights))

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> "LoaderBatch":
        return LoaderBatch(self.dense_features.pin_memory(), self.sparse_features.pin_memory(),
                           self.labels.pin_memory(), self.weights.pin_memory())


# ----------------------------------------------------------------------------- schema and footers

def read_footers(dataset_dir: Path, m: Manifest, split: str) -> list[tuple[str, int, int]]:
    """Schema-check the dataset (``data.writer.check_schema``: every split file against the manifest,
    DataError naming file and column), then return ``[(file, row_group, rows)]`` of the non-empty groups."""
    check_schema(dataset_dir, m)
    groups = []
    for rel in m.splits[split].files:
        meta = pq.read_metadata(dataset_dir / rel)
        groups += [(rel, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                   if meta.row_group(i).num_rows > 0]
    return groups


# ----------------------------------------------------------------------------- row plan

@dataclass(frozen=True)
class RankPlan:
    start: int          # first global row (in the epoch's row-group order) of this rank
    rows: int           # real rows of this rank
    num_batches: int    # identical on every rank
    chunk_rows: int     # shuffle chunk, a multiple of batch_size


def plan_rank(total: int, batch_size: int, rank: int, world: int, drop_last: bool,
              shuffle_buffer: int) -> RankPlan:
    chunk = max(1, shuffle_buffer // batch_size) * batch_size
    if drop_last:
        per_rank = total // world // batch_size * batch_size
        return RankPlan(rank * per_rank, per_rank, per_rank // batch_size, chunk)
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    num_batches = math.ceil(math.ceil(total / world) / batch_size)
    return RankPlan(start, base + (rank < extra), num_batches, chunk)


def group_order(num_groups: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_groups)
    return np.random.default_rng([seed, epoch]).permutation(num_groups)


def slices_for(lo: int, hi: int, sizes: np.ndarray, starts: np.ndarray):
    """Global ordered rows [lo, hi) -> [(position in order, first row, end row) within each group]."""
    out, p = [], int(np.searchsorted(starts, lo, side="right")) - 1
    while lo < hi:
        a, b = lo - starts[p], min(hi - starts[p], sizes[p])
        out.append((p, int(a), int(b)))
        lo, p = int(starts[p] + b), p + 1
    return out


# ----------------------------------------------------------------------------- reading and tensors

@dataclass
class _Stream:
    key: tuple[str, int]        # (file, row group)
    batches: object             # iterator over the group's record batches
    pos: int = 0                # group row index of the next unread row
    rest: pa.RecordBatch | None = None   # unread tail of the last batch


class _GroupReader:
    """Streams row-group slices with ``iter_batches`` (``Dataset.to_batches`` hoards memory, arrow #39808).

    Consecutive shuffle chunks often continue inside the same row group; the open stream is resumed
    instead of re-decoding the group from its first row each time.
    """

    def __init__(self, root: Path, columns: list[str]):
        self._root, self._columns, self._files, self._stream = root, columns, {}, None

    def _open(self, rel: str, group: int) -> _Stream:
        pf = self._files.get(rel)
        if pf is None:
            pf = self._files[rel] = pq.ParquetFile(self._root / rel)
        it = pf.iter_batches(batch_size=_READ_ROWS, row_groups=[group], columns=self._columns)
        return _Stream((rel, group), iter(it))

    def read(self, rel: str, group: int, lo: int, hi: int) -> list[pa.RecordBatch]:
        st = self._stream
        if st is None or st.key != (rel, group) or st.pos > lo:
            st = self._stream = self._open(rel, group)
        out = []
        while st.pos < hi:
            rb = st.rest if st.rest is not None else next(st.batches)
            end = min(hi - st.pos, rb.num_rows)
            skip = min(max(lo - st.pos, 0), end)
            if end > skip:
                out.append(rb.slice(skip, end - skip))
            st.rest = rb.slice(end) if end < rb.num_rows else None
            st.pos += end
        for piece in out:
            for name, col in zip(piece.schema.names, piece.columns):
                if col.null_count:
                    raise DataError(self._root / rel, f"null values in row group {group}", field=name)
        return out

    def close(self) -> None:
        self._stream = None
        for pf in self._files.values():
            pf.close()
        self._files.clear()


@dataclass
class _Chunk:
    """One shuffle chunk as numpy; rows past ``real`` are padding (weight 0)."""
    labels: np.ndarray
    dense: np.ndarray
    lengths: list[np.ndarray]
    offsets: list[np.ndarray]
    values: list[np.ndarray]
    real: int


def _permute_bags(offsets: np.ndarray, values: np.ndarray, perm: np.ndarray):
    """Reorder jagged rows by ``perm`` without a Python loop (one gather over the flat values)."""
    lengths = np.diff(offsets)[perm]
    new_off = np.zeros(len(perm) + 1, np.int64)
    np.cumsum(lengths, out=new_off[1:])
    idx = np.repeat(offsets[:-1][perm] - new_off[:-1], lengths) + np.arange(new_off[-1])
    return new_off, values[idx]


def _list_parts(col: pa.ChunkedArray, multi_hot: bool, perm: np.ndarray | None):
    """(lengths int32, offsets int64, values int64) of one sparse column, rows reordered by ``perm``."""
    arr = col.combine_chunks()
    n = len(arr)
    if not multi_hot:
        values = arr.to_numpy().astype(np.int64)
        return np.ones(n, np.int32), np.arange(n + 1, dtype=np.int64), values if perm is None else values[perm]
    offsets = arr.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]   # sliced arrays keep their parent's offsets
    values = arr.flatten().to_numpy().astype(np.int64)
    if perm is not None:
        offsets, values = _permute_bags(offsets, values, perm)
    return np.diff(offsets).astype(np.int32), offsets, values


def _to_chunk(table: pa.Table | None, label: str, dense: list[str], sparse: list[tuple[str, bool]],
              perm: np.ndarray | None, pad: int) -> _Chunk:
    """Columns -> numpy in ``perm`` order (numpy gathers beat ``Table.take``), then ``pad`` padding rows."""
    if table is None:
        z = np.zeros(pad, np.int32)
        return _Chunk(np.zeros(pad, np.float32), np.zeros((pad, len(dense)), np.float32),
                      [z] * len(sparse), [np.zeros(pad + 1, np.int64)] * len(sparse),
                      [np.zeros(0, np.int64)] * len(sparse), 0)
    n = table.num_rows
    order = slice(None) if perm is None else perm
    labels = np.zeros(n + pad, np.float32)
    labels[:n] = table.column(label).to_numpy()[order]
    dense_np = np.zeros((n + pad, len(dense)), np.float32)
    for j, name in enumerate(dense):
        dense_np[:n, j] = table.column(name).to_numpy()[order]
    lengths, offsets, values = [], [], []
    for name, multi in sparse:
        ln, off, val = _list_parts(table.column(name), multi, perm)
        lengths.append(np.concatenate([ln, np.zeros(pad, np.int32)]))   # padding: empty bags
        offsets.append(np.concatenate([off, np.full(pad, off[-1])]))
        values.append(val)
    return _Chunk(labels, dense_np, lengths, offsets, values, n)


def _make_batch(c: _Chunk, r0: int, r1: int, keys: list[str]) -> LoaderBatch:
    lengths = [x[r0:r1] for x in c.lengths] or [np.zeros(0, np.int32)]
    values = [v[o[r0]:o[r1]] for v, o in zip(c.values, c.offsets)] or [np.zeros(0, np.int64)]
    lengths, values = np.concatenate(lengths), np.concatenate(values)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
                            stride=r1 - r0)
    weights = torch.zeros(r1 - r0, dtype=torch.float32)
    weights[:max(0, min(c.real, r1) - r0)] = 1.0
    return LoaderBatch(torch.from_numpy(c.dense[r0:r1]), kjt, torch.from_numpy(c.labels[r0:r1]), weights)


# ----------------------------------------------------------------------------- prefetch thread

class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class _Prefetcher:
    """Runs a batch generator in a daemon thread; its exceptions are re-raised in the consumer."""

    def __init__(self, source, depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), name="tailrec-loader", daemon=True)
        self._thread.start()

    def _run(self, source) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, never swallowed
            self._put(_Failure(e))
        finally:
            source.close()   # the generator must be closed by the thread that runs it

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def get(self):
        while True:
            try:
                item = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("loader prefetch thread died without a result") from None
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise RuntimeError("loader produced fewer batches than planned")
        return item

    def close(self) -> None:
        self._stop.set()
        while True:   # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------- the loader

class ParquetLoader:
    """Iterable of ``LoaderBatch`` for one rank; see the module docstring for the split and shuffle.

    Position: ``epoch`` and ``batches_yielded`` (batches handed to the consumer, not merely prefetched).
    Finishing an epoch moves to the start of the next one. ``set_epoch(e)`` jumps to the start of
    epoch ``e`` unless already in it, so a trainer's usual ``set_epoch`` call after
    ``load_state_dict`` keeps the restored mid-epoch position. Iterating again after a ``break``
    continues where it stopped.
    """

    def __init__(self, dataset_dir, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, features=None,
                 shuffle_buffer: int = 16384, prefetch: int = 4):
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.dataset_dir = Path(dataset_dir)
        self.manifest = m = load_manifest(self.dataset_dir)
        if split not in m.splits:
            raise DataError(self.dataset_dir / "manifest.json", f"no split {split!r}", field="splits")
        names = [f.name for f in m.sparse_features]
        unknown = sorted(set(features or ()) - set(names))
        if unknown:
            raise DataError(self.dataset_dir / "manifest.json", f"unknown sparse features {unknown}",
                            field="sparse_features")
        self.keys = [n for n in names if features is None or n in features]   # manifest order
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch
        self._groups = read_footers(self.dataset_dir, m, split)
        self._sizes = np.array([g[2] for g in self._groups], np.int64)
        self.total_rows = int(self._sizes.sum())
        self._plan = plan_rank(self.total_rows, batch_size, rank, world_size, drop_last, shuffle_buffer)
        self._sparse = [(k, m.feature(k).multi_hot) for k in self.keys]
        self._columns = [m.label, *m.dense_features, *self.keys]
        self._epoch, self._yielded, self._active = 0, 0, None

    @property
    def num_batches(self) -> int:
        return self._plan.num_batches

    @property
    def first_row(self) -> int:
        """Index (in the split's file order) of this rank's first row; without shuffle, its i-th real
        example is row ``first_row + i``."""
        return self._plan.start

    def __len__(self) -> int:
        return self._plan.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._yielded = epoch, 0

    def state_dict(self) -> dict:
        epoch, done = self._epoch, self._yielded
        if done >= self.num_batches:   # a finished epoch resumes at the next one's start
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_yielded": done, "seed": self.seed, "world_size": self.world_size,
                "rank": self.rank, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "split": self.split, "total_rows": self.total_rows}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the stream-defining settings must match or the position means nothing."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "batch_size", "shuffle_buffer", "split", "total_rows"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {mine[key]!r}")
        if not 0 <= state["batches_yielded"] <= self.num_batches:
            raise ValueError(f"batches_yielded={state['batches_yielded']} outside [0, {self.num_batches}]")
        self.close()
        self._epoch, self._yielded = int(state["epoch"]), int(state["batches_yielded"])

    def __iter__(self):
        self.close()
        if self._yielded >= self.num_batches:
            self._epoch, self._yielded = self._epoch + 1, 0
        epoch, start = self._epoch, self._yielded
        source = self._generate(epoch, start)
        pf = self._active = _Prefetcher(source, self.prefetch) if self.prefetch > 0 else None
        try:
            for _ in range(start, self.num_batches):
                batch = pf.get() if pf else next(source)
                self._yielded += 1   # counted before the consumer sees it: a checkpoint taken after
                yield batch          # training on this batch resumes at the next one
            self._epoch, self._yielded = epoch + 1, 0
        finally:
            if pf is not None:
                pf.close()
            else:
                source.close()
            if self._active is pf:
                self._active = None

    def close(self) -> None:
        """Stop a running prefetch thread (also done when the iterator ends or is collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- producer side (prefetch thread)

    def _generate(self, epoch: int, start: int):
        plan, bs = self._plan, self.batch_size
        order = group_order(len(self._groups), self.seed, epoch, self.shuffle)
        sizes = self._sizes[order]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        per_chunk = plan.chunk_rows // bs
        reader = _GroupReader(self.dataset_dir, self._columns)
        try:
            for chunk in range(start // per_chunk, math.ceil(plan.num_batches / per_chunk)):
                c = self._read_chunk(reader, order, sizes, starts, epoch, chunk)
                first = start - chunk * per_chunk if chunk == start // per_chunk else 0
                for b in range(first, min(per_chunk, plan.num_batches - chunk * per_chunk)):
                    yield _make_batch(c, b * bs, (b + 1) * bs, self.keys)
        finally:
            reader.close()

    def _read_chunk(self, reader, order, sizes, starts, epoch: int, chunk: int) -> _Chunk:
        plan = self._plan
        lo = chunk * plan.chunk_rows
        hi_pad = min(lo + plan.chunk_rows, plan.num_batches * self.batch_size)
        hi = max(lo, min(lo + plan.chunk_rows, plan.rows))
        pieces = []
        for p, a, b in slices_for(plan.start + lo, plan.start + hi, sizes, starts):
            rel, group, _ = self._groups[order[p]]
            pieces += reader.read(rel, group, a, b)
        table = pa.Table.from_batches(pieces) if pieces else None   # None: pure padding
        perm = None
        if self.shuffle and table is not None:
            perm = np.random.default_rng([self.seed, epoch, self.rank, chunk]).permutation(table.num_rows)
        m = self.manifest
        return _to_chunk(table, m.label, m.dense_features, self._sparse, perm, hi_pad - hi)
