"""Parquet output of the converters: split writers with fixed-size row groups, vocabularies, schema check.

Byte-identical output for identical input and options: the writer options are fixed here (no
timestamps are written by pyarrow; ``created_by`` is the library version), rows arrive in input order
and part files are cut per conversion task (``task_bytes``), not per worker.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import DataError
from data.manifest import SPLITS, Manifest, SparseFeature, SplitInfo

VOCAB_DIR = "vocab"
OOV_VALUE = "<OOV>"          # vocabulary entry of the OOV id
MISSING_VALUE = ""           # vocabulary entry of the "missing value" id (empty raw field)
ROW_GROUPS_PER_FILE = 64     # a new part file every 64 row groups keeps files a few hundred MB at most


def arrow_schema(dense: list[str], sparse: list[SparseFeature], label: str = "label") -> pa.Schema:
    fields = [pa.field(label, pa.float32(), nullable=False)]
    fields += [pa.field(d, pa.float32(), nullable=False) for d in dense]
    for f in sparse:
        t = pa.list_(pa.int64()) if f.multi_hot else pa.int64()
        fields.append(pa.field(f.name, t, nullable=False))
    return pa.schema(fields)


def _writer_kwargs(compression: str) -> dict:
    # Every option that could vary by pyarrow default is pinned so that output bytes are reproducible.
    return dict(compression=compression, version="2.6", use_dictionary=True, write_statistics=True,
                data_page_size=1 << 20, use_compliant_nested_type=True, store_schema=True)


class SplitWriter:
    """Buffers less than one row group of one split and appends full row groups to the current part file.

    Rows arrive as Arrow tables (``append_table``, the vectorised converters) or one at a time
    (``append``, the row engine); both end up in the same fixed-size row groups. Part files are named
    ``part-<task>-<n>.parquet``: each conversion task (a file or byte range) writes its own, so the
    layout depends on the input and ``task_bytes`` only, not on the number of workers.
    """

    def __init__(self, split_dir: Path, schema: pa.Schema, row_group_size: int, compression: str, task: int = 0):
        self.dir, self.schema, self.rgs, self.compression = split_dir, schema, row_group_size, compression
        self.task = task
        self.cols: list[list] = [[] for _ in schema.names]
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = self.positives = 0
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_file = 0

    def append(self, row: list) -> None:
        """``row`` is ordered like the schema: label, dense..., sparse..."""
        for col, v in zip(self.cols, row):
            col.append(v)
        if len(self.cols[0]) >= self.rgs:
            self._rows_to_table()

    def _rows_to_table(self) -> None:
        if self.cols[0]:
            arrays = [pa.array(c, type=f.type) for c, f in zip(self.cols, self.schema)]
            self.cols = [[] for _ in self.schema.names]
            self.append_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def append_table(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        self.rows += n
        label = pa.concat_arrays(table.column(0).chunks) if table.column(0).num_chunks != 1 else table.column(0).chunk(0)
        # a view of the float32 buffer: to_numpy would import pandas (a second of start-up per worker)
        labels = np.frombuffer(label.buffers()[1], np.float32, count=len(label), offset=label.offset * 4)
        self.positives += int(np.count_nonzero(labels == 1.0))
        self.pending.append(table)
        self.pending_rows += n
        if self.pending_rows >= self.rgs:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        full = self.pending_rows if final else self.pending_rows // self.rgs * self.rgs
        for off in range(0, full, self.rgs):
            if self._writer is None or self._groups_in_file >= ROW_GROUPS_PER_FILE:
                self._open_next()
            self._writer.write_table(table.slice(off, min(self.rgs, full - off)), row_group_size=self.rgs)
            self._groups_in_file += 1
        rest = table.slice(full)
        self.pending = [rest.combine_chunks()] if rest.num_rows else []   # drop references to the written rows
        self.pending_rows = rest.num_rows

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"part-{self.task:05d}-{len(self.files):03d}.parquet"
        self.files.append(f"{self.dir.name}/{name}")
        self._writer = pq.ParquetWriter(self.dir / name, self.schema, **_writer_kwargs(self.compression))
        self._groups_in_file = 0

    def close(self, empty_file: bool = True) -> SplitInfo:
        """``empty_file``: an empty split still gets one (empty) file so that readers see the schema
        (conversion tasks leave that to the last step: ``DatasetWriter.close``)."""
        self._rows_to_table()
        self._flush(final=True)
        if self._writer is None and empty_file:
            self._open_next()
        if self._writer is not None:
            self._writer.close()
        return SplitInfo(rows=self.rows, positives=int(self.positives), files=list(self.files))


class DatasetWriter:
    """The three split writers of one output directory (one conversion task)."""

    def __init__(self, out_dir: str | Path, schema: pa.Schema, row_group_size: int, compression: str,
                 task: int = 0):
        self.out = Path(out_dir)
        self.schema = schema
        self.splits: dict[str, SplitWriter] = {}
        for s in SPLITS:
            (self.out / s).mkdir(parents=True, exist_ok=True)
            self.splits[s] = SplitWriter(self.out / s, schema, row_group_size, compression, task)

    def append(self, split: str, row: list) -> None:
        self.splits[split].append(row)

    def append_table(self, codes: np.ndarray, table: pa.Table) -> None:
        """Rows of ``table`` (schema order) to split ``SPLITS[codes[i]]``, keeping their order.

        One gather per split, not one sort + slices: a slice would keep the whole block alive in the
        pending buffers of the small splits (valid/test fill a row group from dozens of blocks)."""
        counts = np.bincount(codes, minlength=len(SPLITS)) if len(codes) else np.zeros(len(SPLITS), np.int64)
        for i, (s, n) in enumerate(zip(SPLITS, counts.tolist())):
            if n == len(codes):
                self.splits[s].append_table(table)
            elif n:
                rows = np.flatnonzero(codes == i)      # pa.Array.from_buffers: pa.array(numpy) imports pandas
                self.splits[s].append_table(table.take(pa.Array.from_buffers(pa.int64(), len(rows), [None, pa.py_buffer(rows)])))

    def close(self, empty_files: bool = True) -> dict[str, SplitInfo]:
        return {s: w.close(empty_files) for s, w in self.splits.items()}


def add_empty_files(out_dir: Path, schema: pa.Schema, splits: dict[str, SplitInfo], compression: str) -> None:
    """Give each split without rows' files one empty file (readers take the schema from it)."""
    for s, info in splits.items():
        if not info.files:
            info.files = SplitWriter(Path(out_dir) / s, schema, 1, compression, 0).close().files


