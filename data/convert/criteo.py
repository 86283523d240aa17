"""Criteo -> Parquet: Kaggle ``train.txt`` or the 1TB ``day_N`` files, plain or ``.gz``.

Each line: label, I1..I13, C1..C26, tab-separated, empty fields allowed. Several input files are read
in order (days). Transformations (recorded in ``manifest.source``):

* label must be ``0`` or ``1``.
* I1..I13 -> float32 dense ``log1p(max(x, 0))``; empty -> 0. Negative values occur (I2 has -1, -2...);
  they are clamped to 0 first, because log1p is undefined below -1 and the sign carries no ordering
  that the model needs at that scale.
* C1..C26 -> int64 ids. A value is 1-16 hex digits (8 in the real data; case-insensitive). Mode
  ``vocab``: values seen at least ``min_count`` times in the *train* rows (first counting pass) get
  ids 0..k-1 sorted by value, then id k = "missing" (empty field), id k+1 = OOV (rare or unseen).
  Mode ``hash``: id = int(hex, 16) % hash_size (deterministic, not Python's salted ``hash``),
  id hash_size = "missing"; no vocabulary is written.
* Split ``random``: per row, from (seed, row index over all files), 80/10/10. Split ``day``: every file
  but the last is train; the last file's rows go half to valid, half to test (per row, seeded).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from data.convert.common import (CriteoOptions, OptionsError, Vocab, file_checksums, finish, row_uniform,
                                 split_of)
from data.errors import DataError
from data.manifest import SparseFeature
from data.readers import RowError, RowSink, iter_lines
from data.writer import DatasetWriter, arrow_schema, prepare_out_dir

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *DENSE, *SPARSE]
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_DAY = re.compile(r"day_(\d+)(\.gz)?$")


def resolve_inputs(src) -> list[Path]:
    """A file, a list of files, or a directory holding ``train.txt[.gz]`` or ``day_N[.gz]`` files."""
    items = [src] if isinstance(src, (str, Path)) else list(src)
    if not items:
        raise DataError("<inputs>", "no Criteo input files given")
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            days = sorted((p for p in item.iterdir() if _DAY.match(p.name)), key=lambda p: int(_DAY.match(p.name)[1]))
            found = days or [p for p in (item / "train.txt", item / "train.txt.gz") if p.is_file()]
            if not found:
                raise DataError(item, "directory holds no train.txt[.gz] or day_N[.gz] files")
            out += found
        elif not item.is_file():
            raise DataError(item, "file not found")
        else:
            out.append(item)
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise DataError(out[0].parent, f"input file names must be distinct (checksums are keyed by name): {names}")
    return out


def parse_line(raw: bytes) -> tuple[float, list[int], list[int | None]]:
    """``(label, 13 ints (missing -> 0), 26 categorical ints (missing -> None))``; RowError naming the field."""
    parts = raw.decode("latin-1").split("\t")     # latin-1 never fails; a stray byte fails the field check
    if len(parts) != 40:
        field = COLUMNS[len(parts)] if len(parts) < 40 else "column 41"
        raise RowError(field, "columns", f"expected 40 tab-separated fields, got {len(parts)}")
    if parts[0] not in ("0", "1"):
        raise RowError("label", "bad_label", f"label {parts[0]!r} is not 0 or 1")
    ints = []
    for name, s in zip(DENSE, parts[1:14]):
        try:
            ints.append(int(s) if s else 0)
        except ValueError:
            raise RowError(name, "not_integer", f"{s!r} is not an integer") from None
    cats: list[int | None] = []
    for name, s in zip(SPARSE, parts[14:]):
        if not s:
            cats.append(None)
        elif _HEX.fullmatch(s):
            cats.append(int(s, 16))
        else:
            raise RowError(name, "not_hex", f"{s!r} is not a hex string of 1-16 digits")
    return float(parts[0]), ints, cats


def _rows(files: list[Path], opts: CriteoOptions, sink: RowSink, only_train: bool = False):
    """Yield ``(split, label, ints, cats)`` of each good row, in input order."""
    index = 0
    for fi, path in enumerate(files):
        last_day = opts.split == "day" and fi == len(files) - 1
        for lineno, raw in iter_lines(path, opts.progress):
            u = row_uniform(opts.seed, index)
            index += 1
            if opts.split == "random":
                split = split_of(u, opts.fractions)
            else:
                split = ("valid" if u < 0.5 else "test") if last_day else "train"
            if only_train and split != "train":
                continue
            try:
                label, ints, cats = parse_line(raw)
            except RowError as e:
                sink.bad(path, lineno, e, raw)
                continue
            yield split, label, ints, cats


def _count_pass(files: list[Path], opts: CriteoOptions) -> list[Counter]:
    counts = [Counter() for _ in SPARSE]
    sink = RowSink(None, opts.skip_bad_rows, record=False)   # the writing pass logs bad rows once
    for _, _, _, cats in _rows(files, opts, sink, only_train=True):
        for c, v in zip(counts, cats):
            c[v] += 1
    return counts


class _HashIds:
    def __init__(self, size: int):
        self.size = size

    def id(self, v: int | None) -> int:
        return self.size if v is None else v % self.size


def _mappers(files: list[Path], opts: CriteoOptions):
    """Per-feature id mappers and their manifest entries."""
    if opts.mode == "hash":
        h = _HashIds(opts.hash_size)
        return [h] * len(SPARSE), [SparseFeature(n, opts.hash_size + 1) for n in SPARSE]
    counts = _count_pass(files, opts)
    vocabs = [Vocab.build(n, c, opts.min_count, missing=True, oov=True) for n, c in zip(SPARSE, counts)]
    for voc in vocabs:   # hex keys back to text for vocab files: 8 lowercase digits as in the raw data
        voc.values = [v if v is None or isinstance(v, str) else f"{v:08x}" for v in voc.values]
    return vocabs, [v.feature() for v in vocabs]


def convert(files: list[Path], out_dir: Path, opts: CriteoOptions):
    opts.validate()
    if opts.split == "day" and len(files) < 2:
        raise OptionsError("split 'day' needs at least 2 input files (the last one becomes valid/test)")
    out = prepare_out_dir(out_dir, opts.overwrite)
    mappers, sparse = _mappers(files, opts)
    writer = DatasetWriter(out, arrow_schema(DENSE, sparse), opts.row_group_size, opts.compression)
    sink = RowSink(out, opts.skip_bad_rows)
    log1p = math.log1p
    for split, label, ints, cats in _rows(files, opts, sink):
        row = [label]
        row += [log1p(x) if x > 0 else 0.0 for x in ints]
        row += [m.id(v) for m, v in zip(mappers, cats)]
        writer.append(split, row)
    splits = writer.close()
    sink.close()
    vocab_files = {}
    if opts.mode == "vocab":
        vocab_files = {m.name: m.save(out, opts.compression) for m in mappers}
    source = {"kind": "criteo", "files": file_checksums(files), "file_order": [p.name for p in files],
              "options": opts.to_dict(), "mode": opts.mode, "split": opts.split, "vocab": vocab_files,
              "dense_transform": "log1p(max(x, 0)); empty -> 0",
              "categorical": "vocab: sorted values with count >= min_count, then missing, then OOV"
              if opts.mode == "vocab" else "hash: int(hex, 16) % hash_size; missing -> hash_size"}
    return finish(out, source, list(DENSE), sparse, splits, sink.summary(), opts)
