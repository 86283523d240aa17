"""Criteo -> Parquet: Kaggle ``train.txt`` or the 1TB ``day_0 .. day_23`` files, plain or ``.gz``.

Each line: label, I1..I13, C1..C26, tab-separated, empty fields allowed (``criteo_format.py``).
Several input files are read in order (days). Transformations (recorded in ``manifest.source``):

* label must be ``0`` or ``1``.
* I1..I13 -> float32 dense ``log1p(max(x, 0))``; empty -> 0. Negative values occur (I2 has -1, -2...);
  they are clamped to 0 first, because log1p is undefined below -1 and the sign carries no ordering
  that the model needs at that scale.
* C1..C26 -> int64 ids. A value is 1-16 hex digits (8 in the real data; case-insensitive). Mode
  ``vocab``: values seen at least ``min_count`` times in the *train* rows (first counting pass) get
  ids 0..k-1 sorted by value, then id k = "missing" (empty field), id k+1 = OOV (rare or unseen);
  with ``max_ind_range`` every id is taken modulo it (DLRM's ``--max-ind-range``).
  Mode ``hash``: id = int(hex, 16) % hash_size (deterministic, not Python's salted ``hash``),
  id hash_size = "missing"; no vocabulary is written.
* Split ``random``: per row, from (seed, split key), 80/10/10; the split key is the row's line index
  in its file plus ``file ordinal << 40`` (``common.split_key``). Split ``day``: every file but the
  last is train; the last file's rows go half to valid, half to test (per row, seeded).

Two engines write the same rows: ``vector`` (default; ``criteo_vec.py``, worker processes over files
and byte ranges) and ``rows`` (the reference row parser, one process).
"""
from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from data.convert.blocks import plan_tasks
from data.convert.columns import hex_text
from data.convert.common import (CriteoOptions, OptionsError, Vocab, check_rows_left, file_checksums, finish,
                                 merge_task_results, row_uniform, split_key, split_of)
from data.convert.criteo_format import DENSE, SPARSE, parse_line, resolve_inputs
from data.convert.criteo_vec import BlockStats, ValueCounts, count_task, save_keys, write_task
from data.convert.parallel import Pool
from data.manifest import SparseFeature
from data.readers import RowError, RowSink, iter_lines, merge_rejects
from data.writer import OOV_VALUE, DatasetWriter, StagedOutput, add_empty_files, arrow_schema, write_vocab

__all__ = ["convert", "resolve_inputs"]


def convert(files: list[Path], out_dir: Path, opts: CriteoOptions):
    opts.validate()
    if opts.split == "day" and len(files) < 2:
        raise OptionsError("split 'day' needs at least 2 input files (the last one becomes valid/test)")
    with StagedOutput(out_dir, opts.overwrite) as stage:
        engine = _convert_rows if opts.engine == "rows" else _convert_vector
        return engine(files, stage.tmp, opts)


def _source(files: list[Path], opts: CriteoOptions, vocab_files: dict, engine: dict) -> dict:
    return {"kind": "criteo", "files": file_checksums(files), "file_order": [p.name for p in files],
            "options": opts.to_dict(), "mode": opts.mode, "split": opts.split, "vocab": vocab_files,
            "split_key": "line index in the file + (file ordinal << 40)", "engine": engine,
            "dense_transform": "log1p(max(x, 0)); empty -> 0",
            "categorical": "vocab: sorted values with count >= min_count, then missing, then OOV"
            + (f"; ids modulo max_ind_range={opts.max_ind_range}" if opts.max_ind_range else "")
            if opts.mode == "vocab" else "hash: int(hex, 16) % hash_size; missing -> hash_size"}


# ----------------------------------------------------------------------------- vector engine

def _merge_counts(results: list) -> list[tuple[np.ndarray, np.ndarray, int]]:
    merged = []
    for j in range(len(SPARSE)):
        vc = ValueCounts()
        for feats, _ in results:
            values, counts, missing = feats[j]
            vc.add(values, counts)
            vc.missing += missing
        merged.append((*vc.compact(), vc.missing))
    return merged


