"""Multi-embedding (``model.num_embeddings = K > 1``): K embedding sets per feature, one interaction module
per set, combined by a mean, then one shared post-processing MLP -- the design of Guo et al. 2023
("On the Embedding Collapse When Scaling Up Recommendation Models", Fig. 7 and its DCNv2 code, where
each set's module is the cross net plus the first hidden layer).

Set k reads the tables ``f__mek`` (models/layout.py; set 0 is ``f`` itself), each ``dim / K`` columns
wide, so the embedding parameters equal those of one table of ``dim``: the matched control is
``num_embeddings = 1`` at the same ``embedding.dim``. With ``h = mlp[0]``::

    e^k        = fields of set k, projected to the set's common dim D     [B, F, D]
    z_k        = I_k(e^k)                     (the model's interaction, own parameters per set)
    u_k        = ReLU(W_k z_k + b_k)          (the set's first hidden layer: [B, h])
    logit      = post(mean_k u_k)             (shared: the remaining hidden layers, then one output)

* DeepFM: I_k = [flatten(e^k), dense]; the first-order term (set 0's extra column, dense linear, bias)
  and the FM term ``mean_k FM(e^k)`` are added to the logit. The FM term alone is bilinear, so
  ``sum_k FM(e^k)`` equals a single embedding's FM over the concatenated sets: what makes the sets
  differ is the non-linear per-set hidden layer (the paper's point: set-specific, non-linear interaction).
* DLRM: I_k = TorchRec's dot interaction over [d, e^k], the dense arch ``d`` shared by the sets.
* DLRM-DCN: I_k = its own low-rank cross net over [d, e^k].

With K = 1 every class is the architecture of its single-embedding model (tested).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from models.base import MLP, Bias, FieldProjector, FieldSpec, TailrecModel, batch_size_of
from models.config import ModelConfig
from models.dlrm import CrossNet, _dense_sizes, _over_arch
from models.fm import EXTRA_COLS, fm_interaction
from models.layout import set_name


def set_fields(ebc: EmbeddingBagCollection, fields: FieldSpec, k: int) -> list[FieldSpec]:
    """FieldSpec of each embedding set (set 0 = ``fields``)."""
    configs = ebc.embedding_bag_configs()
    return [fields] + [FieldSpec.from_tables(configs, [set_name(f, s) for f in fields.names]) for s in range(1, k)]


class _MultiBase(TailrecModel):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(ebc, fields, num_dense)
        if cfg.num_embeddings < 1 or not cfg.mlp:
            raise ValueError("multi-embedding needs num_embeddings >= 1 and at least one hidden layer (model.mlp)")
        self.num_sets = cfg.num_embeddings
        self.sets = set_fields(ebc, fields, self.num_sets)

    def set_embeddings(self, kt: KeyedTensor) -> list[list[torch.Tensor]]:
        by_name = kt.to_dict()
        return [[by_name[f] for f in s.names] for s in self.sets]


class MultiDeepFM(_MultiBase):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(cfg, ebc, fields, num_dense)
        if min(fields.widths) <= EXTRA_COLS:
            raise ValueError(f"deepfm: set 0 tables need factor dim + {EXTRA_COLS} columns, got {fields.widths}")
        self.factor_dims = [tuple(w - EXTRA_COLS for w in fields.widths)] + [s.widths for s in self.sets[1:]]
        self.projectors = nn.ModuleList(FieldProjector(d) for d in self.factor_dims)
        n_fields, hidden = len(fields.names), cfg.mlp[0]
        self.blocks = nn.ModuleList(
            MLP(n_fields * p.common_dim + num_dense, [hidden], cfg.dropout, cfg.batch_norm).layers[:-1]
            for p in self.projectors)   # MLP's hidden layer without its output Linear
        self.post = MLP(hidden, list(cfg.mlp[1:]), cfg.dropout, cfg.batch_norm)
        self.bias = Bias(1)
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        raw = self.set_embeddings(kt)
        first = torch.stack([x[:, -1] for x in raw[0]], dim=1).sum(dim=1)
        linear = first + self.bias(first.shape[0]).squeeze(-1)
        if self.dense_linear is not None:
            linear = linear + self.dense_linear(dense).squeeze(-1)
        fm, hidden = [], []
        for xs, dims, proj, block in zip(raw, self.factor_dims, self.projectors, self.blocks):
            v = proj([x[:, :d] for x, d in zip(xs, dims)])
            fm.append(fm_interaction(v))
            deep_in = v.flatten(1) if self.num_dense == 0 else torch.cat([v.flatten(1), dense], dim=1)
            hidden.append(block(deep_in))
        return linear + torch.stack(fm).mean(0) + self.post(torch.stack(hidden).mean(0))


class MultiDLRM(_MultiBase):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(cfg, ebc, fields, num_dense)
        self.projectors = nn.ModuleList(FieldProjector(s.widths) for s in self.sets)
        dim, n_fields, hidden = self.projectors[0].common_dim, len(fields.names), cfg.mlp[0]
        if num_dense > 0:
            self.dense_arch: nn.Module = DenseArch(num_dense, _dense_sizes(cfg, dim))
        else:
            self.dense_arch = Bias(dim, init_std=1.0 / math.sqrt(dim))
        self.interactions = nn.ModuleList(self._interaction(cfg, n_fields, dim) for _ in self.sets)
        over_in = self._over_in(n_fields, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(over_in, hidden), nn.ReLU()) for _ in self.sets)
        self.post = _over_arch(hidden, list(cfg.mlp[1:]))

    def _interaction(self, cfg: ModelConfig, n_fields: int, dim: int) -> nn.Module:
        with torch.device("cpu"):   # value-carrying buffer (triu indices): not on meta (models/dlrm.py)
            return InteractionArch(num_sparse_features=n_fields)

    def _over_in(self, n_fields: int, dim: int) -> int:
        return dim + n_fields + math.comb(n_fields, 2)

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        b = batch_size_of(kt)
        d = self.dense_arch(dense) if self.num_dense > 0 else self.dense_arch(b)
        hidden = [block(inter(d, proj(xs))) for xs, proj, inter, block
                  in zip(self.set_embeddings(kt), self.projectors, self.interactions, self.blocks)]
        return self.post(torch.stack(hidden).mean(0)).squeeze(-1)


class MultiDLRMDCN(MultiDLRM):
    def _interaction(self, cfg: ModelConfig, n_fields: int, dim: int) -> nn.Module:
        crossnet = CrossNet((n_fields + 1) * dim, cfg.dcn_layers, cfg.dcn_low_rank)
        return InteractionDCNArch(num_sparse_features=n_fields, crossnet=crossnet)

    def _over_in(self, n_fields: int, dim: int) -> int:
        return (n_fields + 1) * dim
