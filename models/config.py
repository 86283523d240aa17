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
    "din": "models.din:DIN",
}
# model.num_embeddings > 1 (multi-embedding, models/multi.py): these models, by their multi-set class
MULTI_EMBEDDING_MODELS = {"deepfm": "models.multi:MultiDeepFM", "dlrm": "models.multi:MultiDLRM",
                          "dlrm_dcn": "models.multi:MultiDLRMDCN"}
ATTENTION_EMBEDDINGS = ("shared", "decoupled")
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
    # multi-embedding (models/multi.py): K embedding sets per feature, each dim / K wide, one
    # interaction module per set; 1 = the ordinary single embedding
    num_embeddings: int = 1
    # din (models/din.py): target attention over the user history
    history_feature: str = "history"   # dataset feature: the user's previous items, most recent first
    target_feature: str = "movie_id"   # the candidate item; the history shares its table(s)
    history_len: int = 0               # positions used; 0 = the dataset's (manifest source.history.length)
    attention_embedding: str = "decoupled"  # "shared": one table for attention and aggregation;
                                       # "decoupled" (DARE): a second table <target>__att for attention
    attention_dim: int = 0             # decoupled: attention table dim; 0 = the target's dim

    def validate(self, where: str) -> None:
        # ValueError: the config loader reports it as a ConfigError naming the section
        if self.name not in MODELS:
            raise ValueError(f"{where}.name: {self.name!r} is not one of {list(MODELS)}")
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ValueError(f"{where}.num_embeddings: must be an integer >= 1, got {self.num_embeddings!r}")
        if self.num_embeddings > 1 and self.name not in MULTI_EMBEDDING_MODELS:
            raise ValueError(f"{where}.num_embeddings: multi-embedding is implemented for "
                             f"{list(MULTI_EMBEDDING_MODELS)}, not {self.name!r}")
        if self.num_embeddings > 1 and not self.mlp:
            raise ValueError(f"{where}.mlp: multi-embedding needs at least one hidden layer (each set's "
                             "interaction ends in its own first hidden layer)")
        if self.attention_embedding not in ATTENTION_EMBEDDINGS:
            raise ValueError(f"{where}.attention_embedding: {self.attention_embedding!r} is not one of "
                             f"{list(ATTENTION_EMBEDDINGS)}")
        for name in ("history_len", "attention_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.attention_dim and self.attention_embedding == "shared":
            raise ValueError(f"{where}.attention_dim: a shared attention table is the target's own (its dim); "
                             "attention_dim needs attention_embedding=decoupled")