def _build_vocabs(out: Path, results: list, opts: CriteoOptions) -> tuple[list[SparseFeature], dict, Path]:
    """Vocabulary files, manifest features and the ``.npy`` keys the write tasks memory-map."""
    keys_dir = out / ".vocab-keys"
    keys_dir.mkdir()
    sparse, files = [], {}
    for name, (values, counts, missing) in zip(SPARSE, _merge_counts(results)):
        keep = counts >= opts.min_count
        keys = np.ascontiguousarray(values[keep])
        save_keys(keys_dir, name, keys)
        n = len(keys) + 2                                   # + missing + OOV
        cap = opts.max_ind_range
        sparse.append(SparseFeature(name, min(n, cap) if cap else n, oov_id=(n - 1) % cap if cap else n - 1))
        files[name] = write_vocab(out, name, [*hex_text(keys), "", OOV_VALUE],
                                  [*counts[keep].tolist(), missing, int(counts[~keep].sum())], opts.compression)
    return sparse, files, keys_dir


def _convert_vector(files: list[Path], out: Path, opts: CriteoOptions):
    last = len(files) - 1
    vocab_files, keys_dir, stats = {}, None, BlockStats()
    with Pool(opts.num_workers()) as pool:
        tasks = plan_tasks(files, opts.task_bytes, pool)
        if opts.mode == "vocab":
            counted = pool.map(count_task, [(t, opts, last) for t in tasks])
            sparse, vocab_files, keys_dir = _build_vocabs(out, counted, opts)
        else:
            sparse = [SparseFeature(n, opts.hash_size + 1) for n in SPARSE]
        schema = arrow_schema(DENSE, sparse)
        results = pool.map(write_task, [(t, opts, last, str(out), schema, str(keys_dir) if keys_dir else None)
                                        for t in tasks])
    if keys_dir is not None:
        shutil.rmtree(keys_dir)
    rejects: dict[str, Counter] = {}
    splits = merge_task_results(results, rejects, stats)
    accepted: Counter = Counter()
    for r in results:
        accepted.update(r.accepted)
    merge_rejects(out, [out / r.reject_part for r in results if r.reject_part])
    check_rows_left(files, accepted, rejects)
    add_empty_files(out, schema, splits, opts.compression)
    engine = {"name": "vector", "tasks": len(tasks), "blocks": stats.blocks, "lines": stats.lines,
              "row_path_blocks": stats.row_path_blocks, "row_path_lines": stats.row_path_lines}
    return finish(out, _source(files, opts, vocab_files, engine), list(DENSE), sparse, splits, rejects, opts)


# ----------------------------------------------------------------------------- row engine (reference)

def _rows(files: list[Path], opts: CriteoOptions, sink: RowSink, only_train: bool = False, accepted=None):
    """Yield ``(split, label, ints, cats)`` of each good row, in input order."""
    for fi, path in enumerate(files):
        last_day = opts.split == "day" and fi == len(files) - 1
        for lineno, raw in iter_lines(path, opts.progress):
            u = row_uniform(opts.seed, split_key(fi, lineno - 1))
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
            if accepted is not None:
                accepted[path.name] += 1
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
    cap = opts.max_ind_range
    feats = [v.feature() for v in vocabs]
    if cap:
        feats = [SparseFeature(f.name, min(f.num_embeddings, cap), oov_id=f.oov_id % cap) for f in feats]
    return vocabs, feats


def _convert_rows(files: list[Path], out: Path, opts: CriteoOptions):
    mappers, sparse = _mappers(files, opts)
    writer = DatasetWriter(out, arrow_schema(DENSE, sparse), opts.row_group_size, opts.compression)
    sink = RowSink(out, opts.skip_bad_rows)
    accepted: Counter = Counter()
    log1p, cap = math.log1p, opts.max_ind_range
    for split, label, ints, cats in _rows(files, opts, sink, accepted=accepted):
        row = [label]
        row += [log1p(x) if x > 0 else 0.0 for x in ints]
        ids = [m.id(v) for m, v in zip(mappers, cats)]
        row += [i % cap for i in ids] if cap else ids
        writer.append(split, row)
    splits = writer.close()
    sink.close()
    check_rows_left(files, accepted, sink.by_file)
    vocab_files = {}
    if opts.mode == "vocab":
        vocab_files = {m.name: m.save(out, opts.compression) for m in mappers}
    return finish(out, _source(files, opts, vocab_files, {"name": "rows"}), list(DENSE), sparse, splits,
                  sink.by_file, opts)
