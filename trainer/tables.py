"""The run's embedding tables: the model's layout (models/layout.py) resolved against the dataset and the
config, the ``EmbeddingBagConfig``s, and the batch wrapper that adds the layout's derived keys.

Derived keys (multi-embedding copies, history positions) are computed on the CPU batch before the
pipeline copies it, like the transfer shadows (trainer/transfer_wiring.py), so the pipeline's input
all-to-all sees an ordinary KeyedJaggedTensor holding exactly the EBC's keys.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.manifest import Manifest
from models.layout import DerivedKey, Layout, table_layout
from trainer import transfer_wiring
from trainer.config import Config
from trainer.config_base import ConfigError


def history_length(cfg: Config, manifest: Manifest) -> int:
    """din's history positions: ``model.history_len``, else the length the dataset was converted with."""
    if cfg.model.name != "din":
        return 0
    stored = int((manifest.source.get("history") or {}).get("length", 0))
    if cfg.model.history_len and stored and cfg.model.history_len > stored:
        raise ConfigError(f"model.history_len: {cfg.model.history_len} positions but {cfg.data.path} holds "
                          f"histories of at most {stored}")
    return cfg.model.history_len or stored


def resolve_layout(cfg: Config, manifest: Manifest, features: list[str]) -> Layout:
    try:
        layout = table_layout(cfg.model, features, {f: cfg.embedding.for_table(f)[0] for f in features},
                              history_length(cfg, manifest))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.name == "din":
        h, t = cfg.model.history_feature, cfg.model.target_feature
        nh, nt = manifest.feature(h).num_embeddings, manifest.feature(t).num_embeddings
        if nh != nt:
            raise ConfigError(f"model.history_feature: {h!r} has {nh} ids but the target {t!r} {nt}; the history "
                              "must hold ids of the target's vocabulary (tailrec convert movielens --history N)")
    if len(layout.tables) > len(features) and transfer_wiring.is_active(cfg):
        raise ConfigError(f"transfer.mode={cfg.transfer.mode} is not supported with model {cfg.model.name!r} "
                          f"(num_embeddings={cfg.model.num_embeddings}): use transfer.mode=baseline")
    names = {t.name for t in layout.tables}
    for name in cfg.embedding.tables:
        if name not in names:
            raise ConfigError(f"embedding.tables.{name}: no such table in this run ({sorted(names)})")
    return layout


def build_tables(cfg: Config, manifest: Manifest, layout: Layout) -> list[EmbeddingBagConfig]:
    tables = []
    for spec in layout.tables:
        kw = {}
        if cfg.embedding.init_scale > 0:
            s = cfg.embedding.init_scale
            kw["init_fn"] = functools.partial(torch.nn.init.uniform_, a=-s, b=s)
        feats = list(spec.features)
        if spec.name == spec.base:   # a transfer feature's shadow lives on the feature's own table
            feats += transfer_wiring.table_feature_names(cfg, spec.name)[1:]
        tables.append(EmbeddingBagConfig(name=spec.name, embedding_dim=spec.width, feature_names=feats,
                                         num_embeddings=manifest.feature(spec.base).num_embeddings, **kw))
    return tables


def derive_kjt(kjt: KeyedJaggedTensor, derived: tuple[DerivedKey, ...], keys: tuple[str, ...]) -> KeyedJaggedTensor:
    """A KJT holding exactly ``keys``: dataset keys as they are, derived keys computed from their source."""
    if kjt.weights_or_none() is not None:
        raise ValueError("derived features do not support weighted KJTs")
    by_key, how = kjt.to_dict(), {d.key: d for d in derived}
    lengths, values = [], []
    for key in keys:
        d = how.get(key)
        jt = by_key[d.source if d else key]
        ln, v = jt.lengths(), jt.values()
        if d is not None and d.position >= 0:
            has = ln > d.position
            v = v[jt.offsets()[:-1][has] + d.position]
            ln = has.to(ln.dtype)
        lengths.append(ln)
        values.append(v)
    return KeyedJaggedTensor(keys=list(keys), values=torch.cat(values), lengths=torch.cat(lengths),
                             stride=kjt.stride())


class DerivedBatches:
    """Wraps a loader: each batch's KJT gets the layout's derived keys (and only the EBC's keys)."""

    def __init__(self, source, layout: Layout):
        self.source, self.layout = source, layout

    def __iter__(self):
        for batch in self.source:
            yield replace(batch, sparse_features=derive_kjt(batch.sparse_features, self.layout.derived,
                                                            self.layout.batch_keys))

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):   # set_epoch, state_dict, num_batches ... of the wrapped loader
        return getattr(self.source, name)


def needs_views(layout: Layout, dataset_features: list[str]) -> bool:
    return bool(layout.derived) or list(layout.batch_keys) != list(dataset_features)
