"""Parquet output of the converters: split writers with fixed-size row groups, vocabularies, schema check.

Byte-identical output for identical input: the writer options are fixed here (no timestamps are
written by pyarrow; ``created_by`` is the library version) and rows arrive in input order.
"""
from __future__ import annotations

import shutil
from pathlib import Path

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
    """Buffers at most one row group of one split, column-wise, and appends it to the current part file."""

    def __init__(self, split_dir: Path, schema: pa.Schema, row_group_size: int, compression: str):
        self.dir, self.schema, self.rgs, self.compression = split_dir, schema, row_group_size, compression
        self.names = schema.names
        self.cols: list[list] = [[] for _ in self.names]
        self.rows = self.positives = 0
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_file = 0

    def append(self, row: list) -> None:
        """``row`` is ordered like the schema: label, dense..., sparse..."""
        for col, v in zip(self.cols, row):
            col.append(v)
        self.rows += 1
        self.positives += row[0] == 1.0
        if len(self.cols[0]) >= self.rgs:
            self._flush()

    def _flush(self) -> None:
        if not self.cols[0]:
            return
        if self._writer is None or self._groups_in_file >= ROW_GROUPS_PER_FILE:
            self._open_next()
        arrays = [pa.array(c, type=f.type) for c, f in zip(self.cols, self.schema)]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=self.rgs)
        self._groups_in_file += 1
        self.cols = [[] for _ in self.names]

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"part-{len(self.files):05d}.parquet"
        self.files.append(f"{self.dir.name}/{name}")
        self._writer = pq.ParquetWriter(self.dir / name, self.schema, **_writer_kwargs(self.compression))
        self._groups_in_file = 0

    def close(self) -> SplitInfo:
        self._flush()
        if self._writer is None:      # empty split: still one (empty) file so readers see the schema
            self._open_next()
        self._writer.close()
        return SplitInfo(rows=self.rows, positives=int(self.positives), files=list(self.files))


class DatasetWriter:
    """The three split writers of one output directory."""

    def __init__(self, out_dir: str | Path, schema: pa.Schema, row_group_size: int, compression: str):
        self.out = Path(out_dir)
        self.splits: dict[str, SplitWriter] = {}
        for s in SPLITS:
            (self.out / s).mkdir(parents=True, exist_ok=True)
            self.splits[s] = SplitWriter(self.out / s, schema, row_group_size, compression)

    def append(self, split: str, row: list) -> None:
        self.splits[split].append(row)

    def close(self) -> dict[str, SplitInfo]:
        return {s: w.close() for s, w in self.splits.items()}


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create the output dir; refuse to mix with an earlier conversion unless ``overwrite``."""
    out = Path(out_dir)
    if (out / "manifest.json").exists() or any((out / s).exists() for s in SPLITS):
        if not overwrite:
            raise DataError(out, "output directory already holds a dataset or a partial conversion (use --overwrite)")
        for sub in (*SPLITS, VOCAB_DIR, "stats"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("manifest.json", "rejects.tsv"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_vocab(out_dir: str | Path, feature: str, values: list[str], counts: list[int], compression: str) -> str:
    """``vocab/<feature>.parquet``: row i = id i, its raw value (as text) and its count in the vocab data."""
    d = Path(out_dir) / VOCAB_DIR
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(range(len(values)), pa.int64()), "value": pa.array(values, pa.string()),
                      "count": pa.array(counts, pa.int64())})
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
