"""What both converters share: options, the deterministic per-row split, vocabularies, the manifest.

Imports neither format module (``movielens.py`` / ``criteo.py`` import this one). Both converters
stream the raw rows (twice when a vocabulary must be counted first), write ``train/ valid/ test/`` with
fixed-size row groups, ``vocab/<feature>.parquet`` (raw value per id), ``rejects.tsv`` with
``skip_bad_rows``, and ``manifest.json`` last (a half-written dataset has no manifest, so it is refused).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from data.manifest import Manifest, SparseFeature, SplitInfo
from data.readers import sha256_file
from data.writer import MISSING_VALUE, OOV_VALUE, write_vocab

CONVERTER_VERSION = "1.0.0"     # bump when the output of the same input and options changes
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
    overwrite: bool = False                         # replace an existing dataset in out_dir

    # Fields that do not change the output; left out of the manifest so that it is reproducible.
    _RUNTIME = ("progress", "overwrite")

    def validate(self) -> None:
        if self.row_group_size <= 0:
            raise OptionsError(f"row_group_size must be positive, got {self.row_group_size}")
        if self.compression not in ("zstd", "snappy"):
            raise OptionsError(f"compression must be zstd or snappy, got {self.compression!r}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-9:
            raise OptionsError(f"fractions must be 3 non-negative numbers summing to 1, got {self.fractions}")

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

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("vocab", "hash"):
            raise OptionsError(f"mode must be vocab or hash, got {self.mode!r}")
        if self.split not in ("random", "day"):
            raise OptionsError(f"split must be random or day, got {self.split!r}")
        if self.min_count < 1 or self.hash_size < 1:
            raise OptionsError("min_count and hash_size must be >= 1")


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


def finish(out_dir: Path, source: dict, dense: list[str], sparse: list[SparseFeature],
           splits: dict[str, SplitInfo], rejects: dict, opts: CommonOptions) -> Manifest:
    """Save the manifest (last, so a partial dataset is refused) and run the statistics pass."""
    m = Manifest(source=source, converter_version=CONVERTER_VERSION, label="label", dense_features=dense,
                 sparse_features=sparse, splits=splits, row_group_size=opts.row_group_size, rejects=rejects)
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
