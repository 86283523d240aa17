"""The converted dataset's contract: ``manifest.json`` next to ``train/ valid/ test/`` and ``stats/``.

Layout written by the converters (``tailrec convert``)::

    DIR/manifest.json
    DIR/train/part-00000.parquet ...   fixed-size row groups
    DIR/valid/part-00000.parquet ...
    DIR/test/part-00000.parquet ...
    DIR/stats/...                      (data/stats.py)
    DIR/rejects.tsv                    only with --skip-bad-rows

Parquet columns: ``label`` float32 (0/1); one float32 column per dense feature; one column per sparse
feature: int64 (single-valued) or list<int64> (multi-valued bag), ids already in [0, num_embeddings).
The trainer refuses a dataset whose format/version it does not understand (``load_manifest``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.errors import DataError

FORMAT = "tailrec-parquet"
VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class SparseFeature:
    name: str
    num_embeddings: int
    multi_hot: bool = False
    oov_id: int | None = None          # id used for unseen / rare values (None: hashing or closed vocab)


@dataclass
class SplitInfo:
    rows: int
    positives: int
    files: list[str] = field(default_factory=list)   # relative to the dataset dir


@dataclass
class Manifest:
    source: dict                       # {"kind": "movielens-1m"|..., "files": {name: sha256}, "options": {...}}
    converter_version: str
    label: str
    dense_features: list[str]
    sparse_features: list[SparseFeature]
    splits: dict[str, SplitInfo]
    row_group_size: int
    rejects: dict = field(default_factory=lambda: {"count": 0, "file": None, "by_reason": {}})
    stats: dict = field(default_factory=dict)   # {"dir": "stats", ...} filled by data/stats.py
    format: str = FORMAT
    version: int = VERSION

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse_features:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature {name!r}; have {[f.name for f in self.sparse_features]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, dataset_dir: str | Path) -> None:
        p = Path(dataset_dir) / "manifest.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(p)


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and validate; raises DataError naming the manifest and the field on anything unexpected."""
    p = Path(dataset_dir) / "manifest.json"
    if not p.is_file():
        raise DataError(p, "no manifest.json: not a converted tailrec dataset (run `tailrec convert`)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(p, f"invalid JSON: {e.msg}", line=e.lineno) from None
    if raw.get("format") != FORMAT:
        raise DataError(p, f"format is {raw.get('format')!r}, expected {FORMAT!r}", field="format")
    if raw.get("version") != VERSION:
        raise DataError(p, f"manifest version {raw.get('version')!r} not supported (this build reads {VERSION})",
                        field="version")
    try:
        raw["sparse_features"] = [SparseFeature(**f) for f in raw["sparse_features"]]
        raw["splits"] = {k: SplitInfo(**v) for k, v in raw["splits"].items()}
        m = Manifest(**raw)
    except (KeyError, TypeError) as e:
        raise DataError(p, f"malformed manifest: {e}") from None
    for s in SPLITS:
        if s not in m.splits:
            raise DataError(p, f"split {s!r} missing", field="splits")
    return m
