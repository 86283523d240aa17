"""DLRM and DLRM-DCN over TorchRec's own building blocks (``torchrec.models.dlrm``).

    d = DenseArch(dense)                  [B, D], D = common field dim (see models.base)
    s = fields, projected to D            [B, F, D]
    x = InteractionArch(d, s)             dot products (DLRM) or LowRankCrossNet over [d, s] (DCN)
    logit = OverArch(x)                   hidden sizes cfg.mlp, then 1

Dense arch sizes: ``cfg.dense_arch`` lists the bottom MLP; its last layer must output D, so when
``cfg.dense_arch[-1] != D`` a final layer of width D is appended (``[]`` -> ``[D]``).

No dense features (``num_dense == 0``, MovieLens): the dense arch is replaced by one learned vector
``d`` of size D, shared by all examples. The interaction code stays TorchRec's; the products
``<d, s_f>`` become learned linear (first-order-like) terms of each field, and the over-arch input
keeps the same layout as with dense features.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from models.base import Bias, FieldProjector, FieldSpec, TailrecModel, batch_size_of
from models.config import ModelConfig


class _InitParameterList(nn.ParameterList):
    """ParameterList that DMP can re-initialise after meta materialisation (it calls
    ``reset_parameters`` on the module that directly owns meta parameters, here the list)."""

    def __init__(self, params: nn.ParameterList, init) -> None:
        super().__init__(list(params))
        self._init = init

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in self:
                self._init(p)


class CrossNet(LowRankCrossNet):
    """``LowRankCrossNet`` whose kernels survive meta-device materialisation (same init)."""

    def __init__(self, in_features: int, num_layers: int, low_rank: int) -> None:
        super().__init__(in_features, num_layers, low_rank)
        self.W_kernels = _InitParameterList(self.W_kernels, nn.init.xavier_normal_)
        self.V_kernels = _InitParameterList(self.V_kernels, nn.init.xavier_normal_)
        self.bias = _InitParameterList(self.bias, nn.init.zeros_)


def _dense_sizes(cfg: ModelConfig, dim: int) -> list[int]:
    sizes = list(cfg.dense_arch)
    return sizes if sizes and sizes[-1] == dim else sizes + [dim]


def _over_arch(in_features: int, hidden: list[int]) -> nn.Module:
    # TorchRec's OverArch needs >= 2 layer sizes; with no hidden layer it is one Linear.
    return OverArch(in_features, hidden + [1]) if hidden else nn.Linear(in_features, 1)


class DLRM(TailrecModel):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(ebc, fields, num_dense)
        self.project = FieldProjector(fields.widths)
        dim, n_fields = self.project.common_dim, len(fields.names)
        if num_dense > 0:
            self.dense_arch: nn.Module = DenseArch(num_dense, _dense_sizes(cfg, dim))
        else:
            self.dense_arch = Bias(dim, init_std=1.0 / math.sqrt(dim))
        self.inter_arch = self._interaction(cfg, n_fields, dim)
        self.over_arch = _over_arch(self._over_in(n_fields, dim), list(cfg.mlp))

    def _interaction(self, cfg: ModelConfig, n_fields: int, dim: int) -> nn.Module:
        # triu_indices is a value-carrying non-persistent buffer: on meta DMP would replace it by
        # zeros, so it is built on CPU (DMP's DDP wrap moves the module to the training device).
        with torch.device("cpu"):
            return InteractionArch(num_sparse_features=n_fields)

    def _over_in(self, n_fields: int, dim: int) -> int:
        return dim + n_fields + math.comb(n_fields, 2)

    def dense_out(self, dense: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.dense_arch(dense) if self.num_dense > 0 else self.dense_arch(batch_size)

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        sparse = self.project(self.field_embeddings(kt))
        d = self.dense_out(dense, batch_size_of(kt))
        return self.over_arch(self.inter_arch(d, sparse)).squeeze(-1)


class DLRMDCN(DLRM):
    """DLRM with TorchRec's DCN-v2 interaction (low-rank cross net over [d, s_1..s_F])."""

    def _interaction(self, cfg: ModelConfig, n_fields: int, dim: int) -> nn.Module:
        crossnet = CrossNet((n_fields + 1) * dim, cfg.dcn_layers, cfg.dcn_low_rank)
        return InteractionDCNArch(num_sparse_features=n_fields, crossnet=crossnet)

    def _over_in(self, n_fields: int, dim: int) -> int:
        return (n_fields + 1) * dim