DATASET_ENTRIES = (*SPLITS, VOCAB_DIR, "stats", "rejects.tsv")   # what a conversion writes, manifest.json apart


def holds_dataset(out: Path) -> bool:
    return (out / "manifest.json").exists() or any((out / s).exists() for s in SPLITS)


class StagedOutput:
    """A conversion writes into a temporary sibling of ``out_dir`` that is swapped in at the end: a
    conversion that fails (bad input, interrupt) leaves the previous dataset, or nothing, in place.

    The swap moves the old ``manifest.json`` away first and puts the new one in last, so a crash in the
    middle of it leaves a directory without a manifest, which the loader refuses. Files of other
    programs in ``out_dir`` are kept.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool):
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise DataError(self.out, "output path exists and is not a directory")
        if holds_dataset(self.out) and not overwrite:
            raise DataError(self.out, "output directory already holds a dataset or a partial conversion (use --overwrite)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> None:
        if not self.out.exists():
            self.tmp.rename(self.out)
            return
        trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        trash.mkdir()
        for name in ("manifest.json", *DATASET_ENTRIES):      # manifest first: the old dataset is now refused
            if (self.out / name).exists():
                (self.out / name).rename(trash / name)
        for p in sorted(self.tmp.iterdir()):
            if p.name != "manifest.json":
                p.rename(self.out / p.name)
        if (self.tmp / "manifest.json").exists():
            (self.tmp / "manifest.json").rename(self.out / "manifest.json")   # last: the new one is complete
        self.tmp.rmdir()
        shutil.rmtree(trash, ignore_errors=True)


def write_vocab(out_dir: str | Path, feature: str, values: list[str], counts: list[int], compression: str) -> str:
    """``vocab/<feature>.parquet``: row i = id i, its raw value (as text) and its count in the vocab data."""
    d = Path(out_dir) / VOCAB_DIR
    d.mkdir(parents=True, exist_ok=True)
    ids, cnt = np.arange(len(values), dtype=np.int64), np.asarray(counts, np.int64)
    table = pa.table({"id": pa.Array.from_buffers(pa.int64(), len(ids), [None, pa.py_buffer(ids)]),
                      "value": pa.array(values, pa.string()),
                      "count": pa.Array.from_buffers(pa.int64(), len(cnt), [None, pa.py_buffer(cnt)])})
    pq.write_table(table, d / f"{feature}.parquet", **_writer_kwargs(compression))
    return f"{VOCAB_DIR}/{feature}.parquet"


def load_vocab(dataset_dir: str | Path, feature: str) -> list[str]:
    """Raw value of each id of ``feature`` (index = id), as saved by the converter."""
    p = Path(dataset_dir) / VOCAB_DIR / f"{feature}.parquet"
    if not p.is_file():
        raise DataError(p, f"no vocabulary for feature {feature!r} (hashed features have none)")
    t = pq.read_table(p)
    return t.column("value").to_pylist()


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    # List field names ("item"/"element") differ between writers; only the value type matters.
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and actual.value_type == expected.value_type
    return actual == expected


def check_schema(dataset_dir: str | Path, manifest: Manifest) -> None:
    """Compare every split file's Parquet schema and row count with the manifest; DataError on mismatch."""
    d = Path(dataset_dir)
    expected = arrow_schema(manifest.dense_features, manifest.sparse_features, manifest.label)
    for split in SPLITS:
        info = manifest.splits[split]
        rows = 0
        for rel in info.files:
            p = d / rel
            if not p.is_file():
                raise DataError(p, f"split {split!r} file listed in the manifest is missing")
            try:
                meta = pq.read_metadata(p)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(p, f"not a readable Parquet file: {e}") from None
            _check_file_schema(p, meta.schema.to_arrow_schema(), expected)
            rows += meta.num_rows
        if rows != info.rows:
            raise DataError(d / split, f"{rows} rows in Parquet files, manifest says {info.rows}", field="rows")


def _check_file_schema(path: Path, actual: pa.Schema, expected: pa.Schema) -> None:
    for f in expected:
        i = actual.get_field_index(f.name)
        if i < 0:
            raise DataError(path, f"column missing (manifest expects {f.type})", field=f.name)
        if not _same_type(actual.field(i).type, f.type):
            raise DataError(path, f"column type {actual.field(i).type}, manifest expects {f.type}", field=f.name)
    for name in actual.names:
        if expected.get_field_index(name) < 0:
            raise DataError(path, "column not in the manifest", field=name)
