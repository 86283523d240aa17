"""What both converters share: options, the deterministic per-row split, vocabularies, the manifest.

Imports neither format module (``movielens.py`` / ``criteo.py`` import this one). Both converters
stream the raw rows (twice when a vocabulary must be counted first), write ``train/ valid/ test/`` with
fixed-size row groups, ``vocab/<feature>.parquet`` (raw value per id), ``rejects.tsv`` with
``skip_bad_rows``, and ``manifest.json`` last (a half-written dataset has no manifest, so it is refused).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from data.manifest import Manifest, SparseFeature, SplitInfo
from data.errors import DataError
from data.readers import rejects_summary, sha256_file
from data.writer import MISSING_VALUE, OOV_VALUE, write_vocab

# bump when the output of the same input and options changes. 2.0.0: the split key of a row is
# (file ordinal << 40) + line index within its file (was: the index over all files), so that files
# and byte ranges convert in parallel; single-file inputs (Kaggle, MovieLens) split exactly as in 1.x.
CONVERTER_VERSION = "2.0.0"
FILE_SHIFT = 40                 # split key = (file ordinal << FILE_SHIFT) + line index in the file
log = logging.getLogger(__name__)
_MASK = (1 << 64) - 1


class OptionsError(ValueError):
    """Invalid converter options (CLI exit code 2, like DataError)."""


@dataclass
class CommonOptions:
    seed: int = 42                                  # split seed (the PEP repo's random_split uses 42)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)   # train / valid / test
    row_group_size: int = 65536
    compression: str = "zstd"                       # or "snappy"
    skip_bad_rows: bool = False                     # True: bad rows -> rejects.tsv instead of DataError
    stats: bool = True                              # run data.stats.compute_stats when it is installed
    progress: bool | None = None                    # tqdm bars; None = only when stderr is a TTY
    overwrite: bool = False                         # replace an existing dataset in out_dir (swapped in at the end)
    workers: int = 0                                # worker processes; 0 = one per available CPU core
    engine: str = "vector"                          # "vector" (pyarrow.csv + numpy) or "rows" (reference row parser)
    task_bytes: int = 64 << 20                      # plain files are cut into byte ranges of this size (one task each)
    block_bytes: int = 4 << 20                      # bytes parsed at once; a block with a bad row goes through the row parser

    # Fields that do not change the rows written; left out of the manifest so that it is reproducible.
    # (task_bytes does not change the rows either, but it sets where the part files and row groups end.)
    _RUNTIME = ("progress", "overwrite", "workers", "engine", "block_bytes")

    def validate(self) -> None:
        if self.row_group_size <= 0:
            raise OptionsError(f"row_group_size must be positive, got {self.row_group_size}")
        if self.workers < 0 or self.task_bytes < 1 or self.block_bytes < 1:
            raise OptionsError("workers must be >= 0, task_bytes and block_bytes >= 1")
        if self.engine not in ("vector", "rows"):
            raise OptionsError(f"engine must be vector or rows, got {self.engine!r}")
        if self.compression not in ("zstd", "snappy"):
            raise OptionsError(f"compression must be zstd or snappy, got {self.compression!r}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-9:
            raise OptionsError(f"fractions must be 3 non-negative numbers summing to 1, got {self.fractions}")

    def num_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in self._RUNTIME:
            d.pop(k, None)
        d["fractions"] = list(self.fractions)
        return d


@dataclass
class MovieLensOptions(CommonOptions):
    preset: str = "full"              # "full" (ids + side features + genre bag) or "paper7" (PEP's 7 fields)
    drop_neutral: bool = True         # drop rows with rating == positive_threshold
    positive_threshold: float = 3.0   # label = rating > threshold
    min_count: int = 1                # values seen fewer times -> OOV id (1: closed vocab, no OOV id)
    history: int = 0                  # >0: a "history" column, the user's previous N movies (data/history.py)
    history_ties: str = "strict"      # same-timestamp ratings: "strict" (not each other's history) or "line"

    def validate(self) -> None:
        super().validate()
        if self.history < 0 or self.history_ties not in ("strict", "line") or (self.history and self.preset != "full"):
            raise OptionsError(f"history must be >= 0 with history_ties strict or line and preset full (it needs "
                               f"user_id, movie_id); got {self.history}, {self.history_ties!r}, {self.preset!r}")
        if self.preset not in ("full", "paper7"):
            raise OptionsError(f"preset must be full or paper7, got {self.preset!r}")
        if self.min_count < 1:
            raise OptionsError(f"min_count must be >= 1, got {self.min_count}")


@dataclass
class CriteoOptions(CommonOptions):
    mode: str = "vocab"               # "vocab" (frequency threshold + OOV) or "hash"
    min_count: int = 10               # vocab mode: values seen fewer times in train -> per-feature OOV id
    hash_size: int = 1 << 20          # hash mode: buckets per feature (+1 for "missing")
    split: str = "random"             # "random" (per-row 80/10/10) or "day" (last file -> valid/test halves)
    max_ind_range: int = 0            # vocab mode: ids taken modulo this cap (DLRM's --max-ind-range); 0 = no cap

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("vocab", "hash"):
            raise OptionsError(f"mode must be vocab or hash, got {self.mode!r}")
        if self.split not in ("random", "day"):
            raise OptionsError(f"split must be random or day, got {self.split!r}")
        if self.min_count < 1 or self.hash_size < 1:
            raise OptionsError("min_count and hash_size must be >= 1")
        if self.max_ind_range < 0 or (self.max_ind_range and self.mode != "vocab"):
            raise OptionsError("max_ind_range must be >= 0 and only applies to vocab mode (hash mode: hash_size)")


def options_from(cls, kwargs: dict):
    """Build an options dataclass from a dict, refusing unknown keys (CLI / config use)."""
    known = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise OptionsError(f"unknown {cls.__name__} fields {bad}")
    return cls(**kwargs)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def row_uniform(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, row index): the split streams and is reproducible."""
    return (_splitmix64(_splitmix64(seed & _MASK) ^ (index & _MASK)) >> 11) / float(1 << 53)


