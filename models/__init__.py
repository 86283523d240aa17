"""tailrec models: FM, DeepFM, AutoInt, DLRM, DLRM-DCN over one ``EmbeddingBagCollection``.

No sharding code here: ``build_model`` returns a plain module (by default on ``meta``) that the
trainer hands to ``DistributedModelParallel``. Design notes live in ``models/base.py`` (meta device,
per-table dims), ``models/fm.py`` (first-order column) and ``models/dlrm.py`` (no dense features).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.config import FIRST_ORDER_MODELS, MODELS, MULTI_EMBEDDING_MODELS, ModelConfig

if TYPE_CHECKING:
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from models.base import TailrecModel

# What ``from models import X`` resolves lazily: the package itself imports no torch/torchrec, so
# ``models.config`` (and the trainer's config, which embeds it) loads in milliseconds.
_LAZY = {"FM": "models.fm", "DeepFM": "models.fm", "AutoInt": "models.autoint", "DLRM": "models.dlrm",
         "DLRMDCN": "models.dlrm", "TailrecModel": "models.base", "FieldSpec": "models.base", "DIN": "models.din",
         "MultiDeepFM": "models.multi", "MultiDLRM": "models.multi", "MultiDLRMDCN": "models.multi",
         "table_layout": "models.layout", "Layout": "models.layout"}


def __getattr__(name: str) -> Any:
    if name == "MODEL_CLASSES":
        classes = {}
        for model, path in MODELS.items():
            module, cls = path.split(":")
            classes[model] = getattr(importlib.import_module(module), cls)
        globals()["MODEL_CLASSES"] = classes
        return classes
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def _check_name(model_name: str) -> None:
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")


def extra_dims(model_name: str) -> int:
    """Columns a table needs beyond its factor dim: for FM/DeepFM the first-order weight plus padding
    to keep FBGEMM's multiple-of-4 column count (``models.fm.EXTRA_COLS`` = 4), else 0."""
    _check_name(model_name)
    if model_name not in FIRST_ORDER_MODELS:
        return 0
    from models.fm import EXTRA_COLS

    return EXTRA_COLS


def table_dim(model_name: str, factor_dim: int) -> int:
    """The ``embedding_dim`` to allocate for a table whose factor vectors have ``factor_dim`` columns."""
    return factor_dim + extra_dims(model_name)


def factor_dim(model_name: str, embedding_dim: int) -> int:
    """Columns ``[:factor_dim]`` of a table row are its factor vector (what transfer losses compare)."""
    return embedding_dim - extra_dims(model_name)


def build_model(
    cfg: ModelConfig,
    tables: list[EmbeddingBagConfig],
    num_dense: int,
    feature_names: list[str] | None = None,
    device: str | torch.device = "meta",
) -> TailrecModel:
    """Build ``cfg.name`` over an EBC of ``tables`` on ``device``.

    ``feature_names``: the fields the head reads, in order (default: every feature of every table,
    in table order). Tables for FM/DeepFM must already include ``extra_dims`` columns.
    """
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from models.base import FieldSpec

    _check_name(cfg.name)
    if num_dense < 0:
        raise ValueError(f"num_dense must be >= 0, got {num_dense}")
    fields = FieldSpec.from_tables(tables, feature_names)
    device = torch.device(device)
    # Dense modules are created under the same device so a meta build allocates nothing.
    if cfg.num_embeddings > 1:   # multi-embedding: the model's multi-set class (models/multi.py)
        module, name = MULTI_EMBEDDING_MODELS[cfg.name].split(":")
        cls = getattr(importlib.import_module(module), name)
    else:
        cls = __getattr__("MODEL_CLASSES")[cfg.name]
    with device:
        ebc = EmbeddingBagCollection(tables=tables, device=device)
        return cls(cfg, ebc, fields, num_dense)


__all__ = ["build_model", "extra_dims", "table_dim", "factor_dim", "ModelConfig", "MODELS", "TailrecModel",
           "MODEL_CLASSES", "FM", "DeepFM", "AutoInt", "DLRM", "DLRMDCN", "DIN", "MultiDeepFM", "MultiDLRM",
           "MultiDLRMDCN", "table_layout", "Layout"]
