"""FM (linear + FM) and DeepFM (linear + FM + MLP), as in the PEP repo (torchfm layers).

First-order term without a second EBC (which would double the sharded tables): every table of
these models is ``EXTRA_COLS`` (= 4) columns wider than its factor dim ``d``; the trainer builds
``embedding_dim = d + models.extra_dims(name)``. Columns ``[:d]`` are the factor vector, the last
column is the per-id first-order weight, and the 3 columns between are alignment padding that the
model never reads (zero gradient). Why 4 and not 1: FBGEMM's fused TBE kernels (and so our fused
optimizer and column-wise sharding) require a multiple of 4 columns per table/shard
(``_assert_local_cols_divisible_by_4``), so ``d + 1`` would break every fused kernel. The cost is 3
dead columns per row (e.g. 36 instead of 33 floats at d = 32). With SUM pooling a multi-hot bag
yields the sum of its ids' factors and of their weights, i.e. torchfm's FeaturesLinear over the bag.
Consumers of raw rows (transfer losses on these tables) should use the factor part ``[:d]``.

Dense features (Criteo) enter the first-order term through a bias-free ``Linear(num_dense, 1)`` and,
for DeepFM, the MLP input. With ``num_dense == 0`` (MovieLens) both are absent.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from models.base import MLP, Bias, FieldProjector, FieldSpec, TailrecModel
from models.config import ModelConfig

EXTRA_COLS = 4  # 1 first-order weight + 3 padding columns (FBGEMM needs a multiple of 4 columns)


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Second-order FM term: sum_{i<j} <v_i, v_j> via 0.5 * ((sum v)^2 - sum v^2); [B, F, D] -> [B]."""
    square_of_sum = v.sum(dim=1).pow(2)
    sum_of_square = v.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class FM(TailrecModel):
    """logit = bias + sum_f w_f + <w_dense, dense> + FM(v)."""

    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(ebc, fields, num_dense)
        if min(fields.widths) <= EXTRA_COLS:
            raise ValueError(
                f"{cfg.name}: tables need factor dim + {EXTRA_COLS} columns (models.extra_dims), got {fields.widths}"
            )
        self.factor_dims = tuple(w - EXTRA_COLS for w in fields.widths)
        self.project = FieldProjector(self.factor_dims)
        self.bias = Bias(1)
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None

    def factors_and_first_order(self, kt: KeyedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (factor vectors [B, F, D], summed first-order weights [B])."""
        raw = self.field_embeddings(kt)
        factors = self.project([x[:, :d] for x, d in zip(raw, self.factor_dims)])
        first = torch.stack([x[:, -1] for x in raw], dim=1).sum(dim=1)
        return factors, first

    def linear_term(self, dense: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        out = first + self.bias(first.shape[0]).squeeze(-1)
        if self.dense_linear is not None:
            out = out + self.dense_linear(dense).squeeze(-1)
        return out

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        factors, first = self.factors_and_first_order(kt)
        return self.linear_term(dense, first) + fm_interaction(factors)


class DeepFM(FM):
    """FM plus an MLP over the concatenated factor vectors (and dense features)."""

    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(cfg, ebc, fields, num_dense)
        in_features = len(fields.names) * self.project.common_dim + num_dense
        self.mlp = MLP(in_features, list(cfg.mlp), cfg.dropout, cfg.batch_norm)

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        factors, first = self.factors_and_first_order(kt)
        deep_in = factors.flatten(1)
        if self.num_dense > 0:
            deep_in = torch.cat([deep_in, dense], dim=1)
        return self.linear_term(dense, first) + fm_interaction(factors) + self.mlp(deep_in)