def split_of(u: float, fractions) -> str:
    if u < fractions[0]:
        return "train"
    return "valid" if u < fractions[0] + fractions[1] else "test"


def split_key(file_index: int, line_index: int) -> int:
    """The integer the split of a row is drawn from: its line index in its file, offset per input file."""
    return (file_index << FILE_SHIFT) + line_index


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)            # uint64 arithmetic wraps like the & _MASK above
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniform_np(seed: int, keys: np.ndarray) -> np.ndarray:
    """``row_uniform`` for an array of keys (bit-identical: the same integer maths, then one division)."""
    x = np.asarray(keys).astype(np.uint64) ^ np.uint64(_splitmix64(seed & _MASK))
    return (_splitmix64_np(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


SPLIT_CODES = ("train", "valid", "test")         # split code i <-> name (DatasetWriter.append_table)


def split_codes(u: np.ndarray, fractions) -> np.ndarray:
    """``split_of`` for an array: 0 train, 1 valid, 2 test."""
    return np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)


@dataclass
class Vocab:
    """Dense ids for the raw values of one feature: sorted values (count >= min_count), then
    optionally a "missing" id and an OOV id. Sorting by value keeps ids independent of input order."""
    name: str
    values: list
    counts: list[int]
    index: dict = field(repr=False)
    missing_id: int | None = None
    oov_id: int | None = None

    @classmethod
    def build(cls, name: str, counts: dict, min_count: int, missing: bool = False, oov: bool = False) -> "Vocab":
        items = sorted((v, c) for v, c in counts.items() if c >= min_count and v is not None)
        values, cnts = [v for v, _ in items], [c for _, c in items]
        index = {v: i for i, v in enumerate(values)}
        folded = sum(c for v, c in counts.items() if c < min_count and v is not None)
        voc = cls(name, values, cnts, index)
        if missing:
            voc.missing_id = len(voc.values)
            voc.values.append(None)
            voc.counts.append(counts.get(None, 0))
        if oov or folded:
            voc.oov_id = len(voc.values)
            voc.values.append(OOV_VALUE)
            voc.counts.append(folded)
        return voc

    def __len__(self) -> int:
        return len(self.values)

    def id(self, value) -> int:
        if value is None and self.missing_id is not None:
            return self.missing_id
        i = self.index.get(value)
        if i is None:
            if self.oov_id is None:     # closed vocab built over all rows: a miss is a converter bug
                raise KeyError(f"{self.name}: value {value!r} not in the vocabulary")
            return self.oov_id
        return i

    def save(self, out_dir: Path, compression: str) -> str:
        texts = [MISSING_VALUE if v is None else str(v) for v in self.values]
        return write_vocab(out_dir, self.name, texts, self.counts, compression)

    def feature(self, multi_hot: bool = False) -> SparseFeature:
        return SparseFeature(self.name, len(self), multi_hot=multi_hot, oov_id=self.oov_id)


def file_checksums(paths: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in paths:
        out[p.name] = sha256_file(p)
    return out


def merge_task_results(results, rejected: dict, stats) -> dict[str, SplitInfo]:
    """The workers' write results of a vectorised conversion: their split counts summed (files in task
    order), their rejects added into ``rejected`` ({file: Counter}) and their block stats into ``stats``."""
    splits = {s: SplitInfo(0, 0, []) for s in ("train", "valid", "test")}
    for r in results:
        for s, info in r.splits.items():
            splits[s].rows += info.rows
            splits[s].positives += info.positives
            splits[s].files += info.files
        for f, c in r.rejects.items():
            rejected.setdefault(f, Counter()).update(c)
        stats.add(r.stats)
    return splits


def check_rows_left(files: list[Path], accepted: dict, rejected: dict) -> None:
    """With ``skip_bad_rows`` a file whose every row was rejected is a wrong file or format, not a
    dataset: DataError naming it (before anything is swapped into the output directory)."""
    for p in files:
        bad = rejected.get(Path(p).name) or {}
        if sum(bad.values()) and not accepted.get(Path(p).name):
            top = ", ".join(f"{k} {v}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:3])
            raise DataError(p, f"all {sum(bad.values())} rows were rejected ({top}); is this the right file "
                               "and format? Nothing was written")
    if not sum(accepted.values()):
        raise DataError(files[0], "no usable rows in the input; nothing was written")


def finish(out_dir: Path, source: dict, dense: list[str], sparse: list[SparseFeature],
           splits: dict[str, SplitInfo], rejected: dict, opts: CommonOptions) -> Manifest:
    """Save the manifest (last, so a partial dataset is refused) and run the statistics pass.

    ``rejected``: ``{input file name: {reason: count}}`` (``RowSink.by_file``)."""
    m = Manifest(source=source, converter_version=CONVERTER_VERSION, label="label", dense_features=dense,
                 sparse_features=sparse, splits=splits, row_group_size=opts.row_group_size,
                 rejects=rejects_summary(rejected))
    m.save(out_dir)
    if opts.stats:
        _run_stats(out_dir)
        from data.manifest import load_manifest
        m = load_manifest(out_dir)       # compute_stats records itself in the manifest
    return m


def _run_stats(out_dir: Path) -> None:
    # data/stats.py is developed in parallel; check presence so a real error inside it still surfaces.
    if importlib.util.find_spec("data.stats") is None:
        log.warning("data.stats not available: %s has no stats/ (run `tailrec stats` later)", out_dir)
        return
    from data.stats import compute_stats
    compute_stats(out_dir)
