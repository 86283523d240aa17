"""AutoInt as in the PEP repo: multi-head self-attention over field embeddings with a residual
projection, plus a DNN over the concatenated embeddings (``full_part``). No FM / linear part.

    a_0   = W_att v                       (per field, D -> attn_dim)
    a_l   = MHSA_l(a_{l-1})               (cfg.attn_layers layers, cfg.attn_heads heads)
    h     = ReLU(a_L + W_res v)           (one residual, after the last layer, as in torchfm)
    logit = attn_fc(flatten(h)) + DNN([flatten(v), dense])

The attention is written with plain ``nn.Linear`` projections (same maths as
``nn.MultiheadAttention``) because DMP materialises meta modules through ``reset_parameters`` and
``nn.MultiheadAttention`` only has ``_reset_parameters`` for its packed input projection.
Dense features (if any) enter the DNN only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from models.base import MLP, FieldProjector, FieldSpec, TailrecModel
from models.config import ModelConfig


class SelfAttention(nn.Module):
    """Multi-head self-attention over fields: [B, F, d] -> [B, F, d]."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attn_dim {dim} is not divisible by attn_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, d = x.shape
        q, k, v = (t.view(b, f, self.heads, d // self.heads).transpose(1, 2) for t in self.in_proj(x).chunk(3, -1))
        # Dropout on the attention weights, like nn.MultiheadAttention(dropout=...).
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, f, d))


class AutoInt(TailrecModel):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(ebc, fields, num_dense)
        self.project = FieldProjector(fields.widths)
        dim, n_fields = self.project.common_dim, len(fields.names)
        self.atten_embedding = nn.Linear(dim, cfg.attn_dim)
        self.self_attns = nn.ModuleList(
            SelfAttention(cfg.attn_dim, cfg.attn_heads, cfg.attn_dropout) for _ in range(cfg.attn_layers)
        )
        self.res_embedding = nn.Linear(dim, cfg.attn_dim)
        self.attn_fc = nn.Linear(n_fields * cfg.attn_dim, 1)
        self.dnn = MLP(n_fields * dim + num_dense, list(cfg.mlp), cfg.dropout, cfg.batch_norm)

    def attention_logit(self, v: torch.Tensor) -> torch.Tensor:
        """[B, F, D] field embeddings -> [B] attention-part logit."""
        x = self.atten_embedding(v)
        for attn in self.self_attns:
            x = attn(x)
        h = F.relu(x + self.res_embedding(v))
        return self.attn_fc(h.flatten(1)).squeeze(-1)

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        v = self.project(self.field_embeddings(kt))
        deep_in = v.flatten(1)
        if self.num_dense > 0:
            deep_in = torch.cat([deep_in, dense], dim=1)
        return self.attention_logit(v) + self.dnn(deep_in)
