"""tailrec models: FM, DeepFM, AutoInt, DLRM, DLRM-DCN over one ``EmbeddingBagCollection``.

No sharding code here: ``build_model`` returns a plain module (by default on ``meta``) that the
trainer hands to ``DistributedModelParallel``. Design notes live in ``models/base.py`` (meta device,
per-table dims), ``models/fm.py`` (first-order column) and ``models/dlrm.py`` (no dense features).
"""
from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from models.autoint import AutoInt
from models.base import FieldSpec, TailrecModel
from models.dlrm import DLRM, DLRMDCN
from models.fm import EXTRA_COLS, FM, DeepFM
from trainer.config import ModelConfig

MODEL_CLASSES: dict[str, type[TailrecModel]] = {
    "fm": FM,
    "deepfm": DeepFM,
    "autoint": AutoInt,
    "dlrm": DLRM,
    "dlrm_dcn": DLRMDCN,
}


def _check_name(model_name: str) -> None:
    if model_name not in MODEL_CLASSES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {sorted(MODEL_CLASSES)}")


def extra_dims(model_name: str) -> int:
    """Columns a table needs beyond its factor dim: for FM/DeepFM the first-order weight plus padding
    to keep FBGEMM's multiple-of-4 column count (``models.fm.EXTRA_COLS`` = 4), else 0."""
    _check_name(model_name)
    return EXTRA_COLS if model_name in ("fm", "deepfm") else 0


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
    _check_name(cfg.name)
    if num_dense < 0:
        raise ValueError(f"num_dense must be >= 0, got {num_dense}")
    fields = FieldSpec.from_tables(tables, feature_names)
    device = torch.device(device)
    # Dense modules are created under the same device so a meta build allocates nothing.
    with device:
        ebc = EmbeddingBagCollection(tables=tables, device=device)
        return MODEL_CLASSES[cfg.name](cfg, ebc, fields, num_dense)


__all__ = ["build_model", "extra_dims", "TailrecModel", "MODEL_CLASSES", "FM", "DeepFM", "AutoInt", "DLRM", "DLRMDCN"]
