"""Model hyper-parameters and the one list of models (no torch imports: loading a config stays cheap).

``MODELS`` maps each ``model.name`` to its class (``module:Class``); ``models.MODEL_CLASSES`` resolves
it. The trainer's config (trainer/config.py) embeds ``ModelConfig`` as its ``model`` section.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODELS = {
    "deepfm": "models.fm:DeepFM",
    "autoint": "models.autoint:AutoInt",
    "dlrm": "models.dlrm:DLRM",
    "dlrm_dcn": "models.dlrm:DLRMDCN",
    "fm": "models.fm:FM",
}
# FM/DeepFM tables carry the first-order weight in extra columns (models/fm.py explains the 4)
FIRST_ORDER_MODELS = ("fm", "deepfm")


@dataclass
class ModelConfig:
    name: str = "deepfm"               # one of MODELS
    mlp: list[int] = field(default_factory=lambda: [100, 100])  # DeepFM/AutoInt DNN, DLRM over-arch
    dense_arch: list[int] = field(default_factory=lambda: [64])  # DLRM bottom MLP (last = emb dim)
    dropout: float = 0.2
    batch_norm: bool = True
    attn_layers: int = 3               # AutoInt
    attn_heads: int = 2
    attn_dim: int = 64
    attn_dropout: float = 0.0
    dcn_layers: int = 3                # DLRM-DCN
    dcn_low_rank: int = 16

    def validate(self, where: str) -> None:
        # ValueError: the config loader reports it as a ConfigError naming the section
        if self.name not in MODELS:
            raise ValueError(f"{where}.name: {self.name!r} is not one of {list(MODELS)}")
