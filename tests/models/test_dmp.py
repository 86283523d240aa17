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

NAMES = sorted(models.MODEL_CLASSES)
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
