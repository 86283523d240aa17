"""The models survive DistributedModelParallel: built on meta, sharded on a 1-rank gloo group,
materialised, and then they compute exactly what the same weights compute in a plain CPU model."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

import models

NAMES = sorted(n for n in models.MODEL_CLASSES if n != "din")   # din: test_dmp_multi_embedding_and_din
B = 4
DIMS = {"a": 8, "b": 4}  # different dims: the projection is exercised too


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _plain_state(dmp) -> dict[str, torch.Tensor]:
    """DMP state dict with sharded tensors gathered (1 rank: the single local shard is the table)."""
    out = {}
    for k, v in dmp.state_dict().items():
        out[k] = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
    return out


def _wrap(model, tables, pg, sharding_type=None):
    plan = None
    if sharding_type:
        constraints = {t.name: ParameterConstraints(sharding_types=[sharding_type]) for t in tables}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], pg)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)


def _check(mk, name, num_dense, pg, sharding_type=None):
    tables = mk.tables(name, DIMS, shadow=("a",))
    model = models.build_model(mk.cfg(name), tables, num_dense, feature_names=list(DIMS))
    dmp = _wrap(model, tables, pg, sharding_type)
    params = dict(dmp.named_parameters())
    assert all(not p.is_meta and torch.isfinite(p).all() for p in params.values())
    for mod in dmp.modules():  # buffers were re-initialised, not left as DMP's zeros
        if isinstance(mod, torch.nn.BatchNorm1d):
            assert torch.equal(mod.running_var, torch.ones_like(mod.running_var))
    kjt, dense = mk.kjt(["a", "a__shadow", "b"], B), torch.randn(B, num_dense)
    logits = dmp(dense, kjt)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    logits.sum().backward()
    # Same weights in a plain CPU model give the same logits (eval: BN and dropout deterministic).
    ref = models.build_model(mk.cfg(name), tables, num_dense, feature_names=list(DIMS), device="cpu")
    ref.load_state_dict(_plain_state(dmp))
    dmp.eval()
    ref.eval()
    torch.testing.assert_close(dmp(dense, kjt), ref(dense, kjt))
    return dmp


@pytest.mark.parametrize("num_dense", [0, 2])
@pytest.mark.parametrize("name", NAMES)
def test_dmp_default_sharding(mk, pg, name, num_dense):
    dmp = _check(mk, name, num_dense, pg)
    inner = dmp.module
    if name in ("dlrm", "dlrm_dcn") and hasattr(inner.inter_arch, "triu_indices"):
        n = len(DIMS) + 1
        assert torch.equal(inner.inter_arch.triu_indices, torch.triu_indices(n, n, offset=1))


@pytest.mark.parametrize("name", ["deepfm", "dlrm_dcn"])
def test_dmp_table_wise_fused(mk, pg, name):
    """Fused FBGEMM kernels need a multiple of 4 columns: FM tables (d + extra_dims) must pass."""
    dmp = _check(mk, name, 2, pg, sharding_type="table_wise")
    assert "fused" in str(dmp.plan)


@pytest.mark.parametrize("kind", ["deepfm", "dlrm_dcn", "din_shared", "din_decoupled"])
def test_dmp_multi_embedding_and_din(pg, kind):
    """The multi-embedding classes (K = 2) and DIN through DMP: materialised, same logits as a plain model."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from models.config import ModelConfig
    from models.layout import table_layout
    from trainer.tables import derive_kjt

    if kind.startswith("din"):
        cfg = ModelConfig(name="din", mlp=[8], attention_embedding=kind[4:],
                          attention_dim=4 if kind == "din_decoupled" else 0)
        dims, raw = {"u": 8, "movie_id": 8, "history": 8}, ["u", "movie_id", "history"]
        lay = table_layout(cfg, raw, dims, history_len=2)
    else:
        cfg = ModelConfig(name=kind, mlp=[8, 4], num_embeddings=2, dcn_layers=1, dcn_low_rank=2)
        dims, raw = {"a": 8, "b": 16}, ["a", "b"]
        lay = table_layout(cfg, raw, dims)
    tables = [EmbeddingBagConfig(name=t.name, embedding_dim=t.width, num_embeddings=12, feature_names=list(t.features))
              for t in lay.tables]
    model = models.build_model(cfg, tables, 2, feature_names=list(lay.head_features))
    dmp = _wrap(model, tables, pg)
    assert all(not p.is_meta and torch.isfinite(p).all() for p in dmp.parameters())
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 3, (len(raw) * B,), generator=g)
    kjt = derive_kjt(KeyedJaggedTensor.from_lengths_sync(raw, torch.randint(0, 12, (int(lengths.sum()),), generator=g),
                                                         lengths), lay.derived, lay.batch_keys)
    dense = torch.randn(B, 2)
    dmp(dense, kjt).sum().backward()
    ref = models.build_model(cfg, tables, 2, feature_names=list(lay.head_features), device="cpu")
    ref.load_state_dict(_plain_state(dmp))
    dmp.eval()
    ref.eval()
    torch.testing.assert_close(dmp(dense, kjt), ref(dense, kjt))
