"""DIN-style target attention over a user history, with shared or decoupled attention embeddings (DARE,
Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled Embeddings").

Inputs (models/layout.py): the target item ``t`` (``model.target_feature``), the history positions
``h_1..h_N`` (most recent first; an empty bag where the history is shorter) looked up in the target's
table R, the other fields of the dataset, and, with ``attention_embedding = decoupled``, the same ids
looked up in a second table A (``<target>__att``, ``attention_dim`` columns). Shared: A = R.

    a_i   = <A[t], A[h_i]> / sqrt(d_A)             over the positions that hold an id
    w     = softmax(a)                              (a row with no history gets w = 0, so u = 0)
    u     = sum_i w_i R[h_i]                        (the user's interest in t)
    logit = MLP([fields projected to D (R[t] among them), u, u * R[t], dense])

So the attention scores' gradient reaches only A and the aggregation's only R when decoupled; with a
shared table R serves both, which is the interference DARE removes. DIN's original attention unit is
an MLP over [e_i, v_t, e_i - v_t, e_i * v_t] with unnormalised weights; we use the dot-product softmax
of DARE's (TWIN-style) models so that the shared and decoupled variants differ only in the tables.

Empty positions: an empty bag pools to an all-zero row (SUM pooling), and a trained row is never
exactly zero in every column of both tables, so a position counts as present when its pooled R or A
row is non-zero. No mask has to travel beside the KeyedTensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from models.base import MLP, FieldProjector, FieldSpec, TailrecModel
from models.config import ModelConfig
from models.layout import att_name, position_name


def target_attention(att_target: torch.Tensor, att_hist: torch.Tensor, rep_hist: torch.Tensor,
                     present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of one target over its history.

    att_target [B, dA], att_hist [B, N, dA], rep_hist [B, N, dR], present bool [B, N] ->
    (u [B, dR], weights [B, N]); rows without any present position get zero weights."""
    scores = (att_hist * att_target.unsqueeze(1)).sum(-1) / math.sqrt(att_target.shape[-1])
    scores = scores.masked_fill(~present, float("-inf"))
    any_present = present.any(dim=1, keepdim=True)
    w = torch.softmax(scores.masked_fill(~any_present, 0.0), dim=1) * any_present
    return (w.unsqueeze(-1) * rep_hist).sum(1), w


class DIN(TailrecModel):
    def __init__(self, cfg: ModelConfig, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__(ebc, fields, num_dense)
        if cfg.target_feature not in fields.names:
            raise ValueError(f"din: target feature {cfg.target_feature!r} is not a field ({fields.names})")
        configs = {t.name: t for t in ebc.embedding_bag_configs()}
        rep = configs[cfg.target_feature]
        self.positions = [f for f in rep.feature_names if f != cfg.target_feature]
        if not self.positions:
            raise ValueError(f"din: table {cfg.target_feature!r} has no history positions (models/layout.py)")
        self.target = cfg.target_feature
        self.decoupled = cfg.attention_embedding == "decoupled"
        if self.decoupled:
            self.att_target = att_name(cfg.target_feature)
            self.att_positions = [position_name(cfg.history_feature, i, attention=True)
                                  for i in range(len(self.positions))]
            if self.att_target not in configs:
                raise ValueError(f"din: decoupled attention needs table {self.att_target!r}")
        self.others = [f for f in fields.names if f != cfg.target_feature]
        self.project = FieldProjector(fields.widths)
        d_rep = rep.embedding_dim
        in_features = len(fields.names) * self.project.common_dim + 2 * d_rep + num_dense   # fields, u, u * R[t]
        self.mlp = MLP(in_features, list(cfg.mlp), cfg.dropout, cfg.batch_norm)

    def attention_inputs(self, kt: KeyedTensor):
        """(A[t], A[h] [B, N, dA], R[h] [B, N, dR], present [B, N]) from the pooled lookups."""
        by = kt.to_dict()
        rep_hist = torch.stack([by[p] for p in self.positions], dim=1)
        if self.decoupled:
            att_t, att_hist = by[self.att_target], torch.stack([by[p] for p in self.att_positions], dim=1)
            present = (rep_hist != 0).any(-1) | (att_hist != 0).any(-1)
        else:
            att_t, att_hist = by[self.target], rep_hist
            present = (rep_hist != 0).any(-1)
        return att_t, att_hist, rep_hist, present

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        att_t, att_hist, rep_hist, present = self.attention_inputs(kt)
        u, _ = target_attention(att_t, att_hist, rep_hist, present)
        fields = self.field_embeddings(kt)
        t = fields[self.fields.names.index(self.target)]
        parts = [self.project(fields).flatten(1), u, u * t]
        if self.num_dense > 0:
            parts.append(dense)
        return self.mlp(torch.cat(parts, dim=1))
