"""Shared pieces of every tailrec model: the base class, field handling, small building blocks.

A model is one ``EmbeddingBagCollection`` (``self.ebc``) plus a dense "head" that reads the pooled
embeddings of ``feature_names`` from the EBC's ``KeyedTensor``. The EBC may hold more features
(shadow look-ups for transfer losses); the head never reads them.

Meta-device contract: the trainer builds the model on ``meta`` and ``DistributedModelParallel``
materialises it. DMP shards the EBC, and for every other module that owns meta parameters it
allocates *uninitialised* memory and then calls that module's ``reset_parameters()``. So every
module here that owns parameters directly must have ``reset_parameters`` (checked by a test), and
buffers that carry values (not zeros) must not live on meta.

Per-table dims: interaction models need one common field dim ``D``. ``D`` is the largest field dim;
a field whose dim is smaller gets its own bias-free ``Linear(d_f, D)`` (fields already at ``D`` are
not projected, so equal-dim setups have no extra parameters). This keeps the model independent of
the config: dims come from the tables only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


@dataclass(frozen=True)
class FieldSpec:
    """The fields the head reads, in order, and each field's pooled width in the EBC."""

    names: tuple[str, ...]
    widths: tuple[int, ...]

    @staticmethod
    def from_tables(tables: list[EmbeddingBagConfig], feature_names: list[str] | None) -> FieldSpec:
        width = {f: t.embedding_dim for t in tables for f in t.feature_names}
        names = list(width) if feature_names is None else list(feature_names)
        missing = [f for f in names if f not in width]
        if missing:
            raise ValueError(f"feature_names {missing} are not features of any table ({sorted(width)})")
        if not names:
            raise ValueError("a model needs at least one sparse feature")
        if len(set(names)) != len(names):
            raise ValueError(f"feature_names has duplicates: {names}")
        return FieldSpec(tuple(names), tuple(width[f] for f in names))


class TailrecModel(nn.Module):
    """Base class: ``forward(dense, kjt) = head(dense, embed(kjt))``; logits of shape [B]."""

    def __init__(self, ebc: EmbeddingBagCollection, fields: FieldSpec, num_dense: int) -> None:
        super().__init__()
        self.ebc = ebc
        self.fields = fields
        self.num_dense = num_dense

    @property
    def feature_names(self) -> list[str]:
        return list(self.fields.names)

    def embed(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(kjt)

    def head(self, dense: torch.Tensor, kt: KeyedTensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(dense, self.embed(kjt))

    def field_embeddings(self, kt: KeyedTensor) -> list[torch.Tensor]:
        """Pooled embeddings of ``feature_names`` in order ([B, width_f] each); others ignored."""
        by_name = kt.to_dict()
        return [by_name[f] for f in self.fields.names]


class FieldProjector(nn.Module):
    """Maps per-field vectors of (possibly) different dims to one common dim and stacks them.

    ``common_dim`` = max input dim; only fields narrower than that get a bias-free Linear.
    """

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.common_dim = max(dims)
        # Keyed by field index (ModuleDict needs str keys); fields already at common_dim have no entry.
        self.proj = nn.ModuleDict(
            {str(i): nn.Linear(d, self.common_dim, bias=False) for i, d in enumerate(dims) if d != self.common_dim}
        )
        self.num_fields = len(dims)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """list of F tensors [B, d_f] -> [B, F, D]."""
        out = [self.proj[str(i)](x) if str(i) in self.proj else x for i, x in enumerate(xs)]
        return torch.stack(out, dim=1)


class MLP(nn.Module):
    """torchfm's MultiLayerPerceptron (the PEP repo's DNN): per hidden layer Linear -> BatchNorm ->
    ReLU -> Dropout, then a Linear to one logit. BatchNorm is optional (cfg.batch_norm)."""

    def __init__(self, in_features: int, hidden: list[int], dropout: float, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_features, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in] -> [B]."""
        return self.layers(x).squeeze(-1)


class Bias(nn.Module):
    """A learned vector (the global bias of FM, DLRM's stand-in for a missing dense arch).

    Its own module so DMP's meta materialisation can call ``reset_parameters`` on it.
    """

    def __init__(self, size: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.init_std = init_std
        self.value = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init_std > 0:
                self.value.normal_(0.0, self.init_std)
            else:
                self.value.zero_()

    def forward(self, batch_size: int) -> torch.Tensor:
        """-> [batch_size, size]."""
        return self.value.unsqueeze(0).expand(batch_size, -1)


def batch_size_of(kt: KeyedTensor) -> int:
    return kt.values().shape[0]
