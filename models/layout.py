"""Which embedding tables a model needs, and which batch keys feed them (no torch: pure bookkeeping).

The dataset has one column per sparse feature. Two model options need more tables or keys than that:

* **multi-embedding** (``model.num_embeddings = K > 1``; deepfm, dlrm, dlrm_dcn): feature ``f`` gets K
  tables ``f, f__me1, ..., f__me{K-1}`` of ``dim / K`` factor columns each (the same total size as one
  table of ``dim``). Table ``f__mek`` is fed by the key ``f__mek``, a copy of ``f``'s ids. FM/DeepFM's
  first-order column lives in set 0's table only.
* **din** (target attention over a user history): the dataset's history feature (a bag of item ids
  from the target's vocabulary, most recent first) is split into positions ``<history>__p0 ..
  <history>__p{N-1}`` (one id, or an empty bag when the history is shorter), looked up in the
  target's table. With ``attention_embedding = decoupled`` (DARE) a second table ``<target>__att``,
  fed by copies ``<target>__att`` and ``<history>__att_p{i}``, serves the attention scores, and the
  first one only the aggregated representation.

The trainer builds one ``EmbeddingBagConfig`` per ``TableSpec`` and adds the ``DerivedKey``s to every
batch before the pipeline (trainer/feature_views.py). Derived names contain ``__``; configuration
overrides of a derived table fall back to its ``base`` feature's (``base_feature``).
"""
from __future__ import annotations

from dataclasses import dataclass

from models.config import FIRST_ORDER_MODELS, ModelConfig

SEP = "__"
EXTRA_COLS = 4   # = models.fm.EXTRA_COLS (kept here so this module needs no torch); tested equal


@dataclass(frozen=True)
class TableSpec:
    name: str                    # table name in the EBC (and in checkpoints, plans, metrics)
    base: str                    # dataset feature whose ids it holds: vocabulary size, statistics, config
    features: tuple[str, ...]    # batch keys pooled from this table
    factor_dim: int              # embedding columns
    width: int                   # allocated columns (factor_dim + FM extra columns where needed)


@dataclass(frozen=True)
class DerivedKey:
    key: str                     # batch key to add
    source: str                  # dataset feature it is computed from
    position: int = -1           # -1: a copy of the whole bag; i >= 0: the bag's i-th id (empty if shorter)


@dataclass(frozen=True)
class Layout:
    tables: tuple[TableSpec, ...]
    derived: tuple[DerivedKey, ...]
    head_features: tuple[str, ...]   # the fields the model's head reads through FieldSpec, in order

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every key the EBC is fed (dataset features no table uses, e.g. a split history, dropped)."""
        return tuple(f for t in self.tables for f in t.features)

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)


def base_feature(name: str) -> str:
    """``movie_id__me1`` / ``movie_id__att`` -> ``movie_id``."""
    return name.split(SEP, 1)[0]


def set_name(feature: str, k: int) -> str:
    return feature if k == 0 else f"{feature}{SEP}me{k}"


def set_index(name: str) -> int:
    """k of a multi-embedding set table ``f__mek``; 0 for a plain feature ``f``; -1 for other derived names."""
    if SEP not in name:
        return 0
    tag = name.split(SEP, 1)[1]
    return int(tag[2:]) if tag.startswith("me") and tag[2:].isdigit() else -1


def att_name(feature: str) -> str:
    return f"{feature}{SEP}att"


def position_name(history: str, i: int, attention: bool = False) -> str:
    return f"{history}{SEP}{'att_' if attention else ''}p{i}"


def _width(cfg: ModelConfig, factor_dim: int, first_order: bool) -> int:
    return factor_dim + (EXTRA_COLS if first_order and cfg.name in FIRST_ORDER_MODELS else 0)


def _check_dim(where: str, dim: int) -> None:
    # FBGEMM's fused kernels (ours included) need a multiple of 4 columns per table.
    if dim < 4 or dim % 4:
        raise ValueError(f"{where}: {dim} columns; fused tables need a positive multiple of 4")


def _multi(cfg: ModelConfig, features: list[str], dims: dict[str, int]) -> Layout:
    k = cfg.num_embeddings
    tables, derived = [], []
    for f in features:
        if dims[f] % k:
            raise ValueError(f"model.num_embeddings={k}: feature {f}'s embedding dim {dims[f]} is not divisible by {k}")
        d = dims[f] // k
        _check_dim(f"model.num_embeddings={k}: feature {f}'s per-set dim {dims[f]}/{k}", d)
        for s in range(k):
            name = set_name(f, s)
            tables.append(TableSpec(name, f, (name,), d, _width(cfg, d, s == 0)))
            if s:
                derived.append(DerivedKey(name, f))
    return Layout(tuple(tables), tuple(derived), tuple(features))


def _din(cfg: ModelConfig, features: list[str], dims: dict[str, int], history_len: int) -> Layout:
    hist, target = cfg.history_feature, cfg.target_feature
    for name, what in ((hist, "history_feature"), (target, "target_feature")):
        if name not in features:
            raise ValueError(f"model.{what}: {name!r} is not a feature of this run ({features})")
    if history_len < 1:
        raise ValueError("model din: the history length must be >= 1 (model.history_len, or a dataset "
                         "converted with --history N)")
    positions = tuple(position_name(hist, i) for i in range(history_len))
    tables, derived = [], [DerivedKey(p, hist, i) for i, p in enumerate(positions)]
    for f in features:
        if f == hist:
            continue
        feats = (f, *positions) if f == target else (f,)
        tables.append(TableSpec(f, f, feats, dims[f], dims[f]))
    if cfg.attention_embedding == "decoupled":
        a = cfg.attention_dim or dims[target]
        _check_dim("model.attention_dim", a)
        att_pos = tuple(position_name(hist, i, attention=True) for i in range(history_len))
        tables.append(TableSpec(att_name(target), target, (att_name(target), *att_pos), a, a))
        derived += [DerivedKey(att_name(target), target)] + [DerivedKey(p, hist, i) for i, p in enumerate(att_pos)]
    head = tuple(f for f in features if f != hist)
    return Layout(tuple(tables), tuple(derived), head)


def table_layout(cfg: ModelConfig, features: list[str], dims: dict[str, int], history_len: int = 0) -> Layout:
    """The tables of ``cfg.name`` over dataset ``features`` whose configured embedding dims are ``dims``.

    ``history_len``: din's number of history positions (``cfg.history_len`` or the dataset's)."""
    for f in features:
        if SEP in f:
            raise ValueError(f"feature name {f!r} contains {SEP!r}, which derived table names use")
    if cfg.name == "din":
        return _din(cfg, features, dims, history_len)
    if cfg.num_embeddings > 1:
        return _multi(cfg, features, dims)
    return Layout(tuple(TableSpec(f, f, (f,), dims[f], _width(cfg, dims[f], True)) for f in features), (),
                  tuple(features))
