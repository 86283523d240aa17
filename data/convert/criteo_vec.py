"""Criteo, vectorised: ``pyarrow.csv`` parses a block of lines, numpy checks and maps whole columns.

The rules are the row parser's (``criteo.parse_line``, module docstring of ``criteo.py``). A block in
which any line breaks them (wrong column count, bad label, a stray ``\\r``, a non-hex id, ...) is
parsed again line by line by ``parse_line``, which names the line and field or sends the line to
``rejects.tsv``; only that block. Tasks (files, byte ranges) run in worker processes:

* ``count_task`` (vocab mode): per feature, the distinct values of the task's train rows and their
  counts (sorted uint64 + counts); the parent merges them and keeps those seen ``min_count`` times.
* ``write_task``: split, dense ``log1p``, ids (hash, or ``searchsorted`` in the vocabulary, which the
  workers memory-map from ``.npy`` files), Parquet part files of the task, its rejects part.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from data.convert.blocks import Task, iter_blocks, split_lines
from data.convert.columns import arrow, hex_column, int_column, label01, numpy_of
from data.convert.common import CriteoOptions, row_uniform_np, split_codes, split_key
from data.convert.criteo_format import COLUMNS, SPARSE, parse_line
from data.readers import RowError, RowSink
from data.writer import DatasetWriter

CSV_CONVERT = pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}, null_values=[""],
                               strings_can_be_null=True, check_utf8=False)


def csv_parse_options() -> pcsv.ParseOptions:
    # no quoting or escaping: a '"' is an ordinary byte in Criteo; empty lines are rows (then rejected)
    return pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False,
                             newlines_in_values=False, ignore_empty_lines=False,
                             invalid_row_handler=lambda row: "skip")


def read_block(block: bytes, n_lines: int, names: list[str], parse: pcsv.ParseOptions,
               convert: pcsv.ConvertOptions) -> pa.Table | None:
    """The block as a table of strings, or None when pyarrow does not see exactly its ``n_lines`` rows
    (a row with the wrong column count is skipped by the handler; a lone ``\\r`` splits a line)."""
    ro = pcsv.ReadOptions(column_names=names, use_threads=False, block_size=len(block) + 1)
    try:
        t = pcsv.read_csv(pa.py_buffer(block), read_options=ro, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid:
        return None
    return t if t.num_rows == n_lines else None


@dataclass
class Parsed:
    """Good rows of one block: raw values before the id mapping."""
    lines: np.ndarray                # 0-based line index in the file
    label: np.ndarray                # float32
    dense: list[np.ndarray]          # float64 raw integers (missing -> 0)
    cats: list[tuple[np.ndarray, np.ndarray]]   # (uint64 values, missing)


def parse_table(t: pa.Table, line0: int) -> Parsed | None:
    label = label01(t.column(0))
    if label is None:
        return None
    dense = []
    for j in range(1, 14):
        col = int_column(t.column(j))
        if col is None:
            return None
        dense.append(col.astype(np.float64))
    cats = []
    for j in range(14, 40):
        col = hex_column(t.column(j))
        if col is None:
            return None
        cats.append(col)
    return Parsed(np.arange(line0, line0 + t.num_rows, dtype=np.int64), label, dense, cats)


def parse_rows(path: Path, block: bytes, line0: int, sink: RowSink, keep: np.ndarray | None) -> Parsed:
    """The row parser over one block; ``keep`` (bool per line) limits it to some lines (count pass)."""
    good, labels, ints, cats = [], [], [], []
    for i, raw in enumerate(split_lines(block)):
        if keep is not None and not keep[i]:
            continue
        try:
            label, iv, cv = parse_line(raw)
        except RowError as e:
            sink.bad(path, line0 + i + 1, e, raw)
            continue
        good.append(line0 + i)
        labels.append(label)
        ints.append(iv)
        cats.append(cv)
    n = len(good)
    dense = np.array(ints, np.float64).reshape(n, 13)        # Python int -> float: correctly rounded
    cat_cols = []
    for j in range(26):
        col = [c[j] for c in cats]
        missing = np.array([v is None for v in col], bool)
        cat_cols.append((np.array([0 if v is None else v for v in col], np.uint64), missing))
    return Parsed(np.array(good, np.int64), np.array(labels, np.float32),
                  [np.ascontiguousarray(dense[:, j]) for j in range(13)], cat_cols)


def block_codes(opts: CriteoOptions, task: Task, last_file: int, lines: np.ndarray) -> np.ndarray:
    """Split code per line (0 train, 1 valid, 2 test) from ``(seed, split_key(file, line index))``."""
    if opts.split == "day" and task.file_index != last_file:
        return np.zeros(len(lines), np.int8)
    u = row_uniform_np(opts.seed, split_key(task.file_index, 0) + lines)
    if opts.split == "day":
        return np.where(u < 0.5, 1, 2).astype(np.int8)
    return split_codes(u, opts.fractions)


@dataclass
class BlockStats:
    lines: int = 0
    blocks: int = 0
    row_path_blocks: int = 0
    row_path_lines: int = 0

    def add(self, other: "BlockStats") -> None:
        for k in ("lines", "blocks", "row_path_blocks", "row_path_lines"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def iter_parsed(task: Task, opts: CriteoOptions, last_file: int, sink: RowSink, stats: BlockStats,
                train_only: bool = False):
    """Yield ``(Parsed, split codes)`` per block of the task."""
    parse, path = csv_parse_options(), Path(task.path)
    for first, block, n in iter_blocks(task, opts.block_bytes):
        stats.lines += n
        stats.blocks += 1
        line0 = first - 1
        t = read_block(block, n, COLUMNS, parse, CSV_CONVERT)
        p = parse_table(t, line0) if t is not None else None
        if p is None:
            stats.row_path_blocks += 1
            stats.row_path_lines += n
            keep = None
            if train_only:
                keep = block_codes(opts, task, last_file, np.arange(line0, line0 + n, dtype=np.int64)) == 0
            p = parse_rows(path, block, line0, sink, keep)
        yield p, block_codes(opts, task, last_file, p.lines)


# ----------------------------------------------------------------------------- vocab counting

def _reduce(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``counts`` of equal ``values``: (sorted distinct values, their totals)."""
    if len(values) == 0:
        return values, counts.astype(np.int64)
    order = np.argsort(values, kind="stable")
    v, c = values[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
    return v[starts], np.add.reduceat(c, starts).astype(np.int64)


@dataclass
class ValueCounts:
    """Counts of uint64 values, merged lazily (sort + reduce when the pending parts grow)."""
    dtype: type = np.uint64
    parts: list = field(default_factory=list)
    pending: int = 0
    missing: int = 0

    def add(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        if counts is None:
            values, counts = np.unique(values, return_counts=True)
        self.parts.append((values, counts))
        self.pending += len(values)
        if self.pending > (4 << 20) and len(self.parts) > 1:
            self.compact()

    def compact(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.parts) != 1:
            vals = [v for v, _ in self.parts] or [np.zeros(0, self.dtype)]
            cnts = [c for _, c in self.parts] or [np.zeros(0, np.int64)]
            self.parts = [_reduce(np.concatenate(vals), np.concatenate(cnts))]
        self.pending = len(self.parts[0][0])
        return self.parts[0]


def count_task(task: Task, opts: CriteoOptions, last_file: int) -> tuple[list, BlockStats]:
    """Per feature ``(values, counts, missing count)`` over the task's train rows."""
    counts = [ValueCounts() for _ in SPARSE]
    stats = BlockStats()
    sink = RowSink(None, opts.skip_bad_rows, record=False)    # the write pass records bad rows once
    for p, codes in iter_parsed(task, opts, last_file, sink, stats, train_only=True):
        train = codes == 0
        for c, (vals, missing) in zip(counts, p.cats):
            present = train & ~missing
            c.add(vals[present])
            c.missing += int(np.count_nonzero(train & missing))
    return [(*c.compact(), c.missing) for c in counts], stats


# ----------------------------------------------------------------------------- id mapping and writing

@dataclass
class VocabKeys:
    """The vocabulary of one feature as the workers use it: sorted raw values; ids 0..k-1, then
    ``k`` = missing, ``k + 1`` = OOV; ids taken modulo ``cap`` when one is set.

    Lookup: ``starts`` cuts the keys by their top bits into about ``k`` buckets (the ids are hashes,
    so buckets hold a few keys), then a fixed number of vectorised bisection steps inside the bucket;
    several times faster than ``np.searchsorted`` over a large vocabulary (fewer cache misses)."""
    keys: np.ndarray
    starts: np.ndarray
    shift: int
    steps: int
    cap: int = 0

    @staticmethod
    def index(keys: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``(starts, shift, steps)`` for sorted uint64 ``keys``."""
        if len(keys) == 0:
            return np.zeros(2, np.int64), 0, 0
        bits = max(1, int(len(keys) - 1).bit_length())
        shift = max(0, int(keys[-1]).bit_length() - bits)
        edges = np.arange((1 << bits) + 1, dtype=np.uint64) << np.uint64(shift)
        starts = np.searchsorted(keys, edges).astype(np.int64)
        starts[-1] = len(keys)
        return starts, shift, int(np.diff(starts).max()).bit_length()

    def ids(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        k = len(self.keys)
        hit = np.zeros(len(values), bool)
        pos = np.zeros(len(values), np.int64)
        if k:
            b = np.minimum(values >> np.uint64(self.shift), np.uint64(len(self.starts) - 2)).astype(np.int64)
            lo, hi = self.starts[b], self.starts[b + 1]
            for _ in range(self.steps):               # lower bound of the value inside its bucket
                mid = (lo + hi) >> 1
                right = (mid < hi) & (self.keys[np.minimum(mid, k - 1)] < values)
                lo = np.where(right, mid + 1, lo)
                hi = np.where(right, hi, mid)
            pos = lo
            hit = self.keys[np.minimum(pos, k - 1)] == values
        ids = np.where(missing, k, np.where(hit, pos, k + 1)).astype(np.int64)
        return ids % self.cap if self.cap else ids


def save_keys(keys_dir: Path, name: str, keys: np.ndarray) -> None:
    starts, shift, steps = VocabKeys.index(keys)
    np.save(keys_dir / f"{name}.npy", keys)
    np.save(keys_dir / f"{name}.starts.npy", starts)
    (keys_dir / f"{name}.json").write_text(json.dumps({"shift": shift, "steps": steps}))


def load_keys(keys_dir: Path, cap: int) -> list[VocabKeys]:
    out = []
    for n in SPARSE:
        meta = json.loads((keys_dir / f"{n}.json").read_text())
        out.append(VocabKeys(np.load(keys_dir / f"{n}.npy", mmap_mode="r"),
                             np.load(keys_dir / f"{n}.starts.npy", mmap_mode="r"), meta["shift"], meta["steps"], cap))
    return out


_LOG1P_SMALL = 1 << 16
_LOG1P_TABLE: np.ndarray | None = None


def dense_log1p(x: np.ndarray) -> np.ndarray:
    """float32 ``log1p(max(x, 0))`` of raw integers, computed in float64 by Arrow (the C library's
    log1p, as ``math.log1p`` in the row engine); values below 2**16 (nearly all) from a table of the
    same function."""
    global _LOG1P_TABLE
    if _LOG1P_TABLE is None:
        _LOG1P_TABLE = numpy_of(pc.log1p(arrow(np.arange(_LOG1P_SMALL, dtype=np.float64))).cast(pa.float32()))
    x = np.maximum(x, 0.0)
    out = _LOG1P_TABLE[np.minimum(x, _LOG1P_SMALL - 1).astype(np.int64)]
    big = np.flatnonzero(x >= _LOG1P_SMALL)
    if len(big):
        out[big] = numpy_of(pc.log1p(arrow(x[big])).cast(pa.float32()))
    return out


def hash_ids(values: np.ndarray, missing: np.ndarray, size: int) -> np.ndarray:
    """``int(hex, 16) % size``, ``size`` for a missing value."""
    ids = (values & np.uint64(size - 1)) if size & (size - 1) == 0 else values % np.uint64(size)
    ids = ids.view(np.int64)                  # a new array: & and % do not work in place here
    if missing.any():
        ids[missing] = size
    return ids


def block_table(p: Parsed, opts: CriteoOptions, vocab: list[VocabKeys] | None, schema: pa.Schema) -> pa.Table:
    arrays = [arrow(p.label)]
    arrays += [arrow(dense_log1p(x)) for x in p.dense]
    for j, (vals, missing) in enumerate(p.cats):
        arrays.append(arrow(hash_ids(vals, missing, opts.hash_size) if vocab is None else vocab[j].ids(vals, missing)))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class WriteResult:
    splits: dict
    rejects: dict                 # {file name: {reason: count}}
    reject_part: str | None
    accepted: dict                # {file name: rows written}
    stats: BlockStats


def write_task(task: Task, opts: CriteoOptions, last_file: int, out: str, schema: pa.Schema,
               keys_dir: str | None) -> WriteResult:
    out_dir = Path(out)
    vocab = load_keys(Path(keys_dir), opts.max_ind_range) if keys_dir else None
    writer = DatasetWriter(out_dir, schema, opts.row_group_size, opts.compression, task=task.index)
    part = f"rejects.part-{task.index:05d}.tsv"
    sink = RowSink(out_dir, opts.skip_bad_rows, name=part)
    stats = BlockStats()
    rows = 0
    try:
        for p, codes in iter_parsed(task, opts, last_file, sink, stats):
            if len(p.lines):
                writer.append_table(codes, block_table(p, opts, vocab, schema))
                rows += len(p.lines)
    finally:
        sink.close()
    splits = writer.close(empty_files=False)
    name = Path(task.path).name
    return WriteResult(splits, {f: dict(c) for f, c in sink.by_file.items()},
                       part if sink.path.is_file() else None, {name: rows}, stats)
