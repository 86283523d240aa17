"""Small builders shared by the model tests (fixtures, because --import-mode=importlib keeps test
folders off sys.path)."""
from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import models
from trainer.config import ModelConfig

MODEL_NAMES = ["fm", "deepfm", "autoint", "dlrm", "dlrm_dcn"]


def small_cfg(name: str) -> ModelConfig:
    return ModelConfig(name=name, mlp=[16, 8], dense_arch=[8], dropout=0.0, attn_layers=2, attn_heads=2,
                       attn_dim=8, dcn_layers=2, dcn_low_rank=4)


def tables_for(name: str, dims: dict[str, int], sizes: dict[str, int] | None = None,
               shadow: tuple[str, ...] = ()) -> list[EmbeddingBagConfig]:
    """One table per feature (``t_<feature>``), ``dims`` = factor dims; FM tables get extra_dims."""
    extra = models.extra_dims(name)
    sizes = sizes or {}
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=d + extra, num_embeddings=sizes.get(f, 20),
                           feature_names=[f] + ([f"{f}__shadow"] if f in shadow else []))
        for f, d in dims.items()
    ]


def random_kjt(keys: list[str], batch: int, num_embeddings: int = 20, max_len: int = 3,
               seed: int = 0) -> KeyedJaggedTensor:
    """Multi-hot bags (lengths 1..max_len; a zero-length bag is also fine for SUM pooling)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (len(keys) * batch,), generator=g)
    values = torch.randint(0, num_embeddings, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mk():
    """Helpers as one fixture: ``mk.cfg(name)``, ``mk.tables(...)``, ``mk.kjt(...)``, ``mk.names``."""
    import types

    return types.SimpleNamespace(cfg=small_cfg, tables=tables_for, kjt=random_kjt, names=MODEL_NAMES)
